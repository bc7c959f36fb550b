"""Speed and memory options chosen once at load time: attention backend, channels_last, torch.compile,
and CPU offload for small GPUs. Every choice is recorded on the Pipeline (`pipe.accel`).

On a CPU-only machine all of these are either the default (sdpa attention) or a no-op with a log
message, so they can be passed unconditionally by an app that serves both.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ATTENTION = ("auto", "sdpa", "xformers")
OFFLOAD = ("none", "model", "sequential")


@dataclass(frozen=True)
class Accel:
    """What was actually applied (which may differ from what was asked, e.g. offload on a CPU)."""

    device: torch.device  # where the maths runs; with offload the weights rest in CPU memory
    attention: str = "sdpa"
    channels_last: bool = False
    compiled: bool = False
    offload: str = "none"


def check_options(attention: str, offload: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}; got {offload!r}")


def weights_device(device: torch.device, offload: str) -> torch.device:
    """Where load_components should put the weights: offloaded models start in CPU memory."""
    return torch.device("cpu") if offload != "none" and device.type == "cuda" else device


# ---- attention ---------------------------------------------------------------------------------


def xformers_works(device: torch.device) -> bool:
    """xformers is importable and one tiny attention call succeeds on `device` (catches wheels
    built for another torch/CUDA, which import fine and fail on first use)."""
    try:
        import xformers.ops
    except Exception:  # ImportError, or a broken binary raising anything at import
        return False
    try:
        q = torch.randn(1, 8, 1, 64, device=device, dtype=torch.float16)  # [batch, tokens, heads, dim]
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception as exc:
        log.warning("xformers is installed but does not run here (%s); using PyTorch SDPA", exc)
        return False


def select_attention(requested: str, device: torch.device, probe: Callable[[torch.device], bool] = xformers_works) -> str:
    """"auto": xformers on CUDA when it works, else PyTorch's scaled_dot_product_attention."""
    if requested == "sdpa":
        return "sdpa"
    if device.type != "cuda":
        if requested == "xformers":
            raise ValueError("attention='xformers' needs a CUDA device; use 'sdpa' or 'auto'")
        return "sdpa"
    if probe(device):
        return "xformers"
    if requested == "xformers":
        raise ValueError("attention='xformers' was asked for but xformers is not installed or does not work with this torch/CUDA")
    return "sdpa"


def apply_attention(unet, vae, backend: str) -> None:
    # diffusers' default processors already call F.scaled_dot_product_attention: "sdpa" needs nothing.
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()


# ---- layout, compile, offload ------------------------------------------------------------------


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """Default: on for CUDA (tensor-core convolutions want NHWC), off elsewhere."""
    return device.type == "cuda" if requested is None else bool(requested)


def compile_unet(unet) -> None:
    """Compile the U-Net's forward in place. dynamic=False: one graph per input shape, compiled
    on first use of that shape (see `warmup`), never again for it."""
    unet.compile(dynamic=False)


def apply_offload(components, mode: str, device: torch.device) -> str:
    """Keep weights in CPU memory and move them to the GPU only while used. "model": whole
    component at a time (small slowdown); "sequential": one layer at a time (slow, least memory)."""
    if mode == "none":
        return "none"
    if device.type != "cuda":
        log.warning("offload=%r does nothing on %s: the weights already live in main memory", mode, device.type)
        return "none"
    from accelerate import cpu_offload, cpu_offload_with_hook

    order = (components.text_encoder, components.unet, components.vae)  # the order a generation uses them
    if mode == "model":
        hook = None
        for module in order:
            # Each hook moves the previous module back to the CPU when the next one starts.
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
    else:
        for module in order:
            cpu_offload(module, execution_device=device)
    return mode


def configure(components, *, device: torch.device, attention: str = "auto", compile: bool = False,
              offload: str = "none", channels_last: bool | None = None) -> Accel:
    """Apply the options to loaded components (already on `weights_device(device, offload)`)."""
    check_options(attention, offload)
    backend = select_attention(attention, device)
    apply_attention(components.unet, components.vae, backend)
    nhwc = use_channels_last(channels_last, device)
    if nhwc:
        components.unet.to(memory_format=torch.channels_last)
    offload = apply_offload(components, offload, device)
    if compile:
        compile_unet(components.unet)
    return Accel(device=device, attention=backend, channels_last=nhwc, compiled=bool(compile), offload=offload)


def warmup(pipe, width: int | None = None, height: int | None = None, steps: int = 2) -> None:
    """Run a short generation so compilation (and allocator growth) happens now, not for the first user.
    Covers the guided batch shape that normal generations use."""
    pipe.txt2img("warmup", width=width, height=height, steps=steps, seed=0, guidance_scale=7.0)
