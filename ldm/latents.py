"""Seeded noise, VAE encode/decode, and the cheap latent preview."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so a seed gives the same picture on CPU and GPU."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def seeded_noise(shape: Sequence[int], gens: Sequence[torch.Generator], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian noise of `shape` whose row i comes from gens[i] (drawn on the CPU, then moved)."""
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, dtype=dtype) for g in gens]).to(device)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode(vae, pixels: torch.Tensor, gens: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Pixels in [-1, 1] (one row per generator) -> scaled latents, sampling the posterior with gens[i]
    for row i as diffusers does; without generators the posterior mean is used."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    if gens is None:
        latents = vae.encode(pixels).latent_dist.mode()
    else:
        latents = torch.cat([vae.encode(pixels[i : i + 1]).latent_dist.sample(g) for i, g in enumerate(gens)])
    return latents * vae.config.scaling_factor


class DecodeError(RuntimeError):
    """The VAE produced NaNs even in float32."""


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1], float32 on the CPU.

    fp16 VAEs overflow on some latents and return NaNs (black images); then the decode is
    retried once in float32, and if that fails too the caller gets an error, never a black image.
    """
    pixels = _decode(vae, latents)
    if torch.isnan(pixels).any():
        if vae.dtype == torch.float32:
            raise DecodeError("the VAE produced NaN pixels; the latents are not finite")
        log.warning("VAE decode in %s produced NaNs; retrying in float32", vae.dtype)
        original = vae.dtype
        vae.to(torch.float32)
        try:
            pixels = _decode(vae, latents.float())
        finally:
            vae.to(original)
        if torch.isnan(pixels).any():
            raise DecodeError("the VAE produced NaN pixels even in float32")
    return pixels.float().cpu()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


# Approximate linear map from SD-1.x/2.x latents to RGB, used only for live previews.
_SD_LATENT_RGB = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


def preview(latents: torch.Tensor) -> torch.Tensor:
    """A cheap RGB preview of latents (no VAE): uint8 [N, H, W, 3] on the CPU at latent resolution."""
    lat = latents.detach().float().cpu()
    if lat.shape[1] != 4:
        lat = lat[:, :3] if lat.shape[1] >= 3 else lat.repeat(1, 3, 1, 1)[:, :3]
        rgb = lat.permute(0, 2, 3, 1)
    else:
        rgb = torch.einsum("nchw,cr->nhwr", lat, _SD_LATENT_RGB)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)
