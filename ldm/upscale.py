"""Three ways to make an image larger (see docs/upscaling.md):

- `upscale_image`: classic resamplers (Lanczos, bicubic, nearest) - no model, exact PIL pixels.
- `upscale`: a diffusion x4 upscaler model (stable-diffusion-x4-upscaler), tiled for large inputs.
- `hires_fix`: A1111's "hires fix" - enlarge latents or pixels, then redraw them with the base model
  at a denoising strength.

All model work goes through `Pipeline._run` (the one denoising loop); this module only prepares
what a task hands that loop.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import images as imgs
from . import tiling
from .denoise import StepCallback
from .faults import OutOfMemory, free_memory, is_out_of_memory
from .latents import encode, seeded_noise
from .loading import ModelKind
from .params import GenerationParams, Limits

log = logging.getLogger(__name__)

# ---- classic resamplers ------------------------------------------------------------------------

RESAMPLERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
DEFAULT_MAX_UPSCALE_SIZE = 4096
_RESIZABLE_MODES = ("L", "LA", "RGB", "RGBA")


def upscale_image(image, scale: float, method: str = "lanczos", *, max_size: int = DEFAULT_MAX_UPSCALE_SIZE) -> Image.Image:
    """Resize by `scale` with a classic filter: the same pixels as PIL's `resize` with that filter.
    The new size is the old one times `scale`, rounded to whole pixels (at least 1)."""
    method_key = method.lower() if isinstance(method, str) else method
    if method_key not in RESAMPLERS:
        raise ValueError(f"unknown resampling method {method!r}; choose one of: {', '.join(RESAMPLERS)}")
    _check_scale("scale", scale)
    img = imgs.load_image(image, mode=None)
    if img.mode not in _RESIZABLE_MODES:  # palette/16-bit images: PIL would silently use nearest or clip
        img = imgs.load_image(img, mode="RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    _check_output(img.size, f"x{scale:g}", size, max_size, "max_size")
    return img.resize(size, RESAMPLERS[method_key])


def _check_scale(name: str, scale, low: float = 0.0) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= low:
        raise ValueError(f"{name} must be a number above {low:g}, got {scale!r}")


def _check_output(size: tuple[int, int], how: str, out: tuple[int, int], limit: int, setting: str) -> None:
    if max(out) > limit:
        raise ValueError(
            f"upscaling {size[0]}x{size[1]} {how} gives {out[0]}x{out[1]}; the largest side allowed is {limit} ({setting})"
        )


# ---- x4 upscaler model -------------------------------------------------------------------------

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


def upscale(pipe, image, prompt: str = "", *, noise_level: int = 20, tile_size: int | None = None, tile_overlap: int = 32,
            memory_budget_mb: float | None = None, callback: StepCallback | None = None, **settings):
    """Upscale with an x4 upscaler model; the output is the input times the VAE factor (4).

    Settings are `GenerationParams` fields except width/height (set by the input) and strength.
    guidance_scale defaults to 9 and noise_level to 20, as diffusers' StableDiffusionUpscalePipeline.
    tile_size/tile_overlap are in input pixels; tile_size=None picks tiles from the memory budget
    (`memory_budget_mb`, else `pipe.memory_budget_mb`, else free GPU memory / a CPU default) and
    runs in one piece when the whole image fits. Running out of memory retries with half the tile.
    Tiles chosen automatically (by budget or retry) overlap by at most a quarter of their side.
    """
    pipe._require(ModelKind.UPSCALE, "upscale")
    low = imgs.load_image(image)
    f = pipe.vae_scale_factor
    w, h = low.width // f * f, low.height // f * f  # as diffusers' VaeImageProcessor rounds
    if w == 0 or h == 0:
        raise ValueError(f"image {low.width}x{low.height} is too small to upscale: each side needs at least {f} pixels")
    _check_output(low.size, f"x{f}", (w * f, h * f), pipe.max_upscale_size, "pipe.max_upscale_size")
    p = _upscale_params(pipe, prompt, settings, (w * f, h * f)).with_seed()
    _check_noise_level(noise_level, pipe.components.max_noise_level)
    if tile_size is not None:
        _check_tile(tile_size, tile_overlap)
    elif not isinstance(tile_overlap, int) or isinstance(tile_overlap, bool) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be a whole number of pixels, 0 or more; got {tile_overlap!r}")
    if memory_budget_mb is not None:
        _check_scale("memory_budget_mb", memory_budget_mb)
    if low.size != (w, h):
        low = low.resize((w, h), Image.BICUBIC)
    pixels = imgs.pil_to_tensor(low).to(device=pipe.device, dtype=pipe.dtype)

    plan = TilePlan(tile_size, tile_overlap)
    if tile_size is None:
        budget = _budget_bytes(pipe, memory_budget_mb)
        tile = choose_tile(pipe, h, w, p.batch_size, p.guidance_scale > 1, budget)
        plan = TilePlan(tile, tile_overlap if tile is None else min(tile_overlap, tile // 4))
    while True:
        try:
            return _upscale_tiles(pipe, p, pixels, noise_level, plan, callback)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):  # _run reports it as ldm.faults.OutOfMemory
                raise
            plan = _smaller(pipe, plan, h, w, exc)


def _upscale_params(pipe, prompt: str, settings: dict, out: tuple[int, int]) -> GenerationParams:
    fixed = sorted({"width", "height", "strength"} & set(settings))
    if fixed:
        raise ValueError(f"upscale does not take {', '.join(fixed)}: the output is the input image times {pipe.vae_scale_factor}")
    unknown = set(settings) - GenerationParams.field_names()
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values = {"guidance_scale": 9.0, **{k: v for k, v in settings.items() if v is not None}}
    limits = Limits(size_step=1, max_size=pipe.max_upscale_size, max_batch=pipe.limits.max_batch, max_steps=pipe.limits.max_steps)
    return GenerationParams(prompt=prompt, width=out[0], height=out[1], **values).validate(limits)


def _check_noise_level(level, max_level: int | None) -> None:
    top = 350 if max_level is None else max_level
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= top:
        raise ValueError(f"noise_level must be a whole number from 0 to {top} (this model's max_noise_level), got {level!r}")


def _check_tile(tile, overlap) -> None:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 8:
        raise ValueError(f"tile_size must be a whole number of input pixels, at least 8, or None (automatic); got {tile!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= tile // 2:
        raise ValueError(f"tile_overlap must be a whole number from 0 to half the tile size ({tile // 2}); got {overlap!r}")


def _upscale_tiles(pipe, p: GenerationParams, pixels: torch.Tensor, noise_level: int, plan: TilePlan,
                   callback: StepCallback | None):
    """Run every tile through `_run`; one tile covering the image is exactly the untiled upscale."""
    from .pipeline import Result, Start

    from diffusers import DDPMScheduler

    h, w = pixels.shape[-2:]
    boxes = [tiling.Box(0, 0, h, w)] if plan.tile is None else tiling.plan(h, w, plan.tile, plan.overlap)
    low_res_scheduler = DDPMScheduler.from_config(pipe.components.low_res_scheduler_config)
    levels = torch.full((p.batch_size,), noise_level, dtype=torch.long, device=pipe.device)
    channels = pipe.vae.config.latent_channels

    def start_for(box: tiling.Box):
        def start(scheduler, gens):
            # diffusers draws the image noise before the latents; both are drawn at full size and
            # cropped, so a tile sees exactly the numbers the untiled run would.
            noise = seeded_noise((p.batch_size, *pixels.shape[1:]), gens, dtype=pipe.dtype, device=pipe.device)
            latents = seeded_noise((p.batch_size, channels, h, w), gens, dtype=pipe.dtype, device=pipe.device)
            image = low_res_scheduler.add_noise(box.crop(pixels).repeat(p.batch_size, 1, 1, 1), box.crop(noise), levels)
            return Start(box.crop(latents) * scheduler.init_noise_sigma, scheduler.timesteps, extra_channels=image, class_labels=levels)

        return start

    extra = {"Noise level": noise_level}
    if len(boxes) > 1:
        extra.update({"Upscale tile": plan.tile, "Upscale tile overlap": plan.overlap})
        log.info("upscaling %dx%d in %d tiles of %d (overlap %d)", w, h, len(boxes), plan.tile, plan.overlap)
    if len(boxes) == 1:
        return pipe._run(p, start_for(boxes[0]), callback, extra)

    done = []

    def run_tile(box: tiling.Box) -> torch.Tensor:
        k = len(done)
        cb = None if callback is None else (lambda i, n, lat: callback(k * n + i, len(boxes) * n, lat))
        result = pipe._run(p, start_for(box), cb, extra)
        done.append(box)
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in result.images])).permute(0, 3, 1, 2)

    f = pipe.vae_scale_factor
    canvas = tiling.blend(boxes, run_tile, (h, w), f)
    arrays = canvas.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    seeds = [p.seed + i for i in range(p.batch_size)]
    infotexts = [pipe.infotext(replace(p, seed=s), extra) for s in seeds]
    return Result([Image.fromarray(a) for a in arrays], seeds, infotexts, p, None)


def tile_bytes(pipe, h: int, w: int, batch: int, cfg: bool) -> int:
    """Rough peak working memory of upscaling an h x w (input pixels) tile: the larger of the U-Net
    pass and the VAE decode, both linear in pixels (attention runs through SDPA, which does not
    materialise the token x token matrix)."""
    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    f = pipe.vae_scale_factor
    n = batch * (2 if cfg else 1)
    unet_maps = sum(c / 4**level for level, c in enumerate(unet_cfg.block_out_channels))
    vae_maps = sum(c / 4**level for level, c in enumerate(vae_cfg.block_out_channels))
    unet = n * h * w * unet_maps * _UNET_ACTIVATIONS * pipe.unet.dtype.itemsize
    vae = batch * h * w * f * f * vae_maps * _VAE_ACTIVATIONS * pipe.vae.dtype.itemsize
    return int(max(unet, vae))


def _tile_align(pipe) -> int:
    """Tiles are multiples of the U-Net's downsampling factor so every level sees whole pixels."""
    return 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def choose_tile(pipe, h: int, w: int, batch: int, cfg: bool, budget: int) -> int | None:
    """None when the whole h x w input fits `budget` bytes, else the largest square tile that does
    (never below the smallest useful tile: then the budget is simply too small, and we try anyway)."""
    if tile_bytes(pipe, h, w, batch, cfg) <= budget:
        return None
    align = _tile_align(pipe)
    tile = max(h, w) // align * align
    while tile > _min_tile(pipe) and tile_bytes(pipe, tile, tile, batch, cfg) > budget:
        tile -= align
    return max(tile, _min_tile(pipe))


