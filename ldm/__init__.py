"""ldm: latent diffusion (Stable Diffusion 1.x/2.x-shaped models) with one denoising loop.

    import ldm
    pipe = ldm.load("weights/demo")
    result = pipe.txt2img("a red circle on a blue background", seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .accel import configure, weights_device
from .components import ModelKind, ModelLoadError
from .control_preprocess import PREPROCESSORS
from .controlnet import CONTROL_MODES, RESIZE_MODES, ControlNet, ControlUnit, load_controlnet
from .denoise import Cancelled
from .devices import resolve_device, resolve_dtypes
from .engine import VERSION, Result
from .faults import OutOfMemory
from .latents import DecodeError
from .library import Library, UnknownModelName
from .openvino_backend import OpenVINONotInstalled, install as install_openvino, require_openvino
from .loading import load_components
from .options import ATTENTION, OFFLOAD, Options
from .params import GenerationParams, Limits
from .pipeline import Pipeline
from .prediction import PredictionType
from .resize import RESAMPLERS, upscale_image
from .tasks.hires import HIRES_UPSCALERS

__all__ = ["load", "Pipeline", "Result", "Options", "GenerationParams", "Limits", "ModelKind", "ModelLoadError",
           "Cancelled", "OutOfMemory", "DecodeError", "VERSION", "upscale_image", "RESAMPLERS", "HIRES_UPSCALERS",
           "ATTENTION", "OFFLOAD", "OpenVINONotInstalled", "Library", "UnknownModelName", "PredictionType",
           "load_controlnet", "ControlNet", "ControlUnit", "PREPROCESSORS", "CONTROL_MODES", "RESIZE_MODES"]


def load(model: str | os.PathLike, *, device=None, dtype=None, options: Options | None = None,
         allow_download: bool = True, allow_pickle: bool = False, config: str | os.PathLike | None = None,
         models_dir: str | os.PathLike | None = None, vae: str | None = None, prediction_type: str | None = None,
         **option_fields) -> Pipeline:
    """Load a diffusers folder, hub id or single checkpoint file. device=None: cuda if available, else cpu.

    dtype=None or "auto": fp16 on cuda; on CPUs with native bf16, bf16 U-Net/text encoder + fp32 VAE (~2x
    faster on CPU, see docs/performance.md); else fp32. "float32" everywhere is what the parity tests use.
    options: an `ldm.Options` (sizes, VAE tiling, memory budget, attention, compile, offload, channels_last,
    openvino: U-Net and VAE decoder through OpenVINO on the CPU, float32, see ldm.openvino_backend);
    its fields may also be given as keywords (`max_size=1024, attention="sdpa"`), which override `options`.
    A single .safetensors checkpoint (original SD layout) loads offline with the bundled SD 1.5 configs, or with
    `config=` (a diffusers folder supplying the architecture); pickles (.ckpt/.pt/.bin) are refused unless
    allow_pickle=True, and then only tensors are unpickled. See docs/security.md.
    models_dir: an A1111/ComfyUI-style models folder (`ldm.Library`): `model` may then be a checkpoint name
    from it ("name", "sub/name", "name.safetensors [hash]"), and `<lora:name:w>` tags and embeddings in
    prompts are looked up there; `vae` names a VAE in its VAE/ folder to use instead of the checkpoint's own.
    prediction_type: "epsilon" or "v_prediction" overrides what the model says; None/"auto" decides from it
    (an SD 2.x single file is tested as A1111 does: 512 epsilon or 768 v-prediction, see ldm.prediction)."""
    prediction = PredictionType.parse(prediction_type)
    base = options or Options()
    try:
        opts = dataclasses.replace(base, **option_fields).validate()
    except TypeError:
        unknown = sorted(set(option_fields) - {f.name for f in dataclasses.fields(base)})
        raise TypeError(f"ldm.load got unknown argument(s): {', '.join(unknown)}") from None
    library = Library(models_dir) if models_dir is not None else None
    if library is not None and not os.path.exists(os.path.expanduser(model)):
        try:
            model = library.find("checkpoints", model).path
        except UnknownModelName:
            if str(model).count("/") != 1:  # "org/name" may still be a hub id
                raise
    dev = resolve_device(device)
    if opts.openvino:  # before any weights load
        require_openvino()
        if dev.type != "cpu":
            raise ValueError(f"openvino=True runs on the CPU; got device={str(dev)!r}")
        if dtype is None or str(dtype).lower() == "auto":
            dtype = "float32"  # OpenVINO converts float32 modules (its own bf16 would change the pixels)
        if resolve_dtypes(dtype, dev).unet != torch.float32:
            raise ValueError(f"openvino=True runs float32 weights; got dtype={dtype!r}: use dtype='float32' or 'auto'")
    components = load_components(model, device=weights_device(dev, opts.offload), dtype=resolve_dtypes(dtype, dev),
                                 allow_download=allow_download, allow_pickle=allow_pickle, config=config,
                                 prediction_type=prediction)
    accel = configure(components, device=dev, attention=opts.attention, compile=opts.compile, offload=opts.offload,
                      channels_last=opts.channels_last)
    if opts.openvino:
        install_openvino(components.unet, components.vae, opts.openvino_cache)
    pipe = Pipeline(components, opts, accel, library=library)
    return pipe.with_vae(vae) if vae is not None else pipe
