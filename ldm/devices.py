"""Where weights live and in which dtype: device and per-component dtype resolution."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ComponentDtypes:
    """Weights dtype per component: a bfloat16 U-Net can sit next to a float32 VAE."""

    text_encoder: torch.dtype
    unet: torch.dtype
    vae: torch.dtype

    @classmethod
    def same(cls, dtype: torch.dtype) -> "ComponentDtypes":
        return cls(dtype, dtype, dtype)


def weights_dtype(module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter. diffusers' `ModelMixin.dtype` walks every
    sub-module looking for casting hooks (~20 ms on an SD U-Net), a fixed cost per call that showed in
    the per-run overhead; ldm attaches no such hooks. Non-modules (wrappers) answer with their `.dtype`."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return module.dtype


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


def force_upcast_vae(dtypes: ComponentDtypes, vae_config: dict) -> ComponentDtypes:
    """SDXL's VAE overflows in float16 and its config says `force_upcast`: keep it in float32 (diffusers'
    SDXL pipelines upcast it for every encode and decode), so no image comes out NaN (black). Only for
    SDXL: SD 1.x VAE configs carry the same flag by default and diffusers ignores it there."""
    if dtypes.vae == torch.float16 and vae_config.get("force_upcast", True):
        return ComponentDtypes(dtypes.text_encoder, dtypes.unet, torch.float32)
    return dtypes
