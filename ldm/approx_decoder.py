"""Approximate latent decoders (TAESD, "tiny autoencoder"): previews and an opt-in fast decode.

TAESD (Ollin Boer Bohan) is a small distilled decoder for SD latents: a few percent of the VAE's
work for a slightly softer picture. A1111 looks for it in the models folder's `VAE-approx/`
(ComfyUI: `vae_approx/`). Accepted here, safetensors only (no pickles):

- `taesd_decoder.safetensors` / `taesdxl_decoder.safetensors`: the original decoder's state dict
  (keys "1.weight", "3.conv.0.weight", ...: an nn.Sequential whose item 0 is the clamp);
- a diffusers `AutoencoderTiny` folder (config.json + diffusion_pytorch_model.safetensors).

TAESD works on the latents the U-Net sees (scaled by the VAE's scaling factor) and its decoder
outputs [0, 1]; diffusers' `AutoencoderTiny.decode` maps that to [-1, 1]. `ApproxDecodeVAE` puts it
behind the full VAE's interface, so `ldm.latents.decode` (tiling, NaN checks) works unchanged and
encoding (img2img) still uses the full VAE.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .components import ModelLoadError, check_safetensors
from .latents import to_uint8

FOLDER_NAMES = ("VAE-approx", "vae_approx")  # A1111, ComfyUI
DECODER_FILES = {"sd": "taesd_decoder", "sdxl": "taesdxl_decoder"}  # per model family (ldm.family names)
_ORIGINAL_KEY = re.compile(r"^(\d+)\.(.+)$")


def find_approx_decoder(models_dir: str | os.PathLike, family: str = "sd") -> Path | None:
    """The family's TAESD decoder in a models folder (a file or a diffusers folder), or None."""
    stem = DECODER_FILES.get(family)
    if stem is None:
        raise ValueError(f"no approximate decoder is known for the {family!r} family; one of {', '.join(DECODER_FILES)}")
    for sub in FOLDER_NAMES:
        base = Path(models_dir) / sub
        for candidate in (base / f"{stem}.safetensors", base / stem.replace("_decoder", "")):
            if candidate.is_file() or (candidate / "config.json").is_file():
                return candidate
    return None


def load_approx_decoder(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An `AutoencoderTiny` (decoder weights loaded) from a TAESD decoder file or an AutoencoderTiny folder."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    if path.is_dir():
        try:
            model = AutoencoderTiny.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: not a loadable AutoencoderTiny folder ({type(exc).__name__}: {str(exc)[:200]})") from None
        return _placed(model, device, dtype)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: approximate decoders are loaded from .safetensors files only (no pickles)")
    check_safetensors(path)
    from safetensors.torch import load_file

    state = load_file(path)
    model = AutoencoderTiny()
    own = model.decoder.state_dict()
    mapped = {}
    for key, tensor in state.items():
        m = _ORIGINAL_KEY.match(key)
        # diffusers' DecoderTiny applies the clamp in forward(), so its layer i is the original's item i + 1.
        name = f"layers.{int(m.group(1)) - 1}.{m.group(2)}" if m else key.removeprefix("decoder.")
        if name not in own or own[name].shape != tensor.shape:
            raise ModelLoadError(f"{path}: tensor {key} {list(tensor.shape)} does not fit a TAESD decoder; "
                                 "expected the original taesd_decoder layout or a diffusers AutoencoderTiny decoder")
        mapped[name] = tensor
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ModelLoadError(f"{path}: incomplete TAESD decoder, {len(missing)} tensors missing (e.g. {missing[0]})")
    model.decoder.load_state_dict(mapped)
    return _placed(model, device, dtype)


def _placed(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device)
    return (model if model.dtype == dtype else model.to(dtype)).eval()  # diffusers warns on every .to(dtype)


class ApproxDecodeVAE(torch.nn.Module):
    """The full VAE's interface with decoding done by a TAESD decoder: `decode` takes what
    `ldm.latents.decode` passes (latents / scaling_factor) and returns pixels in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module, decoder: torch.nn.Module):
        super().__init__()
        cfg = decoder.config
        factor, needed = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1), 2 ** (len(vae.config.block_out_channels) - 1)
        if factor != needed:
            raise ValueError(f"the approximate decoder upsamples latents {factor}x but this model's VAE {needed}x; "
                             "it belongs to another model family")
        self.vae, self.decoder = vae, decoder
        self.config = vae.config  # scaling factor and block count (8x) of the latents it decodes

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def encode(self, *args, **kwargs):
        return self.vae.encode(*args, **kwargs)

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        latents = (z * self.config.scaling_factor).to(self.decoder.dtype)  # TAESD reads the U-Net's latents
        pixels = self.decoder.decode(latents, return_dict=False)[0].to(self.vae.dtype)
        return (pixels,)


def approx_preview(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """A full-size RGB preview of the U-Net's latents: uint8 [N, H, W, 3] on the CPU."""
    with torch.inference_mode():
        pixels = decoder.decode(latents.to(device=decoder.device, dtype=decoder.dtype), return_dict=False)[0]
    return to_uint8(pixels)
