"""SDXL single-file checkpoints (original layout: `conditioner.embedders.0/1`, `model.diffusion_model`,
`first_stage_model`) load offline to the same tensors as the diffusers folder; the bundled
ldm/configs/sdxl has the real SDXL shapes (parameter counts on the meta device)."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import ldm
import tiny_sdxl
from ldm import ModelKind, ModelLoadError, single_file
from test_safety_loading import _unet_key, _vae_key  # the SD 1.x original-layout writer, shared

GEN = dict(width=32, height=24, steps=3, seed=5, sampler="Euler", negative_prompt="fog")
_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def _open_clip_layout(model: CLIPTextModelWithProjection, prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection -> OpenCLIP names: fused q/k/v, transposed projection."""
    sd = model.state_dict()
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T}
    for i in range(model.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for ours, theirs in _OPEN_CLIP.items():
                out[f"{block}{theirs}.{kind}"] = sd[f"{layer}{ours}.{kind}"]
    return out


def sdxl_original_layout(folder) -> dict[str, torch.Tensor]:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder") if (folder / "text_encoder").is_dir() else None
    bigg = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    out = {}
    for k, v in unet.state_dict().items():
        m = re.fullmatch(r"add_embedding\.linear_(\d)\.(.+)", k)
        name = f"label_emb.0.{2 * (int(m[1]) - 1)}.{m[2]}" if m else _unet_key(k, unet.config)
        out["model.diffusion_model." + name] = v
    for k, v in vae.state_dict().items():
        name = _vae_key(k, len(vae.config.block_out_channels))
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name):
            v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    for k, v in (clip.state_dict() if clip is not None else {}).items():
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    out.update(_open_clip_layout(bigg, "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-folder"))


@pytest.fixture(scope="module")
def sdxl_file(sdxl_folder, tmp_path_factory):
    file = tmp_path_factory.mktemp("sdxl-single") / "tiny-sdxl.safetensors"
    save_file(sdxl_original_layout(sdxl_folder), file)
    return file


@pytest.fixture(scope="module")
def tiny_config(sdxl_folder, tmp_path_factory):
    """The folder's JSON configs only: no weights, no tokenizers (the bundled CLIP tokenizer is used for both)."""
    dest = tmp_path_factory.mktemp("sdxl-cfg") / "tiny-sdxl-config"
    shutil.copytree(sdxl_folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer", "tokenizer_2"))
    return dest


def test_single_file_loads_to_the_same_tensors_as_the_folder(sdxl_file, sdxl_folder, tiny_config):
    keys = set(single_file.read_state_dict(sdxl_file))
    for k in ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
              "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
              "first_stage_model.encoder.mid.attn_1.q.weight"):
        assert k in keys  # really the original layout
    from_file = ldm.load(sdxl_file, config=tiny_config, device="cpu", dtype="float32")
    from_folder = ldm.load(sdxl_folder, device="cpu", dtype="float32")
    assert from_file.family.name == "sdxl" and from_file.name == "tiny-sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = getattr(from_file.components, part).state_dict()
        theirs = getattr(from_folder.components, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert from_file.components.tokenizer_2.pad_token_id == 0  # bundled tokenizer, OpenCLIP padding
    a, b = from_file.txt2img("a red fox", **GEN), from_folder.txt2img("a red fox", **GEN)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_without_config_the_bundled_sdxl_config_is_used(sdxl_file):
    # The tiny weights do not fit the real SDXL shapes: the error names the bundled config folder.
    with pytest.raises(ModelLoadError, match=r"configs/sdxl"):
        ldm.load(sdxl_file, device="cpu", dtype="float32")


def refiner_original_layout(folder) -> dict[str, torch.Tensor]:
    """An SDXL refiner file: U-Net and VAE as the base's, bigG alone under conditioner.embedders.0.model."""
    layout = sdxl_original_layout(folder)  # the refiner folder has no first encoder: nothing under embedders.0
    return {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in layout.items()}


def test_refiner_file_loads_to_the_same_tensors_as_the_folder(tmp_path):
    folder = tiny_sdxl.save_refiner(tmp_path / "tiny-refiner")
    file = tmp_path / "tiny-refiner.safetensors"
    save_file(refiner_original_layout(folder), file)
    config = tmp_path / "refiner-config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer_2"))
    from_file = ldm.load(file, config=config, device="cpu", dtype="float32")
    from_folder = ldm.load(folder, device="cpu", dtype="float32")
    assert from_file.kind is ModelKind.REFINER and from_file.family.is_refiner
    assert from_file.components.text_encoder is None
    for part in ("unet", "vae", "text_encoder_2"):
        ours, theirs = getattr(from_file.components, part).state_dict(), getattr(from_folder.components, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    with pytest.raises(ValueError, match="txt2img needs a base model.*refiner"):
        from_file.txt2img("x", width=32, height=24)


def test_unknown_sdxl_text_encoder_layout_names_what_it_found(sdxl_file, tmp_path):
    sd = single_file.read_state_dict(sdxl_file)
    odd = {k.replace("conditioner.embedders.1.", "conditioner.embedders.5."): v for k, v in sd.items()}
    file = tmp_path / "odd.safetensors"
    save_file(odd, file)
    with pytest.raises(ModelLoadError, match=r"found conditioner\.embedders\.0\.transformer.*conditioner\.embedders\.5"):
        ldm.load(file, device="cpu", dtype="float32")


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_bundled_refiner_config_has_the_real_shapes():
    """U-Net: diffusers' own translation of generative-models' sd_xl_refiner.yaml gives 2,259,526,660 parameters."""
    folder = single_file.SDXL_REFINER_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    assert count(unet) == 2_259_526_660 and count(bigg) == 694_659_840
    assert unet.add_embedding.linear_1.in_features == 5 * 256 + 1280  # sizes + aesthetic score, pooled bigG
    assert not (folder / "text_encoder").exists()


def test_bundled_sdxl_configs_have_the_real_shapes():
    folder = single_file.SDXL_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert count(unet) == 2_567_463_684
    assert count(bigg) == 694_659_840
    assert count(clip) == 123_060_480 and count(vae) == 83_653_863
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "leading"


def test_an_fp16_file_loads_converted_tensor_by_tensor(sdxl_folder, tiny_config, tmp_path):
    """Each tensor is converted to its component's dtype as it is read (peak memory: the converted model plus
    one tensor); fp16 weights keep SDXL's VAE in float32 (force_upcast)."""
    file = tmp_path / "tiny-sdxl-fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sdxl_original_layout(sdxl_folder).items()}, file)
    half = ldm.load(file, config=tiny_config, device="cpu", dtype="float16")
    assert half.unet.dtype == half.components.text_encoder_2.dtype == torch.float16 and half.vae.dtype == torch.float32
    bf16 = ldm.load(file, config=tiny_config, device="cpu", dtype="bfloat16")
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    full = ldm.load(sdxl_folder, device="cpu", dtype="float32")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(half.components, part).state_dict(), getattr(full.components, part).state_dict()
        assert all(torch.equal(ours[k].float(), theirs[k].half().float()) for k in theirs if theirs[k].is_floating_point()), part
