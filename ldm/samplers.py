"""Sampler registry: A1111 display names -> diffusers schedulers.

Each entry is a scheduler class plus the kwargs that turn it into the sampler users know by that
name. A scheduler is built per generation with `from_config(model's scheduler config, **kwargs)`,
so concurrent requests never share scheduler state.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: type[SchedulerMixin]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def accepts(self, option: str) -> bool:
        return option in inspect.signature(self.scheduler.__init__).parameters


SAMPLERS: Mapping[str, SamplerSpec] = {
    "DPM++ 2M": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": SamplerSpec(DPMSolverSDEScheduler),
    "DPM++ 2M SDE": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 3M SDE": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "Euler a": SamplerSpec(EulerAncestralDiscreteScheduler),
    "Euler": SamplerSpec(EulerDiscreteScheduler),
    "LMS": SamplerSpec(LMSDiscreteScheduler),
    "Heun": SamplerSpec(HeunDiscreteScheduler),
    "DPM2": SamplerSpec(KDPM2DiscreteScheduler),
    "DPM2 a": SamplerSpec(KDPM2AncestralDiscreteScheduler),
    "DDIM": SamplerSpec(DDIMScheduler),
    "PLMS": SamplerSpec(PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": SamplerSpec(UniPCMultistepScheduler),
    "DEIS": SamplerSpec(DEISMultistepScheduler),
    "LCM": SamplerSpec(LCMScheduler),
}

# Schedule type -> (scheduler option it needs, value). "Automatic" keeps the scheduler's own spacing.
SCHEDULES: Mapping[str, tuple[str, Any] | None] = {
    "Automatic": None,
    "Karras": ("use_karras_sigmas", True),
    "Exponential": ("use_exponential_sigmas", True),
    "Beta": ("use_beta_sigmas", True),
    "SGM Uniform": ("timestep_spacing", "trailing"),
}

DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_SCHEDULE = "Automatic"


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def schedule_names(sampler: str | None = None) -> list[str]:
    """Schedule types, or only those the given sampler supports."""
    if sampler is None:
        return list(SCHEDULES)
    spec = SAMPLERS[resolve(sampler, "Automatic")[0]]
    return [name for name, opt in SCHEDULES.items() if opt is None or spec.accepts(opt[0])]


def resolve(sampler: str, schedule: str | None = "Automatic") -> tuple[str, str]:
    """Validate a (sampler, schedule) pair; accepts A1111's pre-1.9 combined names ("DPM++ 2M Karras").

    Raises ValueError naming the valid choices; never falls back to a default.
    """
    for what, value in (("sampler", sampler), ("schedule type", schedule)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{what} must be a name (text), got {type(value).__name__} {value!r:.60}")
    schedule = schedule or "Automatic"
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    name = sampler
    if name not in SAMPLERS:
        base, _, suffix = sampler.rpartition(" ")
        if base in SAMPLERS and suffix in SCHEDULES and suffix != "Automatic":
            if schedule not in ("Automatic", suffix):
                raise ValueError(f"sampler {sampler!r} already implies schedule {suffix!r}, but {schedule!r} was asked for")
            name, schedule = base, suffix
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    option = SCHEDULES[schedule]
    if option is not None and not SAMPLERS[name].accepts(option[0]):
        raise ValueError(
            f"sampler {name!r} does not support the {schedule!r} schedule; "
            f"it supports: {', '.join(schedule_names(name))}"
        )
    return name, schedule


def calls_per_step(sampler: str) -> int:
    """U-Net calls per step: 2 for second-order samplers (Heun, DPM2, DPM++ SDE), as A1111 counts its steps."""
    return int(SAMPLERS[resolve(sampler)[0]].scheduler.order)


def scheduler_kwargs(sampler: str, schedule: str | None = "Automatic", *, seeds: Sequence[int] = ()) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """The scheduler class and the from_config kwargs for this sampler and schedule."""
    name, schedule = resolve(sampler, schedule)
    spec = SAMPLERS[name]
    kwargs = dict(spec.kwargs)
    option = SCHEDULES[schedule]
    if option is not None:
        kwargs[option[0]] = option[1]
    if spec.accepts("noise_sampler_seed") and seeds:
        # Brownian-tree SDE samplers draw their noise from per-image seeds, not from a generator.
        kwargs["noise_sampler_seed"] = list(seeds)
    return spec.scheduler, kwargs


def make_scheduler(sampler: str, schedule: str | None, config: Mapping[str, Any], *, seeds: Sequence[int] = ()) -> SchedulerMixin:
    """A fresh scheduler for one generation, from the model's scheduler config."""
    cls, kwargs = scheduler_kwargs(sampler, schedule, seeds=seeds)
    return cls.from_config(config, **kwargs)
