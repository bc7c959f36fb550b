"""Seeded noise, VAE encode/decode, and the cheap latent preview."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import tiling

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


def encode(vae, pixels: torch.Tensor, gens: Sequence[torch.Generator] | None, *, tile: int | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] (one row per generator) -> scaled latents, sampling the posterior with gens[i]
    for row i as diffusers does; without generators the posterior mean is used.

    With `tile` (in latent pixels) a large image is encoded in overlapping tiles whose posterior
    parameters are blended, so the random draw is still one full-size sample per row.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    if gens is None:
        latents = _posterior(vae, pixels, tile).mode()
    else:
        latents = torch.cat([_posterior(vae, pixels[i : i + 1], tile).sample(g) for i, g in enumerate(gens)])
    return latents * vae.config.scaling_factor


def _posterior(vae, pixels: torch.Tensor, tile: int | None):
    f = vae_scale_factor(vae)
    h, w = pixels.shape[-2] // f, pixels.shape[-1] // f
    if not _needs_tiles(tile, h, w) or pixels.shape[-2] % f or pixels.shape[-1] % f:
        return vae.encode(pixels).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    boxes = tiling.plan(h, w, tile, tile_overlap(tile))

    def run(box: tiling.Box) -> torch.Tensor:  # the posterior's mean and log-variance for this tile
        return vae.encode(box.scaled(f).crop(pixels)).latent_dist.parameters

    return DiagonalGaussianDistribution(tiling.blend(boxes, run, (h, w), 1).to(pixels.dtype))


def tile_overlap(tile: int) -> int:
    """A quarter of the tile: enough context that the blended VAE tiles show no seam."""
    return max(1, tile // 4)


def _needs_tiles(tile: int | None, h: int, w: int) -> bool:
    if tile is None:
        return False
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 2:
        raise ValueError(f"VAE tile size must be a whole number of latent pixels, at least 2; got {tile!r}")
    return h > tile or w > tile


class DecodeError(RuntimeError):
    """The VAE produced NaNs even in float32."""


def decode(vae, latents: torch.Tensor, *, tile: int | None = None) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1], float32 on the CPU.

    With `tile` (in latent pixels) latents larger than a tile are decoded in overlapping tiles that
    are cross-faded, so memory grows with the tile, not the image; without it the VAE sees the
    whole image at once.

    fp16 VAEs overflow on some latents and return NaNs (black images); then the decode is
    retried once in float32, and if that fails too the caller gets an error, never a black image.
    """
    pixels = _decode(vae, latents, tile)
    if torch.isnan(pixels).any():
        if vae.dtype == torch.float32:
            raise DecodeError("the VAE produced NaN pixels; the latents are not finite")
        log.warning("VAE decode in %s produced NaNs; retrying in float32", vae.dtype)
        original = vae.dtype
        vae.to(torch.float32)
        try:
            pixels = _decode(vae, latents.float(), tile)
        finally:
            vae.to(original)
        if torch.isnan(pixels).any():
            raise DecodeError("the VAE produced NaN pixels even in float32")
    return pixels.float().cpu()


def _decode(vae, latents: torch.Tensor, tile: int | None) -> torch.Tensor:
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    h, w = latents.shape[-2:]
    if not _needs_tiles(tile, h, w):
        return vae.decode(latents, return_dict=False)[0]
    boxes = tiling.plan(h, w, tile, tile_overlap(tile))

    def run(box: tiling.Box) -> torch.Tensor:
        return vae.decode(box.crop(latents), return_dict=False)[0]

    return tiling.blend(boxes, run, (h, w), vae_scale_factor(vae)).to(vae.dtype)


# Approximate linear map from SD-1.x/2.x latents to RGB, used only for live previews.
_SD_LATENT_RGB = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


def fit_preview_map(vae, *, samples: int = 4, side: int = 8, seed: int = 0) -> torch.Tensor:
    """A model's own latent -> RGB map for live previews: [channels + 1, 3] (the last row a bias),
    the least-squares fit from `samples` seeded random latents of `side`² to their VAE decodes,
    pooled to latent resolution. A few small decodes: cheap enough to run once at load."""
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(samples, vae.config.latent_channels, side, side, generator=gen)
    with torch.no_grad():
        pixels = decode(vae, lat)
    rgb = torch.nn.functional.adaptive_avg_pool2d(pixels, side)  # [-1, 1], one colour per latent pixel
    x = torch.cat([lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1]), torch.ones(lat[:, :1].numel(), 1)], 1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x.double(), y.double()).solution.float()


def preview(latents: torch.Tensor, rgb_map: torch.Tensor | None = None) -> torch.Tensor:
    """A cheap RGB preview of latents (no VAE): uint8 [N, H, W, 3] on the CPU at latent resolution.
    `rgb_map` (from `fit_preview_map`) gives the model's own colours; without it the SD 1.x/2.x factors."""
    lat = latents.detach().float().cpu()
    if rgb_map is not None and rgb_map.shape == (lat.shape[1] + 1, 3):
        rgb = torch.einsum("nchw,cr->nhwr", lat, rgb_map[:-1]) + rgb_map[-1]
    elif lat.shape[1] != 4:
        lat = lat[:, :3] if lat.shape[1] >= 3 else lat.repeat(1, 3, 1, 1)[:, :3]
        rgb = lat.permute(0, 2, 3, 1)
    else:
        rgb = torch.einsum("nchw,cr->nhwr", lat, _SD_LATENT_RGB)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], NCHW -> uint8 NHWC on the CPU, rounded as saved images are."""
    return ((pixels.float().cpu().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
