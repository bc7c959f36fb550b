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

import torch

from .guidance import apply_cfg, uses_cfg

# callback(step, total, latents) -> True to cancel the run
StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]
# hook(index, timestep, latents) -> latents
StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


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


def denoise(unet, inputs: DenoiseInputs, callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampler over `inputs.timesteps`; returns the final latents."""
    scheduler = inputs.scheduler
    cfg = uses_cfg(inputs.guidance_scale) and inputs.uncond is not None
    # Everything that does not change per step is prepared once, outside the loop.
    embeds = torch.cat([inputs.uncond, inputs.cond]) if cfg else inputs.cond
    extra = inputs.extra_channels
    labels = inputs.class_labels
    if cfg:
        extra = torch.cat([extra] * 2) if extra is not None else None
        labels = torch.cat([labels] * 2) if labels is not None else None
    step_kwargs = _step_kwargs(scheduler, inputs.generators)
    latents = inputs.latents
    total = len(inputs.timesteps)

    for i, t in enumerate(inputs.timesteps):
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if extra is not None:
            model_in = torch.cat([model_in, extra], dim=1)
        pred = unet(model_in, t, encoder_hidden_states=embeds, class_labels=labels, return_dict=False)[0]
        if cfg:
            pred = apply_cfg(pred, inputs.guidance_scale)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if inputs.after_step is not None:
            latents = inputs.after_step(i, t, latents)
        if callback is not None and callback(i + 1, total, latents):
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
    return latents


def _step_kwargs(scheduler, gens: Sequence[torch.Generator]) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = list(gens)
    if "eta" in params:
        kwargs["eta"] = 0.0  # DDIM: deterministic, as A1111's default
    return kwargs
