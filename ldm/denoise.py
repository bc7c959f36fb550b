"""The one denoising loop every task and model family runs, and the hooks that extend it.

A task hands the loop its initial latents, the slice of the schedule to run and a list of
`Extension`s. Everything feature-specific lives in an extension (ldm/extensions/): extra U-Net
input channels (inpainting models, the x4 upscaler), added conditioning (class labels; SDXL's
pooled embeddings and time ids), residuals added inside the U-Net (ControlNet), a post-step blend
(inpainting with a regular model), a U-Net wrapper or fewer guided steps (the fast preset). The loop
calls each hook of every extension in list order and has no branch for any particular feature.

Batch convention: a guided step runs the U-Net on `[uncond rows, cond rows]`; per-image tensors
are doubled with `StepInfo.batch` (= `guidance.guided_batch`). With AND sub-prompts (composable
diffusion) the cond rows are one group of B per sub-prompt, `StepInfo.conds` of them, and
`StepInfo.batch` repeats per-image tensors for every group.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .devices import weights_dtype
from .guidance import apply_cfg, guided_batch, uses_cfg

# callback(step, total, latents) -> True to cancel the run
StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


class Cancelled(Exception):
    """The progress callback asked to stop. The pipeline stays usable."""


@dataclass(frozen=True)
class StepInfo:
    """What a hook knows about the current step."""

    index: int  # 0-based position in the timesteps being run
    total: int  # number of timesteps being run
    timestep: torch.Tensor
    guided: bool  # this step runs the [uncond, cond] batch
    conds: int = 1  # groups of cond rows: the prompt's AND sub-prompts

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image rows [B, ...] -> the rows this step's U-Net batch needs."""
        return guided_batch(x, self.guided, self.conds)


class WrappedUNet:
    """Base of what `Extension.wrap_unet` returns: a callable standing in for `self.unet` in the loop,
    which still shows the wrapped U-Net's dtype and config."""

    unet: object

    @property
    def dtype(self) -> torch.dtype:
        return weights_dtype(self.unet)

    @property
    def config(self):
        return self.unet.config


class Extension:
    """Hooks of the denoising loop; each default does nothing, so an extension overrides only what it needs."""

    def wrap_unet(self, unet):
        """Once per run: return a callable used in place of the U-Net (same call signature)."""
        return unet

    def keeps_guidance(self, index: int, total: int) -> bool:
        """False drops the unconditional pass at this step (guidance is also off at scale <= 1)."""
        return True

    def extra_channels(self, step: StepInfo) -> torch.Tensor | None:
        """Channels concatenated after the scaled latents, already batched with `step.batch`."""
        return None

    def text_embeds(self, step: StepInfo) -> torch.Tensor | None:
        """This step's text conditioning, rows as `step.batch` lays them out, in place of the run's fixed
        `cond`/`uncond` (a scheduled prompt); when several extensions give one, the last wins."""
        return None

    def unet_kwargs(self, step: StepInfo) -> dict:
        """Extra U-Net keyword arguments (class_labels, added_cond_kwargs, ...), batched with `step.batch`."""
        return {}

    def residuals(self, step: StepInfo, latents_in: torch.Tensor, embeds: torch.Tensor,
                  unet_kwargs: dict) -> dict | None:
        """Residuals added inside the U-Net (`down_block_additional_residuals`, a tuple, and
        `mid_block_additional_residual`); from several extensions they add up. `latents_in` are the scaled
        latents before extra channels, `embeds` the step's text conditioning, `unet_kwargs` the step's other
        U-Net keyword arguments (every extension's `unet_kwargs` merged, e.g. SDXL's added_cond_kwargs)."""
        return None

    def after_step(self, step: StepInfo, latents: torch.Tensor) -> torch.Tensor:
        """The latents after the scheduler step; return the (possibly changed) latents."""
        return latents

    def infotext(self) -> dict:
        """Entries this extension adds to the images' infotext (not a loop hook: read once per run)."""
        return {}


