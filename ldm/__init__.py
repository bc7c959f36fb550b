"""ldm: latent diffusion (Stable Diffusion 1.x/2.x-shaped models) with one denoising loop.

    import ldm
    pipe = ldm.load("weights/demo")
    result = pipe.txt2img("a red circle on a blue background", seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

import os

from .denoise import Cancelled
from .loading import ModelKind, ModelLoadError
from .params import GenerationParams, Limits
from .pipeline import VERSION, Pipeline, Result

__all__ = ["load", "Pipeline", "Result", "GenerationParams", "Limits", "ModelKind", "ModelLoadError", "Cancelled", "VERSION"]


def load(model: str | os.PathLike, *, device=None, dtype=None, max_size: int = 2048, max_batch: int = 16,
         allow_download: bool = True) -> Pipeline:
    """Load a diffusers folder or hub id. device=None: cuda if available, else cpu; dtype=None: fp16 on cuda, fp32 on cpu."""
    from .loading import load_components, resolve_device, resolve_dtype

    dev = resolve_device(device)
    components = load_components(model, device=dev, dtype=resolve_dtype(dtype, dev), allow_download=allow_download)
    return Pipeline(components, max_size=max_size, max_batch=max_batch)
