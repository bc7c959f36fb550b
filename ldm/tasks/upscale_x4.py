"""The diffusion x4 upscaler (stable-diffusion-x4-upscaler): a 7-channel U-Net that sees the noised
low-res image as extra channels and its noise level as a class label (the `UNetInputs` extension).
Large inputs are split into overlapping tiles, each a full run of the engine, cross-faded in pixels;
the tile size follows a memory budget, and an out-of-memory error retries with half the tile."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .. import images as imgs
from .. import tiling
from ..components import ModelKind
from ..denoise import Extension, StepCallback
from ..engine import Model, Result, Start, params_for, require, run
from ..extensions import UNetInputs
from ..faults import OutOfMemory, free_memory, is_out_of_memory
from ..guidance import uses_cfg
from ..latents import seeded_noise
from ..params import AUTO_TILE_OVERLAP, TILE_OVERLAP, UPSCALE_TILE, GenerationParams, Range, check_int
from ..resize import check_output, check_scale

log = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET_MB = 4096  # working memory for one tile on the CPU when nothing else is configured
# Peak live activations as multiples of one feature map per level (sum over levels of channels x
# pixels): peak-RSS measurements of the tiny test models gave ~6-11 (U-Net) and ~4-9 (VAE decode).
_UNET_ACTIVATIONS = 12
_VAE_ACTIVATIONS = 10


@dataclass(frozen=True)
class TilePlan:
    """How an upscale is split: tile side and overlap in low-res pixels (tile None: one piece)."""

    tile: int | None
    overlap: int


def upscale(model: Model, image, prompt: str = "", *, noise_level: int = 20, tile_size: int | None = None,
            tile_overlap: int = 32, memory_budget_mb: float | None = None, callback: StepCallback | None = None,
            extensions: Sequence[Extension] = (), **settings) -> Result:
    """Upscale with an x4 upscaler model; the output is the input times the VAE factor (4).

    Settings are `GenerationParams` fields except width/height (set by the input) and strength.
    guidance_scale defaults to 9 and noise_level to 20, as diffusers' StableDiffusionUpscalePipeline.
    tile_size/tile_overlap are in input pixels; tile_size=None picks tiles from the memory budget
    (`memory_budget_mb`, else the model's `options.memory_budget_mb`, else free GPU memory / a CPU default) and
    runs in one piece when the whole image fits. Running out of memory retries with half the tile.
    Tiles chosen automatically (by budget or retry) overlap by at most a quarter of their side
    (`ldm.params.AUTO_TILE_OVERLAP`): a larger tile_overlap is lowered to that, with a warning in the
    log; the infotext records the overlap used.
    """
    require(model, ModelKind.UPSCALE, "upscale")
    low = imgs.load_image(image)
    f = model.vae_scale_factor
    w, h = low.width // f * f, low.height // f * f  # as diffusers' VaeImageProcessor rounds
    if w == 0 or h == 0:
        raise ValueError(f"image {low.width}x{low.height} is too small to upscale: each side needs at least {f} pixels")
    check_output(low.size, f"x{f}", (w * f, h * f), model.options.max_upscale_size, "options.max_upscale_size")
    p = _upscale_params(model, prompt, settings, (w * f, h * f)).with_seed()
    _check_noise_level(noise_level, model.max_noise_level)
    _check_tile(tile_size, tile_overlap)
    if memory_budget_mb is not None:
        check_scale("memory_budget_mb", memory_budget_mb)
    if low.size != (w, h):
        low = low.resize((w, h), Image.BICUBIC)
    pixels = imgs.pil_to_tensor(low).to(device=model.device, dtype=model.dtype)

    plan = TilePlan(tile_size, tile_overlap)
    if tile_size is None:
        budget = _budget_bytes(model, memory_budget_mb)
        tile = choose_tile(model, h, w, p.batch_size, uses_cfg(p.guidance_scale), budget)
        plan = TilePlan(tile, tile_overlap) if tile is None else _auto_plan(tile, tile_overlap, "automatic")
    while True:
        try:
            return _upscale_tiles(model, p, pixels, noise_level, plan, callback, extensions)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):  # the engine reports it as ldm.faults.OutOfMemory
                raise
            plan = _smaller(model, plan, h, w, exc, tile_overlap)


def _upscale_params(model: Model, prompt: str, settings: dict, out: tuple[int, int]) -> GenerationParams:
    fixed = sorted({"width", "height", "strength"} & set(settings))
    if fixed:
        raise ValueError(f"upscale does not take {', '.join(fixed)}: the output is the input image times {model.vae_scale_factor}")
    limits = replace(model.limits, size_step=1, max_size=model.options.max_upscale_size)
    values = {"guidance_scale": 9.0, **{k: v for k, v in settings.items() if v is not None}, "width": out[0], "height": out[1]}
    return params_for(model, prompt, values, limits=limits)


def _check_noise_level(level, max_level: int | None) -> None:
    top = 350 if max_level is None else max_level
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= top:
        raise ValueError(f"noise_level must be a whole number from 0 to {top} (this model's max_noise_level), got {level!r}")


def _check_tile(tile, overlap) -> None:
    """tile None: automatic; the overlap's range is ldm.params.TILE_OVERLAP, with a tile at most half of it."""
    if tile is None:
        check_int("tile_overlap", overlap, TILE_OVERLAP, " (input pixels)")
        return
    check_int("tile_size", tile, UPSCALE_TILE, " (input pixels; None: automatic)")
    check_int("tile_overlap", overlap, Range(TILE_OVERLAP.low, min(TILE_OVERLAP.high, tile // 2)),
              f" (input pixels: at most half the tile size {tile})")


def _upscale_tiles(model: Model, p: GenerationParams, pixels: torch.Tensor, noise_level: int, plan: TilePlan,
                   callback: StepCallback | None, extensions: Sequence[Extension]) -> Result:
    """Run every tile through the engine; one tile covering the image is exactly the untiled upscale."""
    from diffusers import DDPMScheduler

    h, w = pixels.shape[-2:]
    boxes = [tiling.Box(0, 0, h, w)] if plan.tile is None else tiling.plan(h, w, plan.tile, plan.overlap)
    low_res_scheduler = DDPMScheduler.from_config(model.components.low_res_scheduler_config)
    levels = torch.full((p.batch_size,), noise_level, dtype=torch.long, device=model.device)
    channels = model.vae.config.latent_channels

    def start_for(box: tiling.Box):
        def start(scheduler, gens):
            # diffusers draws the image noise before the latents; both are drawn at full size and
            # cropped, so a tile sees exactly the numbers the untiled run would.
            noise = seeded_noise((p.batch_size, *pixels.shape[1:]), gens, dtype=model.dtype, device=model.device)
            latents = seeded_noise((p.batch_size, channels, h, w), gens, dtype=model.dtype, device=model.device)
            image = low_res_scheduler.add_noise(box.crop(pixels).repeat(p.batch_size, 1, 1, 1), box.crop(noise), levels)
            inputs = UNetInputs(channels=image, class_labels=levels)
            return Start(box.crop(latents) * scheduler.init_noise_sigma, scheduler.timesteps, [inputs])

        return start

    extra = {"Noise level": noise_level}
    if len(boxes) > 1:
        extra.update({"Upscale tile": plan.tile, "Upscale tile overlap": plan.overlap})
        log.info("upscaling %dx%d in %d tiles of %d (overlap %d)", w, h, len(boxes), plan.tile, plan.overlap)
    if len(boxes) == 1:
        return run(model, p, start_for(boxes[0]), callback, extensions, extra)

    done = []
    infotexts = []

    def run_tile(box: tiling.Box) -> torch.Tensor:
        k = len(done)
        cb = None if callback is None else (lambda i, n, lat: callback(k * n + i, len(boxes) * n, lat))
        result = run(model, p, start_for(box), cb, extensions, extra)
        done.append(box)
        infotexts[:] = result.infotexts
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in result.images])).permute(0, 3, 1, 2)

    canvas = tiling.blend(boxes, run_tile, (h, w), model.vae_scale_factor)
    arrays = canvas.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    seeds = [p.seed + i for i in range(p.batch_size)]
    return Result([Image.fromarray(a) for a in arrays], seeds, infotexts, p, None)