@dataclass
class DenoiseInputs:
    latents: torch.Tensor  # initial latents, already scaled/noised for the first timestep
    timesteps: torch.Tensor  # the part of the schedule to run
    scheduler: object  # a fresh diffusers scheduler with set_timesteps already called
    cond: torch.Tensor  # text conditioning [B * len(cond_weights), seq, dim]: B rows per sub-prompt
    uncond: torch.Tensor | None  # negative conditioning [B, seq, dim]; None when guidance is off
    guidance_scale: float
    generators: Sequence[torch.Generator]  # per-image RNGs for stochastic samplers
    extensions: Sequence[Extension] = field(default_factory=tuple)
    cond_weights: Sequence[float] = (1.0,)  # guidance weight of each sub-prompt (A1111's AND)


def denoise(unet, inputs: DenoiseInputs, callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampler over `inputs.timesteps`; returns the final latents."""
    scheduler, exts = inputs.scheduler, list(inputs.extensions)
    cfg = uses_cfg(inputs.guidance_scale) and inputs.uncond is not None
    latents = inputs.latents
    total = len(inputs.timesteps)
    for ext in exts:
        unet = ext.wrap_unet(unet)
    # Latents (and the sampler's math) may stay float32 while the U-Net runs in bfloat16.
    unet_dtype = weights_dtype(unet) if isinstance(unet, torch.nn.Module) else getattr(unet, "dtype", latents.dtype)
    # Both conditioning batches are built once, outside the loop.
    cond = inputs.cond.to(unet_dtype)
    both = torch.cat([inputs.uncond, inputs.cond]).to(unet_dtype) if cfg else None
    step_kwargs = _step_kwargs(scheduler, inputs.generators)
    weights = tuple(inputs.cond_weights)

    for i, t in enumerate(inputs.timesteps):
        step = StepInfo(i, total, t, cfg and all(e.keeps_guidance(i, total) for e in exts), len(weights))
        embeds = step_embeds(step, exts, both if step.guided else cond).to(unet_dtype)
        latents_in = scheduler.scale_model_input(step.batch(latents), t)
        channels = [c for e in exts if (c := e.extra_channels(step)) is not None]
        model_in = torch.cat([latents_in, *channels], dim=1) if channels else latents_in
        kwargs = {}
        for ext in exts:
            kwargs.update(ext.unet_kwargs(step))
        given = dict(kwargs)  # what the residual hooks see: the U-Net's inputs, not each other's residuals
        kwargs.update(_sum_residuals(e.residuals(step, latents_in, embeds, given) for e in exts))
        pred = unet(model_in.to(unet_dtype), t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
        pred = pred.to(latents.dtype)
        pred = apply_cfg(pred, inputs.guidance_scale, weights, step.guided)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        for ext in exts:
            latents = ext.after_step(step, latents)
        if callback is not None and callback(i + 1, total, latents):
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
    return latents


def step_embeds(step: StepInfo, exts: Sequence[Extension], fixed: torch.Tensor) -> torch.Tensor:
    """The text conditioning of this step: the last extension's `text_embeds`, else the run's `fixed` one."""
    for ext in exts:
        embeds = ext.text_embeds(step)
        if embeds is not None:
            fixed = embeds
    return fixed


def _sum_residuals(parts) -> dict:
    """Add the residual dicts of several extensions key by key (tuples element-wise)."""
    out: dict = {}
    for part in parts:
        for key, value in (part or {}).items():
            if key not in out:
                out[key] = value
            elif isinstance(value, tuple):
                out[key] = tuple(a + b for a, b in zip(out[key], value))
            else:
                out[key] = out[key] + value
    return out


def _step_kwargs(scheduler, gens: Sequence[torch.Generator]) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = list(gens)
    if "eta" in params:
        kwargs["eta"] = 0.0  # DDIM: deterministic, as A1111's default
    return kwargs
