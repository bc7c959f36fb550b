"""SDXL ControlNets: parity with diffusers' StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline and
multi-ControlNet on identical tiny random weights (same scheduler, generators seed + i, float32), the control
really changing the image, loading (folders, single files) and the family check both ways."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline,
                       StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline)
from PIL import Image

import ldm
import tiny
import tiny_sdxl
from ldm import samplers
from pixels import gens, max_diff, px
from test_controlnet import control_image, random_controlnet

TOL = 2  # per pixel, out of 255
VISIBLE = 10  # the control must change the image by more than this
W, H = 32, 24  # not square, to catch w/h mix-ups


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-cn-base"))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model):
    return ldm.load(sdxl_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def xl_folders(tmp_path_factory):
    """Two SDXL ControlNets (copies of the tiny SDXL U-Net: pooled embedding + time ids) as diffusers folders."""
    out = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny-controlnet-sdxl-{seed}")
        random_controlnet(tiny_sdxl.unet(), seed).save_pretrained(folder, safe_serialization=True)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def xl_cns(xl_folders, sdxl_pipe):
    return [ldm.load_controlnet(f, base=sdxl_pipe) for f in xl_folders]


def reference(cls, model, folders, n_nets, sampler, seeds):
    nets = [ControlNetModel.from_pretrained(f) for f in folders[:n_nets]]
    pipe = cls.from_pretrained(model, controlnet=nets[0] if n_nets == 1 else nets, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


# ---- parity with diffusers ----------------------------------------------------------------------------


CASES = {  # name: (unit settings, batch, guidance, sampler)
    "weight 1": (dict(weight=1.0), 1, 7.0, "Euler a"),
    "weight 0.7 start 0.2 end 0.8": (dict(weight=0.7, start=0.2, end=0.8), 1, 7.0, "DPM++ 2M"),
    "guess mode with CFG": (dict(guess_mode=True), 1, 5.0, "Euler"),
    "batch 2": (dict(weight=1.2), 2, 7.0, "Euler a"),
    "no CFG": (dict(weight=0.8), 1, 1.0, "Euler"),
}


@pytest.mark.parametrize("case", CASES)
def test_txt2img_matches_diffusers(sdxl_model, sdxl_pipe, xl_folders, xl_cns, case):
    unit, batch, cfg, sampler = CASES[case]
    kw = dict(negative_prompt="blurry", width=W, height=H, steps=5, guidance_scale=cfg, seed=42, batch_size=batch,
              sampler=sampler, schedule="Automatic")
    ours = sdxl_pipe.txt2img("a house", control=[ldm.ControlUnit(xl_cns[0], control_image(0, W, H), **unit)], **kw)
    ref = reference(StableDiffusionXLControlNetPipeline, sdxl_model, xl_folders, 1, sampler, ours.seeds)
    theirs = ref("a house", image=control_image(0, W, H), negative_prompt="blurry", width=W, height=H,
                 num_inference_steps=5, guidance_scale=cfg, num_images_per_prompt=batch, generator=gens(42, batch),
                 controlnet_conditioning_scale=unit.get("weight", 1.0), guess_mode=unit.get("guess_mode", False),
                 control_guidance_start=unit.get("start", 0.0), control_guidance_end=unit.get("end", 1.0)).images
    plain = sdxl_pipe.txt2img("a house", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"sdxl controlnet parity txt2img {case}: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


def test_two_units_match_multi_controlnet(sdxl_model, sdxl_pipe, xl_folders, xl_cns):
    images = [control_image(0, W, H), control_image(5, W, H)]
    units = [ldm.ControlUnit(xl_cns[0], images[0], weight=0.9, start=0.0, end=0.6),
             ldm.ControlUnit(xl_cns[1], images[1], weight=0.6, start=0.2, end=1.0)]
    kw = dict(width=W, height=H, steps=5, guidance_scale=6.0, seed=3, sampler="Euler a", schedule="Automatic")
    ours = sdxl_pipe.txt2img("a tree", negative_prompt="fog", control=units, **kw)
    ref = reference(StableDiffusionXLControlNetPipeline, sdxl_model, xl_folders, 2, "Euler a", ours.seeds)
    theirs = ref("a tree", negative_prompt="fog", image=images, width=W, height=H, num_inference_steps=5,
                 guidance_scale=6.0, generator=gens(3, 1), controlnet_conditioning_scale=[0.9, 0.6],
                 control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0]).images
    single = sdxl_pipe.txt2img("a tree", negative_prompt="fog", control=units[:1], **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, single.images)
    print(f"sdxl controlnet parity two units: max pixel diff {diff}, second unit's effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE  # the second unit adds to the first
    assert "ControlNet 0: " in ours.infotexts[0] and "ControlNet 1: " in ours.infotexts[0]


def test_img2img_matches_diffusers(sdxl_model, sdxl_pipe, xl_folders, xl_cns):
    init = noise_image(0)
    unit = ldm.ControlUnit(xl_cns[0], control_image(1, W, H), weight=0.9, end=0.8)
    kw = dict(negative_prompt="ugly", strength=0.6, steps=6, seed=9, batch_size=2, sampler="Euler a",
              schedule="Automatic", guidance_scale=6.0)
    ours = sdxl_pipe.img2img(init, "a watercolor", control=[unit], **kw)
    ref = reference(StableDiffusionXLControlNetImg2ImgPipeline, sdxl_model, xl_folders, 1, "Euler a", ours.seeds)
    theirs = ref("a watercolor", negative_prompt="ugly", image=init, control_image=control_image(1, W, H), strength=0.6,
                 num_inference_steps=6, guidance_scale=6.0, num_images_per_prompt=2, generator=gens(9, 2),
                 controlnet_conditioning_scale=0.9, control_guidance_end=0.8, width=W, height=H).images
    plain = sdxl_pipe.img2img(init, "a watercolor", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"sdxl controlnet parity img2img batch 2: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


@pytest.fixture(scope="module")
def sdxl_inpaint_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-cn-inpaint"), unet_model=tiny_sdxl.unet(seed=2, in_channels=9))


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_inpaint_matches_diffusers_inside_the_mask(request, xl_folders, xl_cns, kind):
    """A 4-channel U-Net (latent blending) and a 9-channel inpainting U-Net (the ControlNet still sees the 4 latent
    channels), the latter in guess mode."""
    sdxl_model = request.getfixturevalue("sdxl_model" if kind == "base" else "sdxl_inpaint_model")
    sdxl_pipe = request.getfixturevalue("sdxl_pipe") if kind == "base" else ldm.load(sdxl_model, device="cpu", dtype="float32")
    image = noise_image(1)
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 6:22] = 255
    unit = ldm.ControlUnit(xl_cns[0], control_image(2, W, H), weight=1.0, guess_mode=kind == "inpaint")
    kw = dict(negative_prompt="ugly", strength=1.0, mask_blur=0, steps=4, seed=9, sampler="Euler a",
              schedule="Automatic", guidance_scale=6)
    ours = sdxl_pipe.inpaint(image, Image.fromarray(mask), "a cat", control=[unit], **kw)
    ref = reference(StableDiffusionXLControlNetInpaintPipeline, sdxl_model, xl_folders, 1, "Euler a", ours.seeds)
    theirs = ref("a cat", negative_prompt="ugly", image=image, mask_image=Image.fromarray(mask),
                 control_image=control_image(2, W, H), strength=1.0, width=W, height=H, num_inference_steps=4,
                 guidance_scale=6, generator=gens(9, 1), controlnet_conditioning_scale=1.0,
                 guess_mode=kind == "inpaint").images
    plain = sdxl_pipe.inpaint(image, Image.fromarray(mask), "a cat", **kw)
    inside = mask >= 128  # diffusers does not paste back: compare the repainted area
    diff = int(np.abs(px(ours.images[0]) - px(theirs[0]))[inside].max())
    effect = int(np.abs(px(ours.images[0]) - px(plain.images[0]))[inside].max())
    print(f"sdxl controlnet parity inpaint ({kind} U-Net): max pixel diff inside the mask {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


def test_guess_mode_runs_the_controlnet_on_the_conditional_rows_only(sdxl_pipe, xl_cns):
    """With CFG and AND sub-prompts: the conditional rows of text, pooled embedding and time ids (2 images x
    2 sub-prompts = 4 of 6); steps outside start/end do not run the ControlNet."""
    seen = []
    hook = xl_cns[0].module.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (args[0].shape[0], kwargs["encoder_hidden_states"].shape[0],
         *(v.shape[0] for v in kwargs["added_cond_kwargs"].values()))), with_kwargs=True)
    try:
        unit = ldm.ControlUnit(xl_cns[0], control_image(0, W, H), guess_mode=True, start=0.2, end=0.8)
        sdxl_pipe.txt2img("a cat AND a dog", control=[unit], batch_size=2, width=W, height=H, steps=5, seed=1)
    finally:
        hook.remove()
    assert seen == [(4, 4, 4, 4)] * 3  # steps 1-3 of 0-4


# ---- loading: folders and single files, the family check both ways --------------------------------------


SHALLOW = {  # diffusers' shallower SDXL ControlNets, in small
    "small": {"down_block_types": ["DownBlock2D"] * 2, "transformer_layers_per_block": [1, 1]},  # no down attention
    "mid": {"transformer_layers_per_block": [0, 0]},  # attention blocks of 0 transformer layers
}


def shallow_controlnet(kind: str, seed: int) -> ControlNetModel:
    """An SDXL ControlNet shaped like diffusers' "controlnet-*-sdxl-1.0-small" / "-mid", every weight random."""
    config = {**dict(random_controlnet(tiny_sdxl.unet(), seed).config), **SHALLOW[kind]}
    torch.manual_seed(seed)
    net = ControlNetModel.from_config(config)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


