"""Model folders / hub ids / single files -> components. Offline first; safetensors only.

`load_components` is the one entry: a single checkpoint file goes to `ldm.single_file`, anything
else must be a diffusers folder (or a hub id found in the local cache)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from . import single_file
from .components import KIND_BY_CHANNELS, Components, ModelKind, ModelLoadError, check_safetensors
from .devices import ComponentDtypes

log = logging.getLogger(__name__)

COMPONENT_DIRS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def locate(model: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local diffusers folder for `model`: the folder itself, or a hub id from the local cache
    (downloaded only when allowed and reachable)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):  # existing files went to ldm.single_file
        raise ModelLoadError(f"checkpoint file not found: {text}")
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelLoadError(f"model {text!r} is neither a local folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
            reason = "it is not in the local Hugging Face cache and downloads are off"
        else:
            try:
                return Path(snapshot_download(text, allow_patterns=patterns))
            except Exception as exc:  # network down, no such repo, gated, ...
                reason = f"it is not in the local cache and could not be downloaded ({type(exc).__name__})"
    raise ModelLoadError(
        f"model {text!r} not found: {reason}. Pre-download it on a machine with network access with "
        f"`huggingface-cli download {text}` (then copy the cache, ~/.cache/huggingface), or pass a local folder."
    )


def _weights(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        hint = f" (found {', '.join(others)}: pickle formats are not loaded)" if others else ""
        raise ModelLoadError(f"no .safetensors weights in {folder}{hint}")
    for f in files:
        check_safetensors(f)
    return files


def load_components(model: str | os.PathLike, *, device: torch.device, dtype: torch.dtype | ComponentDtypes,
                    allow_download: bool = True, allow_pickle: bool = False, config: str | os.PathLike | None = None) -> Components:
    if single_file.is_single_file(model):  # one checkpoint file; `config`/`allow_pickle` apply only here
        return single_file.load_single_file(model, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = locate(model, allow_download=allow_download)
    missing = [d for d in COMPONENT_DIRS if not (root / d).is_dir()]
    if missing:
        raise ModelLoadError(f"{root} is not a diffusers model folder: missing {', '.join(missing)}/")
    for d in ("text_encoder", "unet", "vae"):
        _weights(root / d)

    dtypes = dtype if isinstance(dtype, ComponentDtypes) else ComponentDtypes.same(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtypes.text_encoder, use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, torch_dtype=dtypes.unet)
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True, torch_dtype=dtypes.vae)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    for m in (text_encoder, unet, vae):
        m.to(device).eval().requires_grad_(False)

    channels = unet.config.in_channels
    if channels not in KIND_BY_CHANNELS:
        raise ModelLoadError(f"{root}: U-Net with {channels} input channels is not a known kind (4, 7 or 9)")
    name = root.name if Path(model).expanduser().is_dir() else str(model)
    kind = KIND_BY_CHANNELS[channels]
    extras = _upscaler_extras(root) if kind == ModelKind.UPSCALE else {}
    return Components(tokenizer, text_encoder, unet, vae, scheduler_config, root, name, kind, **extras)


def _upscaler_extras(root: Path) -> dict:
    """low_res_scheduler/ and model_index.json's max_noise_level of a StableDiffusionUpscalePipeline folder."""
    config = root / "low_res_scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise ModelLoadError(f"{root} has a 7-channel (x4 upscaler) U-Net but no low_res_scheduler/scheduler_config.json")
    index = root / "model_index.json"
    max_noise = json.loads(index.read_text()).get("max_noise_level", 350) if index.is_file() else 350  # diffusers' default
    return {"low_res_scheduler_config": json.loads(config.read_text()), "max_noise_level": int(max_noise)}
