"""Model files as an attack surface: single-file checkpoints load offline; pickles never run code;
truncated or disguised files are refused by content, before any parser sees them."""
import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import ldm
import tiny
from ldm import single_file
from ldm import ModelKind, ModelLoadError
from ldm.devices import ComponentDtypes
from ldm_tools.bench import sdxl_file

GEN = dict(width=32, height=32, steps=2, seed=5, sampler="Euler")


# ---- writing the original (CompVis) key layout from diffusers models ------------------------------
# diffusers only converts original -> diffusers; the tests need the other direction to build a
# checkpoint like the ones model sites share. Written from the layout, checked by loading it back.

# diffusers key -> original-layout key: the bench's SDXL file writer owns the mapping; these tests use it for every family
_unet_key, _vae_key = sdxl_file.unet_key, sdxl_file.vae_key


def original_layout(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(k, unet.config)] = v
    for k, v in vae.state_dict().items():
        name = _vae_key(k, len(vae.config.block_out_channels))
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name):
            v = v[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out["first_stage_model." + name] = v
    for k, v in text_encoder.state_dict().items():
        out["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in SD 1.5 files
    assert len(out) == len(unet.state_dict()) + len(vae.state_dict()) + len(text_encoder.state_dict()) + 1
    return {k: v.contiguous() for k, v in out.items()}


def components_of(folder: Path):
    return (UNet2DConditionModel.from_pretrained(folder / "unet"), AutoencoderKL.from_pretrained(folder / "vae"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"))


def config_only(folder: Path, dest: Path) -> Path:
    """The JSON configs of a diffusers folder, without weights or tokenizer (the bundled tokenizer is used)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "tokenizer"))
    return dest


@pytest.fixture(scope="module")
def sd_file(base_model, tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    save_file(original_layout(*components_of(base_model)), file)
    return file


@pytest.fixture(scope="module")
def tiny_config(base_model, tmp_path_factory) -> Path:
    return config_only(base_model, tmp_path_factory.mktemp("cfg") / "tiny-config")


def same_image(a, b) -> bool:
    return np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# ---- single-file checkpoints --------------------------------------------------------------------


def test_single_file_generates_the_same_image_as_the_diffusers_folder(sd_file, tiny_config, base_pipe):
    keys = set(single_file.read_state_dict(sd_file))
    for k in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.out.2.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
              "first_stage_model.encoder.mid.attn_1.q.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert k in keys  # really the original layout, not diffusers keys under a prefix
    pipe = ldm.load(sd_file, config=tiny_config, device="cpu", dtype="float32")
    assert pipe.kind is ModelKind.BASE and pipe.name == "tiny-sd15"
    assert same_image(pipe.txt2img("a red fox", **GEN), base_pipe.txt2img("a red fox", **GEN))
    assert "Model: tiny-sd15," in pipe.txt2img("x", **GEN).infotexts[0]


def test_inpainting_and_v_prediction_are_read_from_the_weights(base_model, tiny_config, tmp_path):
    unet9 = tiny.unet(seed=4, in_channels=9)
    _, vae, text = components_of(base_model)
    sd = original_layout(unet9, vae, text)
    sd["v_pred"] = torch.tensor([])  # the marker v-prediction trainers add
    save_file(sd, tmp_path / "inpaint.safetensors")
    dtypes = ComponentDtypes(text_encoder=torch.bfloat16, unet=torch.bfloat16, vae=torch.float32)
    comps = single_file.load_single_file(tmp_path / "inpaint.safetensors", device=torch.device("cpu"),
                                         dtype=dtypes, config=tiny_config)
    assert comps.kind is ModelKind.INPAINT and comps.unet.config.in_channels == 9
    assert comps.scheduler_config["prediction_type"] == "v_prediction"
    assert torch.equal(comps.unet.conv_in.weight, unet9.conv_in.weight.bfloat16())
    assert (comps.text_encoder.dtype, comps.unet.dtype, comps.vae.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def _fake_checkpoint(path: Path, keys: dict[str, tuple]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


SD1_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": (4, 4, 1, 1),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}


@pytest.mark.parametrize("keys, message", [
    (SD1_KEYS, r"(do not fit|incomplete for) the config in .*configs/sd15"),  # SD 1.x keys, wrong shapes
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": (4, 4, 1, 1),
      "cond_stage_model.model.token_embedding.weight": (2, 2)}, r"do not fit the config in .*configs/sd2.*supported single-file"),
    ({"conditioner.embedders.1.model.positional_embedding": (2, 2), **SD1_KEYS}, r"SDXL.*supported single-file"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (2, 2)}, r"not a full Stable Diffusion checkpoint.*LoRA"),
    ({**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 7, 3, 3)}, r"7 input channels.*diffusers folder"),
    ({k: v for k, v in SD1_KEYS.items() if not k.startswith("first")}, r"has no VAE"),
])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, keys, message):
    file = _fake_checkpoint(tmp_path / "m.safetensors", keys)
    with pytest.raises(ModelLoadError, match=message):
        ldm.load(file, device="cpu")


def test_bundled_sd15_configs_build_the_sd15_architecture():
    from diffusers import PNDMScheduler

    folder = single_file.SD15_CONFIG
    with torch.device("meta"):  # full size, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD 1.5's U-Net, VAE and CLIP ViT-L/14 text model
    assert (text.config.hidden_act, text.config.num_hidden_layers, text.config.max_position_embeddings) == ("quick_gelu", 12, 77)
    assert PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config.prediction_type == "epsilon"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not (folder / "tokenizer").exists() and (single_file.DEFAULT_TOKENIZER / "vocab.json").is_file()
    # An SD 1.5-layout checkpoint maps onto the bundled configs key for key (checked on meta tensors).
    sd = original_layout(unet, vae, text)
    assert single_file.detect(sd, Path("x")) == single_file.Layout("sd1", 4, False)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    assert set(convert_ldm_unet_checkpoint(sd, dict(unet.config))) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(sd, dict(vae.config))) == set(vae.state_dict())


def test_tiny_file_without_config_fails_clearly_and_offline(sd_file, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ModelLoadError, match=r"do not fit the config in .*configs/sd15.*config=<matching diffusers folder>"):
        ldm.load(sd_file, device="cpu")


def test_missing_single_file_and_bad_config_folder(tmp_path, sd_file):
    with pytest.raises(ModelLoadError, match="no such file"):
        ldm.load(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks unet/config.json"):
        ldm.load(sd_file, config=tmp_path)


# ---- pickles ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_checkpoints(folder: Path) -> tuple[Path, list[Path]]:
    marker = folder / "PWNED"
    payload = {"state_dict": {"w": torch.zeros(2)}, "callbacks": Payload(marker)}
    zip_ckpt = folder / "evil.ckpt"
    torch.save(payload, zip_ckpt)  # torch's zip format, what .ckpt files are
    raw = folder / "evil.bin"
    raw.write_bytes(pickle.dumps(payload, protocol=2))  # a bare pickle, as legacy .bin/.pt files
    return marker, [zip_ckpt, raw]


def test_the_malicious_pickle_really_runs_code_when_unpickled(tmp_path):
    marker, files = evil_checkpoints(tmp_path)
    zip_ckpt, raw = files
    torch.load(zip_ckpt, weights_only=False)  # what an unguarded loader does
    assert marker.exists()
    marker.unlink()
    pickle.loads(raw.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_payload_never_runs(tmp_path, allow_pickle):
    marker, files = evil_checkpoints(tmp_path)
    disguised = tmp_path / "evil.safetensors"
    shutil.copy(files[0], disguised)
    raw_disguised = tmp_path / "evil2.safetensors"
    shutil.copy(files[1], raw_disguised)
    expect = {False: r"pickle checkpoint; loading a pickle can run arbitrary code.*allow_pickle=True",
              True: r"contains objects other than tensors.*refused even with allow_pickle"}[allow_pickle]
    for f in files:
        with pytest.raises(ModelLoadError, match=expect):
            ldm.load(f, device="cpu", allow_pickle=allow_pickle)
    for f in (disguised, raw_disguised):  # by content, not by name
        with pytest.raises(ModelLoadError, match=r"pickle/zip checkpoint named \.safetensors"):
            ldm.load(f, device="cpu", allow_pickle=allow_pickle)
    assert not marker.exists()


def test_tensor_only_ckpt_loads_with_allow_pickle(sd_file, tiny_config, base_pipe, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": single_file.read_state_dict(sd_file), "global_step": 1000}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        ldm.load(ckpt, config=tiny_config)
    pipe = ldm.load(ckpt, config=tiny_config, allow_pickle=True, device="cpu", dtype="float32")
    assert same_image(pipe.txt2img("a red fox", **GEN), base_pipe.txt2img("a red fox", **GEN))


# ---- truncated and corrupt files ----------------------------------------------------------------


def test_truncated_single_file_is_refused(sd_file, tiny_config, tmp_path):
    data = sd_file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cut_header = tmp_path / "cut-header.safetensors"
    cut_header.write_bytes(data[: 8 + header_len // 2])  # header longer than the file
    cut_data = tmp_path / "cut-data.safetensors"
    cut_data.write_bytes(data[: 8 + header_len + 100])  # offsets past the end
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"corrupt or incomplete file: .*cut-header.*header says"):
        ldm.load(cut_header, config=tiny_config)
    with pytest.raises(ModelLoadError, match=r"corrupt or incomplete file: .*cut-data.*runs past the end"):
        ldm.load(cut_data, config=tiny_config)
    with pytest.raises(ModelLoadError, match=r"corrupt or incomplete file: .*empty"):
        ldm.load(empty, config=tiny_config)


def test_garbage_header_and_truncated_ckpt_are_refused(tmp_path, sd_file):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or incomplete file.*unreadable header"):
        ldm.load(junk)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match="corrupt or incomplete file"):
        ldm.load(ckpt, allow_pickle=True)


def test_cached_hub_model_without_safetensors_is_refused(base_model, tmp_path, monkeypatch):
    """A hub snapshot holding only .bin weights: refused with the reason, never loaded as pickle."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at call time, unlike the env var
    repo = tmp_path / "hf" / "hub" / "models--someone--pickled-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(base_model, snapshot)
    for f in (snapshot / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights in .*unet.*pickle formats are not loaded"):
        ldm.load("someone/pickled-model", allow_download=False, allow_pickle=True)
