"""Inpainting with a regular (4-channel) model, as diffusers does it: after every step the kept area
becomes the original latents noised to the next timestep, with the same noise as the start (and the
clean original after the last step); the masked area keeps what the model drew."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoise import Extension, StepInfo


@dataclass(frozen=True)
class KnownAreaBlend(Extension):
    scheduler: object  # the run's scheduler (for add_noise)
    timesteps: torch.Tensor  # the timesteps being run
    known: torch.Tensor  # clean latents of the original image [B, c, h, w]
    noise: torch.Tensor  # the start noise, same shape
    mask: torch.Tensor  # latent-size mask, 1 = repaint

    def after_step(self, step: StepInfo, latents: torch.Tensor) -> torch.Tensor:
        target = self.known
        if step.index < len(self.timesteps) - 1:
            target = self.scheduler.add_noise(self.known, self.noise, self.timesteps[step.index + 1 : step.index + 2])
        return (1 - self.mask) * target + self.mask * latents