def same_weights(loaded, net) -> bool:
    ours, theirs = loaded.module.state_dict(), net.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_single_files_load_with_a_config_from_the_base(sdxl_pipe, xl_folders, xl_cns, tmp_path):
    from safetensors.torch import save_file
    from test_controlnet import original_controlnet_layout

    net = ControlNetModel.from_pretrained(xl_folders[0])
    flat = tmp_path / "controlnet-tiny-sdxl.safetensors"  # diffusers' names in one file, as the hub ships them
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(flat))
    loaded = ldm.load_controlnet(flat, base=sdxl_pipe)
    assert same_weights(loaded, net) and loaded.config.addition_embed_type == "text_time"
    kw = dict(width=W, height=H, steps=3, seed=4, sampler="Euler")
    a, b = (sdxl_pipe.txt2img("x", control=[ldm.ControlUnit(cn, control_image(0, W, H))], **kw) for cn in (loaded, xl_cns[0]))
    assert max_diff(a.images, b.images) == 0
    # The original layout (label_emb, input_hint_block, ...), with the real hint block: 4 widths, 3 downsamplings.
    torch.manual_seed(0)
    real_hint = ControlNetModel.from_unet(tiny_sdxl.unet(), conditioning_embedding_out_channels=(4, 8, 8, 16))
    for p in real_hint.parameters():
        p.data.normal_(0, 0.1)
    original = tmp_path / "control_tiny_sdxl.safetensors"
    save_file(original_controlnet_layout(real_hint, "control_model."), str(original))
    assert same_weights(ldm.load_controlnet(original, base=sdxl_pipe), real_hint)


