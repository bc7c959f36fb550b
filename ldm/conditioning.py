"""`Conditioning`: what a model family's `encode` hands the engine (kept apart from ldm.family so that
family modules can build it without importing the module that picks them)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .denoise import Extension


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning: [B, seq, dim] each; uncond is None when guidance is off."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    extensions: Sequence[Extension] = field(default_factory=tuple)  # what the family's U-Net needs besides
