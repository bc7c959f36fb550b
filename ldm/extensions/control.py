"""ControlNet as a loop extension: one `ControlResiduals` per unit; the loop adds up their residuals.

Per step, as diffusers' `StableDiffusionControlNetPipeline` (and its SDXL twin) does it:

* a unit is active at step i of n unless i/n < start or (i + 1)/n > end; an inactive unit costs
  nothing (the ControlNet is not called; diffusers calls it and multiplies by 0, the same sum);
* the ControlNet sees the scaled 4-channel latents (before any inpainting channels), the step's text
  conditioning, the U-Net's added conditioning (SDXL's pooled embeddings and time ids, as
  `StableDiffusionXLControlNetPipeline` passes them) and the control image in [0, 1], repeated per
  image and doubled for a guided step;
* its residuals are scaled by the weight; in guess mode by weight * logspace(-1, 0) (0.1 for the
  shallowest residual up to 1 for the middle block), and with guidance it runs on the conditional
  half only, the unconditional half getting zeros. `soft` is that scaling on both halves (A1111's
  "My prompt is more important").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..denoise import Extension, StepInfo


def active(index: int, total: int, start: float, end: float) -> bool:
    """diffusers' keep rule: step `index` of `total` is controlled unless it lies outside [start, end]."""
    return not (index / total < start or (index + 1) / total > end)


@dataclass(frozen=True, eq=False)
class ControlResiduals(Extension):
    net: torch.nn.Module  # a diffusers ControlNetModel on the U-Net's device
    image: torch.Tensor  # [B, 3, H, W] in [0, 1], one row per image, at the generation size
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    soft: bool = False
    info: dict = field(default_factory=dict)  # infotext entries ({"ControlNet 0": "Module: ..."})

    def residuals(self, step: StepInfo, latents_in: torch.Tensor, embeds: torch.Tensor,
                  unet_kwargs: dict) -> dict | None:
        if self.weight == 0 or not active(step.index, step.total, self.start, self.end):
            return None
        # Guess mode (or a ControlNet trained with pooled conditions, which diffusers always runs so).
        guess = self.guess_mode or bool(getattr(self.net.config, "global_pool_conditions", False))
        cond_only = guess and step.guided
        image = step.batch(self.image)
        dtype = self.net.dtype
        added = {k: v.to(dtype) for k, v in (unet_kwargs.get("added_cond_kwargs") or {}).items()}
        if cond_only:  # [uncond, cond] -> cond (one group per AND sub-prompt)
            b = self.image.shape[0]
            image, latents_in, embeds = image[b:], latents_in[b:], embeds[b:]
            added = {k: v[b:] for k, v in added.items()}
        down, mid = self.net(latents_in.to(dtype), step.timestep, encoder_hidden_states=embeds.to(dtype),
                             controlnet_cond=image.to(dtype), conditioning_scale=self.weight,
                             guess_mode=guess or self.soft, added_cond_kwargs=added or None, return_dict=False)
        if cond_only:
            down = [torch.cat([torch.zeros_like(d[:b]), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid[:b]), mid])
        out = embeds.dtype  # the U-Net's dtype: the residuals are added to its features
        return {"down_block_additional_residuals": tuple(d.to(out) for d in down),
                "mid_block_additional_residual": mid.to(out)}

    def infotext(self) -> dict:
        return dict(self.info)