@pytest.mark.parametrize("kind", SHALLOW)
def test_shallower_sdxl_controlnets_load_from_folders_and_single_files(sdxl_pipe, tmp_path, kind):
    from safetensors.torch import save_file

    net = shallow_controlnet(kind, 5)
    net.save_pretrained(tmp_path / f"controlnet-{kind}", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / f"controlnet-{kind}.safetensors"))
    folder = ldm.load_controlnet(tmp_path / f"controlnet-{kind}", base=sdxl_pipe)
    single = ldm.load_controlnet(tmp_path / f"controlnet-{kind}.safetensors", base=sdxl_pipe)
    assert same_weights(folder, net) and same_weights(single, net)
    types, depths = list(net.config.down_block_types), list(net.config.transformer_layers_per_block)
    assert list(single.config.down_block_types) == types
    assert [d for t, d in zip(types, single.config.transformer_layers_per_block) if "CrossAttn" in t] == \
        [d for t, d in zip(types, depths) if "CrossAttn" in t]
    assert single.config.transformer_layers_per_block[-1] == depths[-1]  # the middle block's
    kw = dict(width=W, height=H, steps=3, seed=4, sampler="Euler")
    a, b = (sdxl_pipe.txt2img("x", control=[ldm.ControlUnit(cn, control_image(0, W, H))], **kw) for cn in (folder, single))
    assert max_diff(a.images, b.images) == 0 and max_diff(a.images, sdxl_pipe.txt2img("x", **kw).images) > VISIBLE


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-controlnet-sd1")
    random_controlnet(tiny.unet(), 1).save_pretrained(folder, safe_serialization=True)
    return folder


