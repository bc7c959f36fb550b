"""Model folders / hub ids -> components. Offline first; safetensors only."""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
COMPONENT_DIRS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


class ModelKind(str, Enum):
    BASE = "base"  # 4-channel U-Net: txt2img, img2img, inpainting by latent blending
    INPAINT = "inpaint"  # 9-channel: latents + mask + masked-image latents
    UPSCALE = "upscale"  # 7-channel x4 upscaler: latents + low-res image


_KIND_BY_CHANNELS = {4: ModelKind.BASE, 9: ModelKind.INPAINT, 7: ModelKind.UPSCALE}


@dataclass(frozen=True)
class ComponentDtypes:
    """Weights dtype per component: a bfloat16 U-Net can sit next to a float32 VAE."""

    text_encoder: torch.dtype
    unet: torch.dtype
    vae: torch.dtype

    @classmethod
    def same(cls, dtype: torch.dtype) -> "ComponentDtypes":
        return cls(dtype, dtype, dtype)


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: float32, float16, bfloat16") from None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no cheap reliable check, stay with float32
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    # torch must also dispatch AVX-512 kernels, or the bf16 instructions go unused.
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return avx512 and bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtypes(dtype: str | torch.dtype | None, device: torch.device, *, native_bf16: bool | None = None) -> ComponentDtypes:
    """Per-component dtypes. None or "auto": fp16 on CUDA; on CPUs with native bf16, U-Net and text encoder
    in bfloat16 with the VAE kept in float32 (a bf16 VAE bands colours, and the VAE is a small share of the
    time); float32 elsewhere. A named dtype applies to every component (parity with diffusers: "float32")."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        if device.type == "cuda":
            return ComponentDtypes.same(torch.float16)
        if device.type == "cpu" and (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
            return ComponentDtypes(torch.bfloat16, torch.bfloat16, torch.float32)
        return ComponentDtypes.same(torch.float32)
    return ComponentDtypes.same(resolve_dtype(dtype, device))


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
    from . import single_file

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
    if channels not in _KIND_BY_CHANNELS:
        raise ModelLoadError(f"{root}: U-Net with {channels} input channels is not a known kind (4, 7 or 9)")
    name = root.name if Path(model).expanduser().is_dir() else str(model)
    kind = _KIND_BY_CHANNELS[channels]
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