def _min_tile(pipe) -> int:
    return max(16, 4 * _tile_align(pipe))


def _budget_bytes(pipe, memory_budget_mb: float | None) -> int:
    mb = memory_budget_mb if memory_budget_mb is not None else pipe.memory_budget_mb
    if mb is not None:
        return int(mb * 2**20)
    if pipe.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(pipe.device)
        return int(free * 0.8)  # leave room for the allocator's fragmentation
    return DEFAULT_CPU_BUDGET_MB * 2**20


def _smaller(pipe, plan: TilePlan, h: int, w: int, exc: BaseException) -> TilePlan:
    """The next plan after running out of memory: half the tile, overlap capped at a quarter of that."""
    free_memory()
    align = _tile_align(pipe)
    current = plan.tile or max(h, w)
    tile = current // 2 // align * align
    if tile < _min_tile(pipe):
        raise OutOfMemory(
            f"out of memory even with {current}-pixel tiles; free memory, lower batch_size, or use a smaller image"
        ) from exc
    log.warning("out of memory upscaling with %d-pixel tiles; retrying with %d", current, tile)
    return TilePlan(tile, min(plan.overlap, tile // 4))


# ---- hires fix ---------------------------------------------------------------------------------

HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # our name -> A1111's infotext name


@dataclass
class HiresPass:
    """A validated second pass: what to upscale to and how, checked before any model work."""

    params: GenerationParams  # the redraw at the target size
    scale: float
    upscaler: str
    steps_given: bool

    def run(self, pipe, source, callback: StepCallback | None = None):
        """Redraw `source` (a first-pass Result, or a PIL image of the first-pass size) at the target size."""
        from .pipeline import Result, Start

        p = self.params
        f = pipe.vae_scale_factor
        target = (p.height // f, p.width // f)
        init = self._init_fn(pipe, source, target)

        def start(scheduler, gens):
            timesteps = pipe._strength_slice(scheduler, p.steps, p.strength)
            latents = init(gens)
            noise = seeded_noise(latents.shape, gens, dtype=pipe.dtype, device=pipe.device)
            return Start(scheduler.add_noise(latents, noise, timesteps[:1].repeat(p.batch_size)), timesteps)

        result = pipe._run(p, start, callback)
        first = source.params if isinstance(source, Result) else p
        first_size = source.images[0].size if isinstance(source, Result) else source.size
        info_p = replace(p, width=first_size[0], height=first_size[1], steps=first.steps)
        extra = {
            "Denoising strength": p.strength,
            "Hires upscale": self.scale,
            "Hires steps": p.steps if self.steps_given else None,
            "Hires upscaler": HIRES_UPSCALERS[self.upscaler],
        }
        result.infotexts = [pipe.infotext(replace(info_p, seed=s), extra) for s in result.seeds]
        return result

    def _init_fn(self, pipe, source, target: tuple[int, int]) -> Callable[[list[torch.Generator]], torch.Tensor]:
        """gens -> the upscaled clean latents to noise (drawing from gens only where diffusers' img2img would)."""
        from .pipeline import Result

        p = self.params
        tile = pipe._vae_tile()
        if self.upscaler == "latent" and isinstance(source, Result):
            latents = source.latents.to(device=pipe.device, dtype=pipe.dtype)
            return lambda gens: _resize_latents(latents, target)
        images = source.images if isinstance(source, Result) else [source] * p.batch_size
        if self.upscaler == "lanczos":
            size = (p.width, p.height)
            pixels = imgs.pil_to_tensor([im.resize(size, Image.LANCZOS) for im in images])
            return lambda gens: encode(pipe.vae, pixels, gens, tile=tile).to(pipe.dtype)
        # latent upscaler on an image: encode at its own size (a multiple of the size step), then resize
        step = pipe.limits.size_step
        size = (max(step, images[0].width // step * step), max(step, images[0].height // step * step))
        pixels = imgs.pil_to_tensor([im if im.size == size else im.resize(size, Image.LANCZOS) for im in images])
        return lambda gens: _resize_latents(encode(pipe.vae, pixels, gens, tile=tile).to(pipe.dtype), target)


def _resize_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # A1111's "Latent" hires upscaler: bilinear, no antialiasing, corners not aligned.
    return F.interpolate(latents, size=size, mode="bilinear", align_corners=False, antialias=False)


def plan_hires(pipe, first: GenerationParams, *, scale: float, upscaler: str = "latent", strength: float = 0.5,
               steps: int | None = None) -> HiresPass | None:
    """txt2img's hires pass over a first pass `first`, validated up front; None when scale is 1 (no second pass)."""
    hires = _make_pass(pipe, first, {}, scale=scale, upscaler=upscaler, strength=strength, steps=steps)
    return None if hires.scale == 1 else hires


def _make_pass(pipe, first: GenerationParams, overrides: dict, *, scale: float, upscaler: str, strength: float,
               steps: int | None) -> HiresPass:
    _check_scale("hires scale", scale)
    if scale < 1:
        raise ValueError(f"hires scale must be 1 or more (1 = no enlargement), got {scale:g}")
    key = upscaler.lower() if isinstance(upscaler, str) else upscaler
    if key not in HIRES_UPSCALERS:
        raise ValueError(f"unknown hires upscaler {upscaler!r}; choose one of: {', '.join(HIRES_UPSCALERS)}")
    bad = sorted({"width", "height", "strength"} & set(overrides))
    if bad:
        raise ValueError(f"hires fix does not take {', '.join(bad)}: the size comes from scale, the strength from strength=")
    step = pipe.limits.size_step
    width, height = _round_to(int(first.width * scale), step), _round_to(int(first.height * scale), step)
    _check_output((first.width, first.height), f"with hires scale {scale:g}", (width, height), pipe.limits.max_size,
                  "the pipeline's max_size")
    settings = {k: getattr(first, k) for k in _INHERITED}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(width=width, height=height, steps=steps if steps is not None else settings["steps"])
    p = pipe._params(settings.pop("prompt"), settings, strength=strength)
    return HiresPass(p, float(scale), key, steps is not None)


# What a hires pass takes over from the first pass unless told otherwise.
_INHERITED = ("prompt", "negative_prompt", "guidance_scale", "sampler", "schedule", "seed", "batch_size", "clip_skip", "steps")


def hires_fix(pipe, image_or_result, prompt: str = "", *, scale: float = 2.0, upscaler: str = "latent",
              strength: float = 0.5, steps: int | None = None, callback: StepCallback | None = None, **settings):
    """A1111's hires fix on an earlier result (or any image): enlarge by `scale`, then redraw at
    `strength` with the same seeds. upscaler="latent" resizes the latents bilinearly (A1111's
    "Latent"); "lanczos" resizes the decoded pixels and re-encodes them.

    With a Result, settings not given (and an empty prompt / negative prompt, as A1111's empty
    hires prompt) are taken from that result; with an image they are the usual defaults.
    """
    from .pipeline import Result

    pipe._require(ModelKind.BASE, "hires fix")
    if isinstance(image_or_result, Result):
        source = image_or_result
        if str(upscaler).lower() == "latent" and source.latents is None:
            raise ValueError("this result carries no latents for the latent upscaler; use upscaler='lanczos'")
        first = replace(source.params, seed=source.seeds[0], batch_size=len(source.images),
                        width=source.images[0].width, height=source.images[0].height)
        first = replace(first, prompt=prompt or first.prompt)
        if not settings.get("negative_prompt"):
            settings.pop("negative_prompt", None)
    else:
        source = imgs.load_image(image_or_result)
        step = pipe.limits.size_step
        first = GenerationParams(prompt=prompt, width=_round_to(source.width, step), height=_round_to(source.height, step))
    hires = _make_pass(pipe, first, settings, scale=scale, upscaler=upscaler, strength=strength, steps=steps)
    return hires.run(pipe, source, callback)


def _round_to(v: int, step: int) -> int:
    return max(step, v // step * step)