def corrupt_weights(src, dst):
    """`src`'s config with weights that fail to read: a refusal that names the family proves they were not read."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    (dst / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return dst


SD1_ON_SDXL = r"is for an unknown family \(cross-attention 32\) but the model is SDXL \(cross-attention 80\)"
SDXL_ON_SD1 = r"is for SDXL \(cross-attention 80\) but the model is an unknown family \(cross-attention 32\)"


def test_a_controlnet_of_the_other_family_is_refused_before_its_weights_are_read(
        sdxl_pipe, base_pipe, sd1_folder, xl_folders, tmp_path):
    with pytest.raises(ValueError, match=SD1_ON_SDXL):
        ldm.load_controlnet(corrupt_weights(sd1_folder, tmp_path / "sd1"), base=sdxl_pipe)
    with pytest.raises(ValueError, match=SDXL_ON_SD1):
        ldm.load_controlnet(corrupt_weights(xl_folders[0], tmp_path / "sdxl"), base=base_pipe)
    with pytest.raises(ldm.ModelLoadError, match="corrupt or incomplete"):  # the same files with the right base
        ldm.load_controlnet(tmp_path / "sdxl", base=sdxl_pipe)


def test_single_files_of_the_other_family_are_refused_before_their_weights_are_read(sdxl_pipe, base_pipe, tmp_path,
                                                                                    monkeypatch):
    from safetensors.torch import save_file

    from test_controlnet import original_controlnet_layout

    sd1, xl = random_controlnet(tiny.unet(), 1), random_controlnet(tiny_sdxl.unet(), 1)
    files = {}
    for name, net in (("sd1", sd1), ("sdxl", xl)):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
        save_file(original_controlnet_layout(net), str(tmp_path / f"{name}_original.safetensors"))
    import safetensors.torch

    def no_reading(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    for layout in ("", "_original"):
        with pytest.raises(ValueError, match=SD1_ON_SDXL):
            ldm.load_controlnet(tmp_path / f"sd1{layout}.safetensors", base=sdxl_pipe)
        with pytest.raises(ValueError, match=SDXL_ON_SD1):
            ldm.load_controlnet(tmp_path / f"sdxl{layout}.safetensors", base=base_pipe)


@pytest.mark.parametrize("keys,kind", [
    ({"lora_controlnet": [1], "input_hint_block.0.weight": [16, 3, 3, 3]}, "a Control-LoRA"),
    ({"task_embedding": [6, 320], "time_embedding.linear_1.weight": [1280, 320]}, "a ControlNet Union model"),
    ({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": [32, 640]}, "a ControlNet-LLLite"),
])
def test_other_kinds_in_the_controlnet_folder_are_refused_by_name(sdxl_pipe, tmp_path, keys, kind):
    from safetensors.torch import save_file

    file = tmp_path / "cn.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(file))
    with pytest.raises(ldm.ModelLoadError, match=f"cn.safetensors is {kind}, which is not supported"):
        ldm.load_controlnet(file, base=sdxl_pipe)


def test_a_union_folder_is_refused_by_its_class(sdxl_pipe, xl_folders, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(xl_folders[0], tmp_path / "controlnet-union-sdxl")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "ControlNetUnionModel"}))
    with pytest.raises(ldm.ModelLoadError, match="controlnet-union-sdxl is a ControlNet Union model"):
        ldm.load_controlnet(folder, base=sdxl_pipe)


def count_calls(*modules):
    calls = []
    return calls, [m.register_forward_hook(lambda *a: calls.append(1)) for m in modules]


def test_units_of_the_other_family_are_refused_before_model_work(sdxl_pipe, base_pipe, sd1_folder, xl_folders):
    sd1, xl = ldm.load_controlnet(sd1_folder), ldm.load_controlnet(xl_folders[0])  # no base: checked at generation
    calls, hooks = count_calls(sdxl_pipe.unet, base_pipe.unet, sd1.module, xl.module)
    try:
        with pytest.raises(ValueError, match=SD1_ON_SDXL):
            sdxl_pipe.txt2img("x", control=[ldm.ControlUnit(sd1, control_image(0, W, H))], width=W, height=H, steps=2)
        with pytest.raises(ValueError, match=SDXL_ON_SD1):
            base_pipe.img2img(noise_image(0), "x", control=[ldm.ControlUnit(xl, control_image(0, W, H))], steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_fast_preset_with_sdxl_control_is_refused_before_model_work(sdxl_pipe, xl_cns):
    unit = ldm.ControlUnit(xl_cns[0], control_image(0, W, H))
    calls, hooks = count_calls(sdxl_pipe.unet, xl_cns[0].module)
    try:
        with pytest.raises(ValueError, match="fast preset cannot be combined with ControlNet"):
            sdxl_pipe.txt2img("x", control=[unit], fast=True, width=W, height=H, steps=2)
        with pytest.raises(ValueError, match="fast preset cannot be combined with ControlNet"):
            sdxl_pipe.img2img(noise_image(0), "x", control=[unit], fast=True, steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


# ---- the web UI and the REST API on an SDXL model ------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, xl_folders, sd1_folder):
    import shutil

    root = tmp_path_factory.mktemp("sdxl-cn-models")
    shutil.copytree(xl_folders[0], root / "ControlNet" / "tiny-xl")
    shutil.copytree(sd1_folder, root / "ControlNet" / "tiny-sd1")
    return root


@pytest.fixture(scope="module")
def xl_app_pipe(sdxl_model, models_dir):
    return ldm.load(sdxl_model, device="cpu", dtype="float32", models_dir=models_dir)


def test_web_ui_units_on_sdxl_equal_the_library_and_name_a_family_mismatch(xl_app_pipe, tmp_path):
    from ui import state, streaming, tasks

    ctx = state.Context(state.Pipes(xl_app_pipe), state.Options(outputs=tmp_path / "outputs", preview_every=0))
    control_image(0, W, H).save(tmp_path / "shapes.png")
    values = {"cn0_enabled": True, "cn0_model": "tiny-xl", "cn0_image": str(tmp_path / "shapes.png"),
              "cn0_preprocessor": "none", "cn0_weight": 0.8, "cn0_start": 0.0, "cn0_end": 0.9}
    kw = dict(prompt="a cube", steps=3, seed=5, width=W, height=H)
    out = streaming.run(tasks.txt2img(ctx, **kw, **values))
    lib = xl_app_pipe.txt2img("a cube", steps=3, seed=5, width=W, height=H, control=[ldm.ControlUnit(
        ldm.load_controlnet("tiny-xl", base=xl_app_pipe), control_image(0, W, H), weight=0.8, end=0.9)])
    assert np.array_equal(px(Image.open(out.images[0]).convert("RGB")), px(lib.images[0]))
    assert 'ControlNet 0: "Module: none, Model: tiny-xl [' in out.infotexts[0]
    with pytest.raises(ValueError, match=SD1_ON_SDXL):  # what the page's status shows
        streaming.run(tasks.txt2img(ctx, **kw, **{**values, "cn0_model": "tiny-sd1"}))


def test_rest_api_lists_sdxl_controlnets_and_refuses_a_family_mismatch_with_422(xl_app_pipe, tmp_path):
    import base64
    import io

    requests = pytest.importorskip("requests")
    from api_server import launch_api
    from ui.state import Pipes

    buf = io.BytesIO()
    control_image(0, W, H).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    app = launch_api(Pipes(xl_app_pipe), tmp_path / "out")
    try:
        listed = requests.get(f"{app.url}/controlnet/model_list", timeout=30).json()["model_list"]
        assert [t.split(" [")[0] for t in listed] == ["tiny-sd1", "tiny-xl"]
        body = {"prompt": "a cube", "seed": 5, "width": W, "height": H, "steps": 3, "cfg_scale": 6.0,
                "sampler_name": "Euler a", "alwayson_scripts": {"controlnet": {"args": [
                    {"enabled": True, "image": image, "module": "none", "model": "tiny-xl", "weight": 0.8}]}}}
        r = requests.post(f"{app.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 200, r.text
        lib = xl_app_pipe.txt2img("a cube", steps=3, seed=5, width=W, height=H, guidance_scale=6.0, sampler="Euler a",
                                  control=[ldm.ControlUnit(ldm.load_controlnet("tiny-xl", base=xl_app_pipe),
                                                           control_image(0, W, H), weight=0.8)])
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert np.array_equal(px(got), px(lib.images[0]))
        body["alwayson_scripts"]["controlnet"]["args"][0]["model"] = "tiny-sd1"
        r = requests.post(f"{app.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 422 and "but the model is SDXL" in r.json()["detail"], r.text
    finally:
        app.close()


def test_real_sdxl_shapes_get_the_hub_configs_architecture():
    """On the meta device (no weights): diffusers/controlnet-canny-sdxl-1.0's architecture, and a 'small' one, as
    files would hold them, get configs from the bundled SDXL base U-Net config that rebuild every tensor's shape."""
    import json

    from diffusers import UNet2DConditionModel

    from ldm import single_file
    from ldm.controlnet_file import derived_config

    unet_config = json.loads((single_file.BUNDLED_CONFIGS["sdxl"] / "unet" / "config.json").read_text())
    with torch.device("meta"):
        full = ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet_config),
                                         conditioning_embedding_out_channels=(16, 32, 96, 256))
        small = ControlNetModel.from_config({**dict(full.config), "down_block_types": ["DownBlock2D"] * 3,
                                             "transformer_layers_per_block": [1, 1, 1]})
    for name, net in (("controlnet-canny-sdxl-1.0", full), ("controlnet-canny-sdxl-1.0-small", small)):
        header = {k: ("F16", tuple(v.shape)) for k, v in net.state_dict().items()}
        config = derived_config(unet_config, header, name)
        with torch.device("meta"):
            rebuilt = ControlNetModel.from_config(config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
        assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256] and config["cross_attention_dim"] == 2048
    assert list(full.config.transformer_layers_per_block) == [1, 2, 10]  # the hub config's, from the U-Net's
