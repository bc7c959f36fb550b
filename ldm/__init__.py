"""ldm: latent diffusion (Stable Diffusion 1.x/2.x-shaped models) with one denoising loop.

    import ldm
    pipe = ldm.load("weights/demo")
    result = pipe.txt2img("a red circle on a blue background", seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

import os

from .denoise import Cancelled
from .faults import OutOfMemory
from .latents import DecodeError
from .loading import ModelKind, ModelLoadError
from .params import GenerationParams, Limits
from .pipeline import VERSION, Pipeline, Result
from .upscale import upscale_image

__all__ = ["load", "Pipeline", "Result", "GenerationParams", "Limits", "ModelKind", "ModelLoadError", "Cancelled", "OutOfMemory", "DecodeError", "VERSION", "upscale_image"]


def load(model: str | os.PathLike, *, device=None, dtype=None, max_size: int = 2048, max_batch: int = 16,
         allow_download: bool = True, attention: str = "auto", compile: bool = False, offload: str = "none",
         channels_last: bool | None = None, allow_pickle: bool = False, config: str | os.PathLike | None = None) -> Pipeline:
    """Load a diffusers folder or hub id. device=None: cuda if available, else cpu.
    dtype=None or "auto": fp16 on cuda; on CPUs with native bf16, bf16 U-Net/text encoder + fp32 VAE (~2x
    faster on CPU, see docs/performance.md); else fp32. "float32" everywhere is what the parity tests use.
    attention "auto"|"sdpa"|"xformers", compile, offload "none"|"model"|"sequential", channels_last: see ldm.accel.
    A single .safetensors checkpoint (original SD layout) loads offline with the bundled SD 1.5 configs, or with
    `config=` (a diffusers folder supplying the architecture); pickles (.ckpt/.pt/.bin) are refused unless
    allow_pickle=True, and then only tensors are unpickled. See docs/security.md."""
    from .accel import check_options, configure, weights_device
    from .loading import load_components, resolve_device, resolve_dtypes

    check_options(attention, offload)
    dev = resolve_device(device)
    components = load_components(model, device=weights_device(dev, offload), dtype=resolve_dtypes(dtype, dev),
                                 allow_download=allow_download, allow_pickle=allow_pickle, config=config)
    pipe = Pipeline(components, max_size=max_size, max_batch=max_batch)
    pipe.accel = configure(components, device=dev, attention=attention, compile=compile, offload=offload,
                           channels_last=channels_last)
    return pipe
