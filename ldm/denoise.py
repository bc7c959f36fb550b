"""The one denoising loop every task runs.

Tasks differ only in what they hand this loop: initial latents, the slice of the schedule to run
(img2img strength), extra U-Net input channels (inpainting models' mask + masked image, the x4
upscaler's low-res image), a class label (the upscaler's noise level), and an optional hook run
after each scheduler step (blending known latents back in for inpainting with a regular model).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .guidance import apply_cfg, uses_cfg

# callback(step, total, latents) -> True to cancel the run
StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]
# hook(index, timestep, latents) -> latents
StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class StepPolicy(Protocol):
    """Opt-in per-run speed-ups (see ldm.fastpath.FastPreset): how many leading steps keep the
    unconditional pass, and a per-run wrapper around the U-Net."""

    def guided_steps(self, total: int) -> int: ...

    def wrap(self, unet): ...


class Cancelled(Exception):
    """The progress callback asked to stop. The pipeline stays usable."""


@dataclass
class DenoiseInputs:
    latents: torch.Tensor  # initial latents, already scaled/noised for the first timestep
    timesteps: torch.Tensor  # the part of the schedule to run
    scheduler: object  # a fresh diffusers scheduler with set_timesteps already called
    cond: torch.Tensor  # text conditioning for the batch [B, seq, dim]
    uncond: torch.Tensor | None  # negative conditioning, same shape; None when guidance is off
    guidance_scale: float
    generators: Sequence[torch.Generator]  # per-image RNGs for stochastic samplers
    extra_channels: torch.Tensor | None = None  # concatenated to the scaled latents [B, c, h, w]
    class_labels: torch.Tensor | None = None  # e.g. the upscaler's noise level, [B]
    after_step: StepHook | None = None
    policy: StepPolicy | None = None  # None: every step is the plain diffusers step


def denoise(unet, inputs: DenoiseInputs, callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampler over `inputs.timesteps`; returns the final latents."""
    scheduler = inputs.scheduler
    cfg = uses_cfg(inputs.guidance_scale) and inputs.uncond is not None
    latents = inputs.latents
    total = len(inputs.timesteps)
    policy = inputs.policy
    if policy is not None:
        unet = policy.wrap(unet)
    # Step index at which the unconditional pass is dropped (total: never).
    cfg_until = policy.guided_steps(total) if policy is not None and cfg else total
    # Latents (and the sampler's math) may stay float32 while the U-Net runs in bfloat16.
    unet_dtype = getattr(unet, "dtype", latents.dtype)
    cast = unet_dtype != latents.dtype
    # Everything that does not change per step is prepared once, outside the loop.
    embeds = (torch.cat([inputs.uncond, inputs.cond]) if cfg else inputs.cond).to(unet_dtype)
    extra = inputs.extra_channels
    labels = inputs.class_labels
    if cfg:
        extra = torch.cat([extra] * 2) if extra is not None else None
        labels = torch.cat([labels] * 2) if labels is not None else None
    step_kwargs = _step_kwargs(scheduler, inputs.generators)

    for i, t in enumerate(inputs.timesteps):
        if i == cfg_until:  # only with a policy: from here on the batch is the conditional half
            cfg, embeds, extra, labels = False, _cond_half(embeds), _cond_half(extra), _cond_half(labels)
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if extra is not None:
            model_in = torch.cat([model_in, extra], dim=1)
        if cast:
            model_in = model_in.to(unet_dtype)
        pred = unet(model_in, t, encoder_hidden_states=embeds, class_labels=labels, return_dict=False)[0]
        if cast:
            pred = pred.to(latents.dtype)
        if cfg:
            pred = apply_cfg(pred, inputs.guidance_scale)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if inputs.after_step is not None:
            latents = inputs.after_step(i, t, latents)
        if callback is not None and callback(i + 1, total, latents):
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
    return latents


def _cond_half(x: torch.Tensor | None) -> torch.Tensor | None:
    """The conditional rows of a [uncond, cond] batch."""
    return None if x is None else x.chunk(2)[1]


def _step_kwargs(scheduler, gens: Sequence[torch.Generator]) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = list(gens)
    if "eta" in params:
        kwargs["eta"] = 0.0  # DDIM: deterministic, as A1111's default
    return kwargs
