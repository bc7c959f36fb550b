"""What a loaded model is made of, and the checks every loader shares. Loaders build `Components`;
nothing here imports a loader."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch


class ModelKind(str, Enum):
    BASE = "base"  # 4-channel U-Net: txt2img, img2img, inpainting by latent blending
    INPAINT = "inpaint"  # 9-channel: latents + mask + masked-image latents
    UPSCALE = "upscale"  # 7-channel x4 upscaler: latents + low-res image


KIND_BY_CHANNELS = {4: ModelKind.BASE, 9: ModelKind.INPAINT, 7: ModelKind.UPSCALE}  # U-Net input channels -> kind


class ModelLoadError(ValueError):
    """A model could not be found or read; the message says what to do."""


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    path: Path
    name: str
    kind: ModelKind
    # x4 upscaler only: the scheduler that noises the low-res image, and the highest noise level allowed
    low_res_scheduler_config: dict | None = None
    max_noise_level: int | None = None


def check_safetensors(file: Path) -> None:
    """Refuse files that are not complete safetensors before any library parses them."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"corrupt or incomplete file: {file} ({size} bytes)")
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ModelLoadError(f"{file} is a pickle/zip checkpoint named .safetensors; refusing to load it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ModelLoadError(f"corrupt or incomplete file: {file} (header says {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"corrupt or incomplete file: {file} (unreadable header)") from None
    data = size - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__" and max(info.get("data_offsets", [0, 0])) > data:
            raise ModelLoadError(f"corrupt or incomplete file: {file} (tensor {name!r} runs past the end)")
