"""Typed generation parameters, validated before any model work."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from . import samplers

MAX_SEED = 2**32 - 1  # A1111's seed range; seed + i must stay a valid torch seed


@dataclass(frozen=True)
class Range:
    """The values a number may take: `low` to `high`, an end itself excluded when open (strength > 0)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        return above and (value < self.high if self.open_high else value <= self.high)

    def text(self) -> str:
        if math.isinf(self.high):
            return f"more than {self.low:g}" if self.open_low else f"{self.low:g} or more"
        if not (self.open_low or self.open_high):
            return f"{self.low:g} to {self.high:g}"
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


# The fixed ranges; the per-model ones (sizes, steps, batch, clip skip) are Limits.range's.
GUIDANCE = Range(0, 100)  # CFG scale; at 1 or below the unconditional pass is skipped
STRENGTH = Range(0, 1, open_low=True)  # share of the schedule run on an input image
HIRES_SCALE = Range(1, math.inf)  # 1 = no enlargement; the size it gives is checked against max_size
CONTROL_WEIGHT = Range(0, 2)  # a ControlNet unit's weight
CONTROL_STEPS = Range(0, 1)  # a ControlNet unit's start and end, fractions of the steps
REFINER_SWITCH = Range(0, 1, open_low=True, open_high=True)  # the fraction of the steps before the refiner
# Inpainting, outpainting and the x4 upscaler, in pixels of the input image.
MASK_BLUR = Range(0, 1024)  # the feather's Gaussian sigma; far past any picture's size (PIL's blur kills the process near 1e10)
INPAINT_PADDING = Range(0, math.inf)  # "only masked": around the mask's box, which stops at the image's edges
OUTPAINT_SIDE = Range(0, math.inf)  # added on one side; the whole canvas is bounded by the input-image pixel limit
UPSCALE_TILE = Range(8, math.inf)  # the x4 upscaler's tile side (None: automatic); one past the image is one piece
TILE_OVERLAP = Range(0, math.inf)  # between x4 tiles; with a tile size given, also at most half of it
# Tiles ldm picks (tile size None, or halved after running out of memory) overlap by at most this share of
# their side: a larger overlap asked for is lowered to it, with a warning in the log and the overlap used
# in the infotext.
AUTO_TILE_OVERLAP = 1 / 4


@dataclass(frozen=True)
class Limits:
    """What one pipeline accepts. size_step comes from the VAE's latent factor, max_clip_skip from the
    text encoder's depth, the rest from `ldm.Options`."""

    size_step: int = 8
    max_size: int = 2048
    max_batch: int = 16
    max_steps: int = 1000
    max_clip_skip: int = 12
    max_prompt_tokens: int = 1200

    def range(self, name: str) -> Range:
        """The values `validate` (and the hires fix) accept for a number: the one table the UI's sliders read.
        Sizes are also multiples of size_step."""
        return {"width": Range(self.size_step, self.max_size), "height": Range(self.size_step, self.max_size),
                "steps": Range(1, self.max_steps), "batch_size": Range(1, self.max_batch),
                "clip_skip": Range(1, self.max_clip_skip), "guidance_scale": GUIDANCE, "strength": STRENGTH,
                "hires_scale": HIRES_SCALE}[name]

    @property
    def max_prompt_chars(self) -> int:
        """Text longer than this is refused before tokenising (a CLIP token is rarely over 16 characters)."""
        return 16 * self.max_prompt_tokens


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.0
    sampler: str = samplers.DEFAULT_SAMPLER
    schedule: str = samplers.DEFAULT_SCHEDULE
    seed: int = -1
    batch_size: int = 1
    clip_skip: int = 1
    strength: float = 1.0  # share of the schedule run on an input image (img2img, inpaint)

    def validate(self, limits: Limits, count_tokens: Callable[[str], int] | None = None) -> "GenerationParams":
        """Raise ValueError with a readable message, or return a copy with the sampler name canonical.
        `count_tokens` (the model's tokenizer) enforces limits.max_prompt_tokens per prompt."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ValueError(f"{name} must be text")
            if len(text) > limits.max_prompt_chars:
                raise ValueError(f"{name} is {len(text):,} characters long; the limit is {limits.max_prompt_chars:,} "
                                 f"(and {limits.max_prompt_tokens:,} tokens)")
            if count_tokens is not None and (n := count_tokens(text)) > limits.max_prompt_tokens:
                raise ValueError(f"{name} is {n:,} tokens long; the limit is {limits.max_prompt_tokens:,} "
                                 f"({limits.max_prompt_tokens // 75} chunks of 75 tokens)")
        for name in ("width", "height"):
            v = self.width if name == "width" else self.height
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be a whole number of pixels, got {v!r}")
            if v <= 0 or v > limits.max_size:
                raise ValueError(f"{name} {v} is out of range: use 1 to {limits.max_size} pixels")
            if v % limits.size_step:
                raise ValueError(f"{name} {v} is not a multiple of {limits.size_step} (this model's size step)")
        check_int("steps", self.steps, limits.range("steps"))
        check_int("batch_size", self.batch_size, limits.range("batch_size"))
        check_int("clip_skip", self.clip_skip, limits.range("clip_skip"),
                   f" (this model's text encoder has {limits.max_clip_skip} layers)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not (-1 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be -1 (random) or 0 to {MAX_SEED}, got {self.seed!r}")
        if self.seed + self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + batch of {self.batch_size} passes {MAX_SEED}")
        g = self.guidance_scale
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g not in GUIDANCE:
            raise ValueError(f"guidance_scale (CFG scale) must be a number from {GUIDANCE.text()}, got {g!r}")
        s = self.strength
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s not in STRENGTH:
            raise ValueError(f"strength (denoising strength) must be in {STRENGTH.text()}, got {s!r}")
        sampler, schedule = samplers.resolve(self.sampler, self.schedule)
        return replace(self, sampler=sampler, schedule=schedule)

    def with_seed(self) -> "GenerationParams":
        """Replace seed -1 with a concrete random seed (reported back in the result)."""
        if self.seed != -1:
            return self
        return replace(self, seed=random.randint(0, MAX_SEED - self.batch_size + 1))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def check_int(name: str, value, allowed: Range, why: str = "") -> None:
    """Raise ValueError naming `name` unless `value` is a whole number in `allowed` (bools are not numbers)."""
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        span = f", {allowed.text()}" if math.isinf(allowed.high) else f" from {allowed.text()}"
        raise ValueError(f"{name} must be a whole number{span}{why}, got {value!r}")
