"""Typed generation parameters, validated before any model work."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from . import samplers

MAX_SEED = 2**32 - 1  # A1111's seed range; seed + i must stay a valid torch seed


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
        _check_int("steps", self.steps, 1, limits.max_steps)
        _check_int("batch_size", self.batch_size, 1, limits.max_batch)
        _check_int("clip_skip", self.clip_skip, 1, limits.max_clip_skip,
                   f" (this model's text encoder has {limits.max_clip_skip} layers)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not (-1 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be -1 (random) or 0 to {MAX_SEED}, got {self.seed!r}")
        if self.seed + self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + batch of {self.batch_size} passes {MAX_SEED}")
        g = self.guidance_scale
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or not 0 <= g <= 100:
            raise ValueError(f"guidance_scale (CFG scale) must be a number from 0 to 100, got {g!r}")
        s = self.strength
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or not 0 < s <= 1:
            raise ValueError(f"strength (denoising strength) must be in (0, 1], got {s!r}")
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


def _check_int(name: str, value, lo: int, hi: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}{why}, got {value!r}")
