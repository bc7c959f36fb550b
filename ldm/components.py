"""What a loaded model is made of, and the checks every loader shares. Loaders build `Components`;
nothing here imports a loader."""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from .weights_hash import WeightsHash


class ModelKind(str, Enum):
    BASE = "base"  # 4-channel U-Net: txt2img, img2img, inpainting by latent blending
    INPAINT = "inpaint"  # 9-channel: latents + mask + masked-image latents
    UPSCALE = "upscale"  # 7-channel x4 upscaler: latents + low-res image
    REFINER = "refiner"  # SDXL refiner (second text encoder only): used through txt2img(refiner=...)


KIND_BY_CHANNELS = {4: ModelKind.BASE, 9: ModelKind.INPAINT, 7: ModelKind.UPSCALE}  # U-Net input channels -> kind


class ModelLoadError(ValueError):
    """A model could not be found or read; the message says what to do."""


@dataclass
class Components:
    tokenizer: object | None  # None only for an SDXL refiner (see tokenizer_2)
    text_encoder: torch.nn.Module | None
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    path: Path
    name: str
    kind: ModelKind
    # x4 upscaler only: the scheduler that noises the low-res image, and the highest noise level allowed
    low_res_scheduler_config: dict | None = None
    max_noise_level: int | None = None
    # SDXL only: the second tokenizer (OpenCLIP: pads with "!") and text encoder (CLIPTextModelWithProjection)
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    # A VAE from the models folder in place of the checkpoint's own (Pipeline.with_vae): its name and short hash
    # for the infotext, and the checkpoint's own VAE to go back to ("Automatic").
    vae_name: str | None = None
    vae_hash: str | None = None
    own_vae: torch.nn.Module | None = None
    # The weights' short hash, computed once and shared by every Model on these weights (ldm.weights_hash).
    weights_hash: WeightsHash = field(default_factory=WeightsHash, compare=False, repr=False)


# safetensors dtypes and their item sizes in bytes: what safetensors.torch turns into torch tensors
# (the format also names sub-byte F4/F6 types, which nothing here can load).
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                      "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                      "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
CONFIG_SUFFIXES = (".json", ".txt", ".safetensors")  # what diffusers/transformers open in a model folder


def require_regular(file: Path) -> os.stat_result:
    """Refuse anything but a regular file (or a symlink to one) before opening it: open() on a FIFO
    blocks until a writer appears, devices and directories are not model files."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: no such file") from None
    except OSError as exc:
        raise ModelLoadError(f"{file} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise ModelLoadError(f"{file} is not a regular file ({kind}); refusing to open it")
    return st


def require_regular_files(folder: Path) -> None:
    """`require_regular` for every file a model library may open in `folder` (configs, tokenizer, weights)."""
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in CONFIG_SUFFIXES:
            require_regular(entry)


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_safetensors(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Refuse files that are not complete, well-formed safetensors before any library parses them; return
    {tensor name: (dtype, shape)} from the header. Every refusal is a ModelLoadError naming the file."""
    size = require_regular(file).st_size

    def corrupt(why: str) -> ModelLoadError:
        return ModelLoadError(f"corrupt or incomplete file: {file} ({why})")

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes")
        # Pickle/zip magic, unless the bytes are a valid header length followed by a JSON header: a safetensors
        # header length ending in byte 0x80 or 0x4B50 ("PK") is legitimate (1 file in 256 starts with 0x80).
        disguised = ModelLoadError(f"{file} is a pickle/zip checkpoint named .safetensors; refusing to load it")
        looks_pickled = head[:2] == b"PK" or head[:1] == b"\x80"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise disguised if looks_pickled else corrupt(f"header says {header_len} bytes, file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or ints too long to parse
            raise disguised if looks_pickled else corrupt("unreadable header") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is {_json_type(header)}, not an object")
    data = size - 8 - header_len
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise corrupt("__metadata__ must be an object of strings")
            continue
        tensors[name], span = _tensor_entry(name, info, data, corrupt)
        spans.append((span, name))
    end = 0
    for (begin, stop), name in sorted(spans):  # like safetensors: the tensors tile the data, no gaps, no overlaps
        if begin != end:
            raise corrupt(f"tensor {_short(name)} {'overlaps another' if begin < end else 'leaves a gap before it'}")
        end = stop
    if end != data:
        raise corrupt(f"{data - end} bytes after the last tensor")
    return tensors


def _tensor_entry(name: str, info, data: int, corrupt) -> tuple[tuple[str, tuple[int, ...]], tuple[int, int]]:
    """(dtype, shape) and the data offsets of one header entry, checked against each other and the file."""
    tensor = f"tensor {_short(name)}"
    if not isinstance(info, dict):
        raise corrupt(f"{tensor} is described by {_json_type(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise corrupt(f"{tensor} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise corrupt(f"{tensor} has shape {_short(shape)}; a list of non-negative integers is expected")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(n) for n in offsets):
        raise corrupt(f"{tensor} has data_offsets {_short(offsets)}; [begin, end] in bytes is expected")
    begin, end = offsets
    if end > data:
        raise corrupt(f"{tensor} runs past the end")
    if begin > end:
        raise corrupt(f"{tensor} has data_offsets {offsets}: begin after end")
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != needed:
        raise corrupt(f"{tensor} is {dtype} {shape} ({needed} bytes) but its data_offsets span {end - begin} bytes")
    return (dtype, tuple(shape)), (begin, end)


def require_complete(model: torch.nn.Module, what: str, source: Path, *, missing=(), where: str = "", hint: str = "") -> None:
    """Refuse a model with weights its file did not provide. diffusers leaves them on the meta device;
    transformers initialises them randomly and reports them in `missing` (from_pretrained's loading info)."""
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    absent = sorted({*missing, *on_meta})
    if absent:
        count = f"{len(absent)} tensors" if len(absent) > 1 else "1 tensor"
        raise ModelLoadError(f"{source}: the {what} weights are incomplete{where} ({count} missing, e.g. {absent[0]}){hint}")


def read_json(file: Path) -> dict:
    """A JSON object from a config file, or ModelLoadError naming the file."""
    require_regular(file)
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelLoadError(f"corrupt file: {file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"corrupt file: {file} does not hold a JSON object")
    return config