def tile_bytes(model, h: int, w: int, batch: int, cfg: bool) -> int:
    """Rough peak working memory of upscaling an h x w (input pixels) tile: the larger of the U-Net
    pass and the VAE decode, both linear in pixels (attention runs through SDPA, which does not
    materialise the token x token matrix)."""
    unet_cfg, vae_cfg = model.unet.config, model.vae.config
    f = model.vae_scale_factor
    n = batch * (2 if cfg else 1)
    unet_maps = sum(c / 4**level for level, c in enumerate(unet_cfg.block_out_channels))
    vae_maps = sum(c / 4**level for level, c in enumerate(vae_cfg.block_out_channels))
    unet = n * h * w * unet_maps * _UNET_ACTIVATIONS * model.unet.dtype.itemsize
    vae = batch * h * w * f * f * vae_maps * _VAE_ACTIVATIONS * model.vae.dtype.itemsize
    return int(max(unet, vae))


def _tile_align(model) -> int:
    """Tiles are multiples of the U-Net's downsampling factor so every level sees whole pixels."""
    return 2 ** (len(model.unet.config.block_out_channels) - 1)


def choose_tile(model, h: int, w: int, batch: int, cfg: bool, budget: int) -> int | None:
    """None when the whole h x w input fits `budget` bytes, else the largest square tile that does
    (never below the smallest useful tile: then the budget is simply too small, and we try anyway)."""
    if tile_bytes(model, h, w, batch, cfg) <= budget:
        return None
    align = _tile_align(model)
    tile = max(h, w) // align * align
    while tile > _min_tile(model) and tile_bytes(model, tile, tile, batch, cfg) > budget:
        tile -= align
    return max(tile, _min_tile(model))


