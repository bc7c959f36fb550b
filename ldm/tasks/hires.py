"""A1111's hires fix: img2img started from an enlarged first pass.

The first pass (a `Result`, or any image) is enlarged in latent space (bilinear, A1111's "Latent")
or in pixels (Lanczos, then re-encoded), noised to `strength` and redrawn at the target size with
the same seeds. `plan` validates the second pass before the first one runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from .. import images as imgs
from ..components import ModelKind
from ..conditioning import schedule_steps
from ..denoise import Extension, StepCallback
from ..engine import Model, Result, Start, params_for, require, run, strength_slice
from ..latents import encode, seeded_noise
from ..params import HIRES_SCALE, GenerationParams, check_int
from ..resize import check_output, check_scale

HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # our name -> A1111's infotext name

# What a hires pass takes over from the first pass unless told otherwise.
_INHERITED = ("prompt", "negative_prompt", "guidance_scale", "sampler", "schedule", "seed", "batch_size", "clip_skip", "steps")


@dataclass
class HiresPass:
    """A validated second pass: what to upscale to and how, checked before any model work."""

    params: GenerationParams  # the redraw at the target size
    scale: float
    upscaler: str
    steps_given: bool

    def run(self, model: Model, source: Result | Image.Image, callback: StepCallback | None = None,
            extensions: Sequence[Extension] = ()) -> Result:
        """Redraw `source` (a first-pass Result, or a PIL image of the first-pass size) at the target size."""
        p = self.params
        if isinstance(source, Result):  # the first pass's concrete seeds, also when it was asked for -1
            p = replace(p, seed=source.seeds[0])
        f = model.vae_scale_factor
        init = self._init_fn(model, source, (p.height // f, p.width // f))

        def start(scheduler, gens):
            timesteps = strength_slice(scheduler, p.steps, p.strength)
            latents = init(gens)
            noise = seeded_noise(latents.shape, gens, dtype=model.dtype, device=model.device)
            return Start(scheduler.add_noise(latents, noise, timesteps[:1].repeat(p.batch_size)), timesteps)

        # A1111: a second pass's prompt schedule continues the first pass's timeline.
        first_steps = schedule_steps(source.params) if isinstance(source, Result) else None
        result = run(model, p, start, callback, extensions, first_pass_steps=first_steps)
        # A1111 writes the first pass's size and steps, and the hires settings beside them.
        first = source.params if isinstance(source, Result) else p
        first_size = source.images[0].size if isinstance(source, Result) else source.size
        info_p = replace(result.params, width=first_size[0], height=first_size[1], steps=first.steps)
        extra = {
            "Denoising strength": p.strength,
            "Hires upscale": self.scale,
            "Hires steps": p.steps if self.steps_given else None,
            "Hires upscaler": HIRES_UPSCALERS[self.upscaler],
        }
        for ext in extensions:
            extra.update(ext.infotext())
        result.infotexts = [model.infotext(replace(info_p, seed=s), extra) for s in result.seeds]
        return result

    def _init_fn(self, model: Model, source, target: tuple[int, int]) -> Callable[[list[torch.Generator]], torch.Tensor]:
        """gens -> the upscaled clean latents to noise (drawing from gens only where diffusers' img2img would)."""
        p = self.params
        tile = model.options.vae_tile
        if self.upscaler == "latent" and isinstance(source, Result):
            latents = source.latents.to(device=model.device, dtype=model.dtype)
            return lambda gens: _resize_latents(latents, target)
        images = source.images if isinstance(source, Result) else [source] * p.batch_size
        if self.upscaler == "lanczos":
            size = (p.width, p.height)
            pixels = imgs.pil_to_tensor([im.resize(size, Image.LANCZOS) for im in images])
            return lambda gens: encode(model.vae, pixels, gens, tile=tile).to(model.dtype)
        # latent upscaler on an image: encode at its own size (a multiple of the size step), then resize
        step = model.limits.size_step
        size = (_round_to(images[0].width, step), _round_to(images[0].height, step))
        pixels = imgs.pil_to_tensor([im if im.size == size else im.resize(size, Image.LANCZOS) for im in images])
        return lambda gens: _resize_latents(encode(model.vae, pixels, gens, tile=tile).to(model.dtype), target)


def _resize_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # A1111's "Latent" hires upscaler: bilinear, no antialiasing, corners not aligned.
    return F.interpolate(latents, size=size, mode="bilinear", align_corners=False, antialias=False)


def plan(model: Model, first: GenerationParams, *, scale: float, upscaler: str = "latent", strength: float = 0.5,
         steps: int | None = None, overrides: dict | None = None) -> HiresPass:
    """The second pass over a first pass made with `first`, validated before any model work."""
    overrides = overrides or {}
    check_scale("hires scale", scale)
    if scale not in HIRES_SCALE:
        raise ValueError(f"hires scale must be {HIRES_SCALE.low:g} or more (1 = no enlargement), got {scale:g}")
    key = upscaler.lower() if isinstance(upscaler, str) else upscaler
    if key not in HIRES_UPSCALERS:
        raise ValueError(f"unknown hires upscaler {upscaler!r}; choose one of: {', '.join(HIRES_UPSCALERS)}")
    if steps is not None:  # said of the second pass, not as the first pass's "steps"
        check_int("hires steps", steps, model.limits.range("steps"), " (unset: as many as the first pass)")
    bad = sorted({"width", "height", "strength"} & set(overrides))
    if bad:
        raise ValueError(f"hires fix does not take {', '.join(bad)}: the size comes from scale, the strength from strength=")
    step = model.limits.size_step
    width, height = _round_to(int(first.width * scale), step), _round_to(int(first.height * scale), step)
    check_output((first.width, first.height), f"with hires scale {scale:g}", (width, height), model.limits.max_size,
                 "the pipeline's max_size")
    settings = {k: getattr(first, k) for k in _INHERITED}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(width=width, height=height, steps=steps if steps is not None else settings["steps"])
    p = params_for(model, settings.pop("prompt"), settings, strength=strength)
    return HiresPass(p, float(scale), key, steps is not None)


def hires_fix(model: Model, image_or_result, prompt: str = "", *, scale: float = 2.0, upscaler: str = "latent",
              strength: float = 0.5, steps: int | None = None, callback: StepCallback | None = None,
              extensions: Sequence[Extension] = (), **settings) -> Result:
    """A1111's hires fix on an earlier result (or any image): enlarge by `scale`, then redraw at
    `strength` with the same seeds. upscaler="latent" resizes the latents bilinearly (A1111's
    "Latent"); "lanczos" resizes the decoded pixels and re-encodes them.

    With a Result, settings not given (and an empty prompt / negative prompt, as A1111's empty
    hires prompt) are taken from that result; with an image they are the usual defaults.
    """
    require(model, ModelKind.BASE, "hires fix")
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
        step = model.limits.size_step
        first = GenerationParams(prompt=prompt, width=_round_to(source.width, step), height=_round_to(source.height, step))
    second = plan(model, first, scale=scale, upscaler=upscaler, strength=strength, steps=steps, overrides=settings)
    return second.run(model, source, callback, extensions)


def _round_to(v: int, step: int) -> int:
    return max(step, v // step * step)
