"""ControlNet: parity with diffusers' ControlNet pipelines (txt2img, img2img, inpaint, multi-ControlNet) on
identical tiny weights, the control really changing the image, units outside their range costing nothing,
bad input refused before model work, the infotext, loading (folders and single original-layout files)."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline,
                       StableDiffusionControlNetPipeline)
from PIL import Image

import ldm
import tiny
from ldm import samplers
from ldm.controlnet import ControlNet
from ldm.metadata import parse_infotext
from pixels import gens, max_diff, px

TOL = 2  # per pixel, out of 255
VISIBLE = 10  # the control must change the image by more than this
W, H = 32, 40


def random_controlnet(unet, seed: int) -> ControlNetModel:
    """A tiny ControlNet copied from `unet`, with its zero-initialised convolutions randomised (else it adds
    exactly nothing and every parity test passes vacuously)."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def cn_folders(tmp_path_factory):
    out = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny-controlnet-{seed}")
        random_controlnet(tiny.unet(), seed).save_pretrained(folder, safe_serialization=True)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def cns(cn_folders, base_pipe):
    return [ldm.load_controlnet(f, base=base_pipe) for f in cn_folders]


def control_image(seed: int = 0, w: int = W, h: int = H) -> Image.Image:
    """Shapes on black: a map with structure, as a preprocessed edge/pose map would have."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, w - 8), rng.integers(0, h - 8)
        a[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = rng.integers(80, 256, 3)
    return Image.fromarray(a)


def reference(cls, base_model, cn_folders, n_nets, sampler, seeds, **kw):
    nets = [ControlNetModel.from_pretrained(f) for f in cn_folders[:n_nets]]
    pipe = cls.from_pretrained(base_model, controlnet=nets[0] if n_nets == 1 else nets, safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


# ---- parity with diffusers ----------------------------------------------------------------------------


CASES = {  # name: (unit settings, batch, guidance, sampler)
    "weight 1": (dict(weight=1.0), 1, 7.0, "Euler a"),
    "weight 0.7 start 0.2 end 0.8": (dict(weight=0.7, start=0.2, end=0.8), 1, 7.0, "DPM++ 2M"),
    "guess mode with CFG": (dict(guess_mode=True), 1, 5.0, "Euler"),
    "batch 2": (dict(weight=1.2), 2, 7.0, "Euler a"),
    "no CFG": (dict(weight=0.8), 1, 1.0, "DDIM"),
}


@pytest.mark.parametrize("case", CASES)
def test_txt2img_matches_diffusers(base_model, base_pipe, cn_folders, cns, case):
    unit, batch, cfg, sampler = CASES[case]
    kw = dict(negative_prompt="blurry", width=W, height=H, steps=5, guidance_scale=cfg, seed=42, batch_size=batch,
              sampler=sampler, schedule="Automatic")
    ours = base_pipe.txt2img("a house", control=[ldm.ControlUnit(cns[0], control_image(), **unit)], **kw)
    ref = reference(StableDiffusionControlNetPipeline, base_model, cn_folders, 1, sampler, ours.seeds)
    theirs = ref("a house", image=control_image(), negative_prompt="blurry", width=W, height=H, num_inference_steps=5,
                 guidance_scale=cfg, num_images_per_prompt=batch, generator=gens(42, batch),
                 controlnet_conditioning_scale=unit.get("weight", 1.0), guess_mode=unit.get("guess_mode", False),
                 control_guidance_start=unit.get("start", 0.0), control_guidance_end=unit.get("end", 1.0)).images
    plain = base_pipe.txt2img("a house", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"controlnet parity txt2img {case}: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


def test_two_units_match_multi_controlnet(base_model, base_pipe, cn_folders, cns):
    images = [control_image(0), control_image(5)]
    units = [ldm.ControlUnit(cns[0], images[0], weight=0.9, start=0.0, end=0.6),
             ldm.ControlUnit(cns[1], images[1], weight=0.6, start=0.2, end=1.0)]
    kw = dict(width=W, height=H, steps=5, guidance_scale=6.0, seed=3, sampler="Euler a", schedule="Automatic")
    ours = base_pipe.txt2img("a tree", control=units, **kw)
    ref = reference(StableDiffusionControlNetPipeline, base_model, cn_folders, 2, "Euler a", ours.seeds)
    theirs = ref("a tree", image=images, width=W, height=H, num_inference_steps=5, guidance_scale=6.0,
                 generator=gens(3, 1), controlnet_conditioning_scale=[0.9, 0.6], control_guidance_start=[0.0, 0.2],
                 control_guidance_end=[0.6, 1.0]).images
    single = base_pipe.txt2img("a tree", control=units[:1], **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, single.images)
    print(f"controlnet parity two units: max pixel diff {diff}, second unit's effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE  # the second unit adds to the first
    assert "ControlNet 0: " in ours.infotexts[0] and "ControlNet 1: " in ours.infotexts[0]


def test_control_image_of_another_size_is_resized_like_diffusers(base_model, base_pipe, cn_folders, cns):
    big = control_image(7, 50, 45)
    kw = dict(width=W, height=H, steps=3, seed=8, sampler="Euler", schedule="Automatic")
    ours = base_pipe.txt2img("a boat", control=[ldm.ControlUnit(cns[0], big, resize="just")], **kw)
    ref = reference(StableDiffusionControlNetPipeline, base_model, cn_folders, 1, "Euler", ours.seeds)
    theirs = ref("a boat", image=big, width=W, height=H, num_inference_steps=3, guidance_scale=7.0,
                 generator=gens(8, 1)).images
    assert max_diff(ours.images, theirs) <= TOL


@pytest.mark.parametrize("batch,strength,sampler", [(1, 0.75, "Euler a"), (2, 0.6, "DPM++ 2M")])
def test_img2img_matches_diffusers(base_model, base_pipe, cn_folders, cns, batch, strength, sampler):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    unit = ldm.ControlUnit(cns[0], control_image(1), weight=0.9, start=0.0, end=0.8)
    kw = dict(strength=strength, steps=6, seed=9, batch_size=batch, sampler=sampler, schedule="Automatic",
              guidance_scale=6.0)
    ours = base_pipe.img2img(init, "a watercolor", control=[unit], **kw)
    ref = reference(StableDiffusionControlNetImg2ImgPipeline, base_model, cn_folders, 1, sampler, ours.seeds)
    theirs = ref("a watercolor", image=init, control_image=control_image(1), strength=strength, num_inference_steps=6,
                 guidance_scale=6.0, num_images_per_prompt=batch, generator=gens(9, batch),
                 controlnet_conditioning_scale=0.9, control_guidance_end=0.8, width=W, height=H).images
    plain = base_pipe.img2img(init, "a watercolor", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"controlnet parity img2img batch {batch}: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    return tiny.save_model(tmp_path_factory.mktemp("tiny-inpaint-cn"), unet_model=tiny.unet(seed=1, in_channels=9),
                           pipeline_class="StableDiffusionInpaintPipeline")


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_inpaint_matches_diffusers(base_model, base_pipe, inpaint_model, cn_folders, cns, kind):
    folder = base_model if kind == "base" else inpaint_model
    pipe = base_pipe if kind == "base" else ldm.load(inpaint_model, device="cpu", dtype="float32")
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), np.uint8)
    mask[8:30, 6:24] = 255
    unit = ldm.ControlUnit(cns[0], control_image(2), weight=1.0, guess_mode=kind == "inpaint")
    kw = dict(strength=1.0, mask_blur=0, steps=4, seed=9, sampler="Euler a", schedule="Automatic", guidance_scale=6)
    ours = pipe.inpaint(image, Image.fromarray(mask), "a cat", control=[unit], **kw)
    ref = reference(StableDiffusionControlNetInpaintPipeline, folder, cn_folders, 1, "Euler a", ours.seeds)
    theirs = ref("a cat", image=image, mask_image=Image.fromarray(mask), control_image=control_image(2), strength=1.0,
                 width=W, height=H, num_inference_steps=4, guidance_scale=6, generator=gens(9, 1),
                 controlnet_conditioning_scale=1.0, guess_mode=kind == "inpaint").images  # its default is 0.5
    plain = pipe.inpaint(image, Image.fromarray(mask), "a cat", **kw)
    inside = mask >= 128  # diffusers does not paste back: compare the repainted area
    diff = int(np.abs(px(ours.images[0]) - px(theirs[0]))[inside].max())
    effect = int(np.abs(px(ours.images[0]) - px(plain.images[0]))[inside].max())
    print(f"controlnet parity inpaint ({kind} model): max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


# ---- the cost of a unit, control modes ---------------------------------------------------------------


def test_hires_fix_with_control_guides_the_second_pass_at_the_hires_size(base_pipe, cns):
    """As A1111's extension ("Both"): the first pass is txt2img with the units; the second is exactly img2img of
    the Lanczos-enlarged first picture with the same units, their images fitted to the hires size."""
    unit = ldm.ControlUnit(cns[0], control_image(4, 48, 60), weight=0.9, end=0.8, preprocessor="invert")
    kw = dict(width=W, height=H, steps=4, seed=6, sampler="DDIM")
    ours = base_pipe.txt2img("a house", control=[unit], hires_scale=2, hires_upscaler="lanczos", hires_strength=0.6,
                             **kw)
    first = base_pipe.txt2img("a house", control=[unit], **kw)
    big = first.images[0].resize((2 * W, 2 * H), Image.LANCZOS)
    ref = base_pipe.img2img(big, "a house", strength=0.6, steps=4, seed=6, sampler="DDIM", control=[unit])
    unguided = base_pipe.img2img(big, "a house", strength=0.6, steps=4, seed=6, sampler="DDIM")
    assert ours.images[0].size == (2 * W, 2 * H)
    assert max_diff(ours.images, ref.images) == 0
    assert max_diff(ref.images, unguided.images) > VISIBLE  # the control steers the second pass too
    info = parse_infotext(ours.infotexts[0])
    assert info["ControlNet 0"] == unit.validate().infotext() and info["Hires upscale"] == "2"
    latent = base_pipe.txt2img("a house", control=[unit], hires_scale=1.5, **kw)  # the default (latent) upscaler
    assert latent.images[0].size == (48, 56) and "ControlNet 0" in latent.infotexts[0]


def count_calls(module) -> tuple[list, object]:
    calls = []
    return calls, module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] if i else None))


def test_a_unit_outside_its_range_costs_nothing(base_pipe, cns):
    kw = dict(width=W, height=H, steps=5, seed=1, sampler="Euler")
    calls, hook = count_calls(cns[0].module)
    try:
        base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0], control_image(), start=0.2, end=0.8)], **kw)
        assert len(calls) == 3  # steps 1, 2, 3 of 0..4: 0/5 < 0.2 and 5/5 > 0.8 are outside
        calls.clear()
        base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0], control_image(), weight=0.0)], **kw)
        assert calls == []
        base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0], control_image(), guess_mode=True)], **kw)
        assert calls == [1] * 5  # guess mode with CFG: the conditional half only
    finally:
        hook.remove()


def test_control_modes_map_onto_guess_mode_and_soft(base_pipe, cns):
    assert set(ldm.CONTROL_MODES) == {"Balanced", "My prompt is more important", "ControlNet is more important"}
    kw = dict(width=W, height=H, steps=3, seed=4, sampler="Euler")
    out = {}
    for mode in ldm.CONTROL_MODES:
        unit = ldm.ControlUnit.a1111(cns[0], control_image(), control_mode=mode)
        assert unit.control_mode == mode
        res = base_pipe.txt2img("x", control=[unit], **kw)
        assert f"Control Mode: {mode}" in parse_infotext(res.infotexts[0])["ControlNet 0"]
        out[mode] = res.images
    assert max_diff(out["Balanced"], out["My prompt is more important"]) > 0
    assert max_diff(out["My prompt is more important"], out["ControlNet is more important"]) > 0
    # Without CFG the two scaled modes are the same computation (no unconditional half to leave out).
    no_cfg = [base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0], control_image(), **s)], guidance_scale=1, **kw).images
              for s in (dict(soft=True), dict(guess_mode=True))]
    assert max_diff(*no_cfg) == 0
    with pytest.raises(ValueError, match="unknown control mode"):
        ldm.ControlUnit.a1111(cns[0], control_image(), control_mode="Prompt")


# ---- infotext -----------------------------------------------------------------------------------------


def test_infotext_is_written_as_the_a1111_extension_writes_it(base_pipe, cns, cn_folders):
    unit = ldm.ControlUnit(cns[0], control_image(), preprocessor="canny", weight=0.7, start=0.1, end=0.9,
                           settings={"low": 50})
    res = base_pipe.txt2img("a cat", control=[unit], width=W, height=H, steps=2, seed=3)
    info = parse_infotext(res.infotexts[0])
    name = cn_folders[0].name
    assert re.fullmatch(r"[0-9a-f]{8}", cns[0].short_hash)
    assert info["ControlNet 0"] == (f"Module: canny, Model: {name} [{cns[0].short_hash}], Weight: 0.7, Resize Mode: "
                                    "Crop and Resize, Threshold A: 50.0, Threshold B: 200.0, Guidance Start: 0.1, "
                                    "Guidance End: 0.9, Pixel Perfect: True, Control Mode: Balanced")
    assert f'ControlNet 0: "Module: canny, Model: {name} [' in res.infotexts[0]  # quoted as A1111 quotes it
    # A1111's reader splits the unit on ", " and ": ".
    fields = dict(item.strip().split(": ") for item in info["ControlNet 0"].split(","))
    assert fields["Guidance Start"] == "0.1" and fields["Module"] == "canny"
    # ... and read back into unit fields (what PNG info / "send to" fills).
    from ldm.controlnet import parse_unit_infotext

    assert parse_unit_infotext(info["ControlNet 0"]) == {
        "preprocessor": "canny", "model_title": f"{name} [{cns[0].short_hash}]", "weight": 0.7, "start": 0.1,
        "end": 0.9, "resize": "crop", "control_mode": "Balanced", "settings": {"low": 50.0, "high": 200.0}}
    a1111 = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Just Resize, Low Vram: "
             "False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
             "Pixel Perfect: False, Control Mode: ControlNet is more important, Hr Option: Both")
    parsed = parse_unit_infotext(a1111)
    assert parsed["resize"] == "just" and parsed["control_mode"] == "ControlNet is more important"
    assert parsed["weight"] == 1.0 and parsed["settings"] == {"low": 100.0, "high": 200.0}


# ---- bad input: refused before any model work -----------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_controlnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cn-other")
    random_controlnet(tiny.unet(cross_attention_dim=64), 3).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("change,match", [
    (dict(start=0.5, end=0.5), "start .* must be before end"),
    (dict(start=0.8, end=0.2), "start .* must be before end"),
    (dict(weight=3), r"weight must be a number from 0 to 2"),
    (dict(weight=-0.1), r"weight must be a number from 0 to 2"),
    (dict(end=1.5), r"end must be a number from 0 to 1"),
    (dict(image=b"not an image"), "ControlNet image: not an image"),
    (dict(image="/no/such/file.png"), "ControlNet image not found"),
    (dict(preprocessor="depth_midas"), "unknown preprocessor 'depth_midas'"),
    (dict(preprocessor="canny", settings={"low": 999}), "Canny low threshold must be from 1 to 255"),
    (dict(preprocessor="canny", settings={"low": -1}), r"Canny low threshold must be from 1 to 255, got -1"),  # not "default"
    (dict(preprocessor="canny", settings={"sigma": 1}), "has no setting 'sigma'"),
    (dict(resize="stretch"), "unknown ControlNet resize mode"),
    (dict(guess_mode="yes"), "guess_mode must be True or False"),
    (dict(model="control_v11p_sd15_canny"), "must be a ControlNet from ldm.load_controlnet"),
])
def test_bad_units_are_refused_before_model_work(base_pipe, cns, change, match):
    fields = {"model": cns[0], "image": control_image(), **change}
    calls, hooks = [], [m.register_forward_hook(lambda *a: calls.append(1)) for m in (base_pipe.unet, cns[0].module)]
    try:
        with pytest.raises(ValueError, match=match):
            base_pipe.txt2img("x", control=[ldm.ControlUnit(**fields)], width=W, height=H, steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_too_large_control_image_is_refused(cns):
    huge = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(huge, format="PNG")
    with pytest.raises(ValueError, match="ControlNet image: image is 5000x4000 pixels; the limit is"):
        ldm.ControlUnit(cns[0], huge.getvalue()).validate()


def test_controlnet_of_another_family_is_refused(base_pipe, cns, sd2_controlnet):
    calls, hook = count_calls(base_pipe.unet)
    try:
        with pytest.raises(ValueError, match=r"is for an unknown family \(cross-attention 64\) but the model is"):
            ldm.load_controlnet(sd2_controlnet, base=base_pipe)
        other = ldm.load_controlnet(sd2_controlnet)  # without base nothing to compare: refused at generation
        with pytest.raises(ValueError, match=r"cross-attention 64\) but the model is an unknown family \(cross-attention 32\)"):
            base_pipe.txt2img("x", control=[ldm.ControlUnit(other, control_image())], width=W, height=H, steps=2)
    finally:
        hook.remove()
    assert calls == []


def test_sdxl_controlnet_names_the_families():
    from ldm.controlnet_file import check_family

    unet = dict(tiny.unet(cross_attention_dim=768).config)
    sdxl = {**unet, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}
    with pytest.raises(ValueError, match=r"is for SDXL \(cross-attention 2048\) but the model is SD 1.x \(cross-attention 768\)"):
        check_family(sdxl, unet, "controlnet-canny-sdxl")


def test_fast_preset_is_refused_with_control(base_pipe, cns):
    unit = ldm.ControlUnit(cns[0], control_image())
    calls, hook = count_calls(base_pipe.unet)
    try:
        with pytest.raises(ValueError, match="fast preset cannot be combined with ControlNet"):
            base_pipe.txt2img("x", control=[unit], fast=True, width=W, height=H, steps=2)
        with pytest.raises(ValueError, match="fast preset cannot be combined with ControlNet"):
            base_pipe.txt2img("x", control=[unit], fast=True, hires_scale=2, width=W, height=H, steps=2)
        with pytest.raises(ValueError, match="list of ldm.ControlUnit"):
            base_pipe.txt2img("x", control=[{"model": cns[0]}], width=W, height=H, steps=2)
    finally:
        hook.remove()
    assert calls == []


def test_controlnet_in_another_dtype_is_refused_with_a_hint(base_pipe, cn_folders):
    cn = ldm.load_controlnet(cn_folders[0], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"load it with ldm.load_controlnet\(path, base=pipe\)"):
        base_pipe.txt2img("x", control=[ldm.ControlUnit(cn, control_image())], width=W, height=H, steps=2)


# ---- inpainting "only masked", outpainting ------------------------------------------------------------


def test_only_masked_crops_the_control_image_like_the_image(base_pipe, cns):
    marker = np.zeros((64, 64, 3), np.uint8)
    marker[32:48, 32:48] = 255  # the masked area's part of the control map
    unit = ldm.ControlUnit(cns[0], Image.fromarray(marker))
    crop = unit.control_map(32, 32, canvas=(64, 64), region=(24, 24, 56, 56))
    assert np.asarray(crop)[8:24, 8:24].min() == 255 and np.asarray(crop)[:6, :6].max() == 0
    mask = np.zeros((64, 64), np.uint8)
    mask[30:50, 30:50] = 255
    res = base_pipe.inpaint(control_image(0, 64, 64), Image.fromarray(mask), "x", control=[unit], inpaint_area="masked",
                            padding=4, width=32, height=32, steps=2, seed=1)
    assert res.images[0].size == (64, 64) and "ControlNet 0" in res.infotexts[0]
    out = base_pipe.outpaint(control_image(0), "x", right=16, control=[unit], steps=2, seed=1)
    assert out.images[0].size == (W + 16, H) and "ControlNet 0" in out.infotexts[0]


# ---- loading ----------------------------------------------------------------------------------------


def test_load_errors_are_readable(tmp_path, base_pipe, cn_folders):
    with pytest.raises(ldm.ModelLoadError, match="ControlNet not found"):
        ldm.load_controlnet(tmp_path / "missing")
    pth = tmp_path / "control_sd15_canny.pth"
    pth.write_bytes(b"\x80\x02junk")
    with pytest.raises(ldm.ModelLoadError, match="pickle formats"):
        ldm.load_controlnet(pth)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((cn_folders[0] / "config.json").read_text())
    with pytest.raises(ldm.ModelLoadError, match="no .safetensors weights"):
        ldm.load_controlnet(empty)
    with pytest.raises(ValueError, match="pass base="):
        ldm.load_controlnet(tmp_path / "x.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ldm.ModelLoadError, match="corrupt or incomplete"):
        ldm.load_controlnet(bad, base=base_pipe)


def test_a_raw_controlnet_module_is_accepted(base_pipe, cns):
    kw = dict(width=W, height=H, steps=2, seed=2)
    a = base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0].module, control_image())], **kw)
    b = base_pipe.txt2img("x", control=[ldm.ControlUnit(cns[0], control_image())], **kw)
    assert max_diff(a.images, b.images) == 0
    assert isinstance(cns[0], ControlNet) and cns[0].title.startswith(cns[0].name + " [")


# ---- preprocessors (golden properties on small images) ------------------------------------------------


from ldm.control_preprocess import PREPROCESSORS, preprocess  # noqa: E402


def square(size=32, box=(8, 8, 24, 24), fg=255, bg=0) -> Image.Image:
    a = np.full((size, size, 3), bg, np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = fg
    return Image.fromarray(a)


def grey(image) -> np.ndarray:
    a = np.asarray(image)
    assert image.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def test_the_table_lists_the_model_free_preprocessors_with_valid_defaults():
    assert list(PREPROCESSORS) == ["none", "canny", "lineart_standard", "scribble_xdog", "invert", "tile_resample",
                                   "blur_gaussian", "shuffle"]
    assert ldm.PREPROCESSORS is PREPROCESSORS
    for pre in PREPROCESSORS.values():
        for s in pre.settings:
            assert s.minimum <= s.default <= s.maximum and s.step > 0
        assert preprocess(square(), pre.name).size == (32, 32) or pre.name == "tile_resample"


def test_none_and_invert_are_exact():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(preprocess(img, "none")), np.asarray(img))
    assert np.array_equal(np.asarray(preprocess(img, "invert")), 255 - np.asarray(img))


def test_canny_of_a_white_square_is_its_outline():
    edges = grey(preprocess(square(), "canny")) > 0
    assert set(np.unique(grey(preprocess(square(), "canny")))) == {0, 255}
    ys, xs = np.nonzero(edges)
    # Every edge pixel lies on the square's border (within a pixel), and all four sides are found.
    near = lambda v, a, b: (np.abs(v - a) <= 1) | (np.abs(v - b) <= 1)  # noqa: E731
    assert (near(xs, 8, 23) | near(ys, 8, 23)).all()
    assert {(xs <= 9).any(), (xs >= 22).any(), (ys <= 9).any(), (ys >= 22).any()} == {True}
    assert not edges[12:20, 12:20].any() and not edges[:5].any() and not edges[:, -5:].any()
    # A low-contrast square is below the default thresholds, and found with lower ones.
    faint = square(fg=20)
    assert grey(preprocess(faint, "canny")).max() == 0
    assert grey(preprocess(faint, "canny", {"low": 10, "high": 20})).max() == 255


def test_lineart_finds_dark_lines_on_white():
    a = np.full((40, 40, 3), 255, np.uint8)
    a[:, 19:21] = 0  # a black vertical line
    out = grey(preprocess(Image.fromarray(a), "lineart_standard"))
    assert out[:, 19:21].min() > 100  # the line becomes bright
    assert out[:, :10].max() == 0 and out[:, 30:].max() == 0  # flat white stays black


def test_scribble_xdog_is_binary_and_follows_the_line():
    a = np.full((40, 40, 3), 255, np.uint8)
    a[19:21, :] = 0
    out = grey(preprocess(Image.fromarray(a), "scribble_xdog"))
    assert set(np.unique(out)) == {0, 255}
    assert out[19:21].min() == 255 and out[:8].max() == 0 and out[32:].max() == 0
    a[19:21, :] = 220  # a faint line: kept at the default threshold, dropped at a high one
    assert grey(preprocess(Image.fromarray(a), "scribble_xdog"))[19:21].min() == 255
    assert grey(preprocess(Image.fromarray(a), "scribble_xdog", {"threshold": 64})).max() == 0


def test_tile_and_blur():
    img = square()
    assert np.array_equal(np.asarray(preprocess(img, "tile_resample")), np.asarray(img))  # rate 1: unchanged
    small = preprocess(img, "tile_resample", {"rate": 4})
    assert small.size == (8, 8) and np.asarray(small)[3, 3, 0] == 255 and np.asarray(small)[0, 0, 0] == 0
    flat = Image.new("RGB", (16, 16), (90, 120, 200))
    assert np.array_equal(np.asarray(preprocess(flat, "blur_gaussian")), np.asarray(flat))  # constant stays constant
    blurred = grey(preprocess(img, "blur_gaussian", {"sigma": 2}))
    assert 0 < blurred[8, 8] < 255 and blurred[16, 16] > blurred[8, 8] > blurred[2, 2]


def test_shuffle_is_seeded_and_keeps_the_colours():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    a, b, c = (np.asarray(preprocess(img, "shuffle", seed=s)) for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    flat = Image.new("RGB", (24, 24), (10, 200, 30))
    assert np.array_equal(np.asarray(preprocess(flat, "shuffle", seed=5)), np.asarray(flat))


def test_control_map_fits_the_image_like_diffusers_resize_modes():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    img = control_image(3, 50, 30)
    for ours, theirs in (("just", "default"), ("crop", "crop"), ("fill", "fill")):
        mine = np.asarray(ldm.ControlUnit(None, img, resize=ours).control_map(40, 48))
        ref = proc.preprocess(img, height=48, width=40, resize_mode=theirs)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(mine, (ref * 255).round().astype(np.uint8)), ours
        label = ldm.RESIZE_MODES[ours]  # A1111's name for the same mode
        assert np.array_equal(np.asarray(ldm.ControlUnit(None, img, resize=label).control_map(40, 48)), mine)


# ---- single-file ControlNets (original layout, A1111's models/ControlNet) -------------------------------


def original_controlnet_layout(net: ControlNetModel, prefix: str = "") -> dict:
    """diffusers -> the original ControlNet key layout (diffusers converts only the other way)."""
    from test_safety_loading import _unet_key

    n_blocks = len(net.controlnet_cond_embedding.blocks)
    out = {}
    for key, value in net.state_dict().items():
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", key):
            index = 0 if m[1] == "conv_in" else 2 * (n_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
            name = f"input_hint_block.{index}.{m[3]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
            name = f"middle_block_out.0.{m[1]}"
        elif m := re.fullmatch(r"add_embedding\.linear_([12])\.(weight|bias)", key):  # SDXL's pooled + time ids
            name = f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"
        else:
            name = _unet_key(key, net.config)
        out[prefix + name] = value.contiguous()
    assert len(out) == len(net.state_dict())
    return out


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_single_original_layout_file_loads_with_a_config_from_the_base(base_pipe, tmp_path, prefix):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # The real conditioning embedding: 4 widths (3 downsamplings), input_hint_block.0 ... .14.
    net = ControlNetModel.from_unet(tiny.unet(), conditioning_embedding_out_channels=(4, 8, 8, 16))
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    file = tmp_path / "control_v11p_tiny_canny.safetensors"
    save_file(original_controlnet_layout(net, prefix), str(file))
    loaded = ldm.load_controlnet(file, base=base_pipe)
    assert loaded.name == "control_v11p_tiny_canny" and not loaded.config.global_pool_conditions
    assert list(loaded.config.conditioning_embedding_out_channels) == [4, 8, 8, 16]
    ours, theirs = loaded.module.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    import hashlib
    data = file.read_bytes()
    assert loaded.short_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # The same weights under diffusers' names in one file load too.
    flat = tmp_path / "tiny_shuffle.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(flat))
    again = ldm.load_controlnet(flat, base=base_pipe)
    assert again.config.global_pool_conditions  # a shuffle model pools its conditions, as A1111's yaml says
    assert all(torch.equal(again.module.state_dict()[k], theirs[k]) for k in theirs)


def test_single_file_of_another_family_is_refused_before_its_weights_are_read(base_pipe, tmp_path):
    from safetensors.torch import save_file

    net = ControlNetModel.from_unet(tiny.unet(cross_attention_dim=48), conditioning_embedding_out_channels=(4, 8, 8, 16))
    file = tmp_path / "control_sd21_tiny.safetensors"
    save_file(original_controlnet_layout(net), str(file))
    with pytest.raises(ValueError, match=r"\(cross-attention 48\) but the model is"):
        ldm.load_controlnet(file, base=base_pipe)
    sdxl = tmp_path / "controlnet_sdxl.safetensors"
    save_file({**original_controlnet_layout(net), "label_emb.0.0.weight": torch.zeros(4, 4)}, str(sdxl))
    with pytest.raises(ValueError, match=r"is for SDXL \(cross-attention"):
        ldm.load_controlnet(sdxl, base=base_pipe)


def test_a_controlnet_is_found_by_name_in_the_models_folder(base_model, cn_folders, tmp_path):
    import shutil

    root = tmp_path / "models"
    shutil.copytree(cn_folders[0], root / "ControlNet" / "sub" / "control_tiny_canny")
    pipe = ldm.load(base_model, models_dir=root, device="cpu", dtype="float32")
    cn = ldm.load_controlnet("control_tiny_canny", base=pipe)
    assert cn.name == "control_tiny_canny" and cn.path == root / "ControlNet" / "sub" / "control_tiny_canny"
    with pytest.raises(ValueError, match="control_tiny_cany"):
        ldm.load_controlnet("control_tiny_cany", base=pipe)
