"""Classifier-free guidance: the U-Net batch is [uncond rows, cond rows], or with A1111's `AND`
(composable diffusion) [uncond rows, sub-prompt 1 rows, ..., sub-prompt n rows]."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def uses_cfg(guidance_scale: float) -> bool:
    """At a scale of 1 or less the unconditional pass cannot change the result; skip it."""
    return guidance_scale > 1.0


def guided_batch(x: torch.Tensor, guided: bool, conds: int = 1) -> torch.Tensor:
    """Per-image rows -> the U-Net batch: one copy for the uncond rows when guided, one per sub-prompt."""
    copies = conds + guided
    return torch.cat([x] * copies) if copies > 1 else x


def apply_cfg(noise_pred: torch.Tensor, guidance_scale: float, weights: Sequence[float] = (1.0,),
              guided: bool = True) -> torch.Tensor:
    """Combine a U-Net output batched as [uncond, cond_1, ..., cond_n] into the guided prediction:
    uncond + scale * sum_i w_i (cond_i - uncond), as A1111 combines AND sub-prompts.

    Unguided ([cond_1, ..., cond_n], the unconditional pass dropped) a single sub-prompt is the
    prediction; several are combined as A1111 does when it skips that pass: the last stands in for
    the unconditional rows, at scale 1."""
    parts = noise_pred.chunk(len(weights) + guided)
    if not guided:
        if len(parts) == 1:
            return noise_pred
        uncond, conds, guidance_scale = parts[-1], parts, 1.0
    else:
        uncond, conds = parts[0], parts[1:]
    out = uncond
    for weight, cond in zip(weights, conds):
        out = out + (guidance_scale * weight) * (cond - uncond)
    return out
