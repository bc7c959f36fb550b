"""Live previews: the U-Net's latents drawn as a picture while a run goes, by the cheapest method that
shows the model's own colours (A1111's "Live preview method": Full, TAESD, Approx cheap):

- FULL: the model's own VAE, when its decoder is small (under `SMALL_DECODER` parameters). The demo
  model's has 0.4M and decodes a 64 px picture in ~25 ms on one core. A linear map cannot follow such
  a VAE: fitted on the demo model's own finished pictures it is still off by ~24/255 per channel, and
  fitted on random latents (what a load can afford) by ~92 (its blue backgrounds show brown).
- TAESD: the family's approximate decoder (`ldm.approx_decoder`), when the models folder has one.
- LINEAR: a least-squares latent -> RGB map fitted at load on a few decodes (`latents.fit_preview_map`),
  at latent resolution.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from . import latents as lat
from .approx_decoder import approx_preview

SMALL_DECODER = 2_000_000  # decoder parameters; SD 1.x/2.x/XL VAE decoders have ~49M


class PreviewMethod(str, Enum):
    FULL = "full"
    TAESD = "taesd"
    LINEAR = "linear"


@dataclass(frozen=True)
class Previewer:
    """`previewer(latents)`: the first image of a batch of scaled latents as uint8 [H, W, 3] on the CPU."""

    method: PreviewMethod
    draw: Callable[[torch.Tensor], torch.Tensor]  # scaled latents [1, C, h, w] -> uint8 [1, H, W, 3]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.draw(latents[:1])[0]


def decoder_size(vae) -> int:
    return sum(p.numel() for p in vae.decoder.parameters())


def previewer(vae, approx_decoder: torch.nn.Module | None = None) -> Previewer:
    """How to preview latents of a model with this `vae` (see the module docstring); `approx_decoder`: a
    loaded TAESD decoder (`approx_decoder.load_approx_decoder`) for the model's family, if one was found.
    LINEAR costs a few small decodes now; the others nothing until used."""
    if decoder_size(vae) < SMALL_DECODER:
        return Previewer(PreviewMethod.FULL, lambda z: lat.to_uint8(lat.decode(vae, z)))
    if approx_decoder is not None:
        return Previewer(PreviewMethod.TAESD, lambda z: approx_preview(approx_decoder, z))
    rgb_map = lat.fit_preview_map(vae)
    return Previewer(PreviewMethod.LINEAR, lambda z: lat.preview(z, rgb_map))