def _min_tile(model) -> int:
    return max(16, 4 * _tile_align(model))


def _budget_bytes(model, memory_budget_mb: float | None) -> int:
    mb = memory_budget_mb if memory_budget_mb is not None else model.options.memory_budget_mb
    if mb is not None:
        return int(mb * 2**20)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(free * 0.8)  # leave room for the allocator's fragmentation
    return DEFAULT_CPU_BUDGET_MB * 2**20


def _auto_plan(tile: int, overlap: int, why: str) -> TilePlan:
    """A tile ldm picked (`why`: how) with the caller's overlap, lowered to AUTO_TILE_OVERLAP of the tile
    when larger, which the log says."""
    top = int(tile * AUTO_TILE_OVERLAP)
    if overlap > top:
        log.warning("tile_overlap %d is more than %.0f%% of the %s %d-pixel tile: using %d", overlap,
                    AUTO_TILE_OVERLAP * 100, why, tile, top)
    return TilePlan(tile, min(overlap, top))


def _smaller(model, plan: TilePlan, h: int, w: int, exc: BaseException, overlap: int) -> TilePlan:
    """The next plan after running out of memory: half the tile, with the caller's `overlap` as for automatic tiles."""
    free_memory()
    align = _tile_align(model)
    current = plan.tile or max(h, w)
    tile = current // 2 // align * align
    if tile < _min_tile(model):
        raise OutOfMemory(
            f"out of memory even with {current}-pixel tiles; free memory, lower batch_size, or use a smaller image"
        ) from exc
    log.warning("out of memory upscaling with %d-pixel tiles; retrying with %d", current, tile)
    return _auto_plan(tile, overlap, "halved")
