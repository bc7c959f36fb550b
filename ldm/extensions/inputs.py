"""Extra U-Net inputs that stay fixed for a whole run: channels concatenated to the latents
(inpainting models: mask + masked-image latents; the x4 upscaler: the noised low-res image) and
class labels (the x4 upscaler's noise level)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoise import Extension, StepInfo


@dataclass(frozen=True)
class UNetInputs(Extension):
    channels: torch.Tensor | None = None  # [B, c, h, w], one row per image
    class_labels: torch.Tensor | None = None  # [B]

    def extra_channels(self, step: StepInfo) -> torch.Tensor | None:
        return None if self.channels is None else step.batch(self.channels)

    def unet_kwargs(self, step: StepInfo) -> dict:
        return {} if self.class_labels is None else {"class_labels": step.batch(self.class_labels)}
