"""Classifier-free guidance: the U-Net batch is [uncond rows, cond rows]."""
from __future__ import annotations

import torch


def uses_cfg(guidance_scale: float) -> bool:
    """At a scale of 1 or less the unconditional pass cannot change the result; skip it."""
    return guidance_scale > 1.0


def guided_batch(x: torch.Tensor, guided: bool) -> torch.Tensor:
    """Per-image rows -> the U-Net batch: [x, x] (uncond rows, then cond rows) when guided, else x."""
    return torch.cat([x, x]) if guided else x


def apply_cfg(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Combine a U-Net output batched as [uncond, cond] into the guided prediction."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
