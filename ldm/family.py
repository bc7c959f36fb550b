"""Model families: what differs between SD 1.x/2.x and later families lives here, not in the loop.

A family owns the text encoders and how a prompt becomes conditioning (the cross-attention
embeddings, plus any loop extensions the family's U-Net needs, e.g. SDXL's pooled embeddings and
time ids), the default image size, and the limits its encoders impose (clip skip depth, tokens).

Adding a family: write a class with the members of `ModelFamily` (often a subclass of `SDFamily`),
return it from `family_for` for the components it recognises, and the engine, every task and the UI
work with it unchanged (docs/architecture.md has a worked example).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .components import Components
from .denoise import Extension
from .guidance import uses_cfg
from .latents import vae_scale_factor
from .params import GenerationParams
from .prompts import PromptEncoder


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning: [B, seq, dim] each; uncond is None when guidance is off."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    extensions: Sequence[Extension] = field(default_factory=tuple)  # what the family's U-Net needs besides


class ModelFamily(Protocol):
    """What the engine asks of a family."""

    name: str
    default_size: int  # native width/height in pixels
    max_clip_skip: int  # the text encoder's depth

    def token_count(self, text: str) -> int: ...

    def encode(self, p: GenerationParams) -> Conditioning: ...


class SDFamily:
    """Stable Diffusion 1.x and 2.x: one CLIP text encoder (OpenAI CLIP or OpenCLIP, same code path;
    epsilon or v-prediction is a scheduler setting), cross-attention on its hidden states."""

    name = "sd"

    def __init__(self, components: Components):
        self.prompts = PromptEncoder(components.tokenizer, components.text_encoder)
        self.default_size = int(components.unet.config.sample_size) * vae_scale_factor(components.vae)
        # A1111's clip skip n reads hidden state -n; the deepest that exists is the first layer's output.
        self.max_clip_skip = int(components.text_encoder.config.num_hidden_layers)

    def token_count(self, text: str) -> int:
        return self.prompts.token_count(text)

    def encode(self, p: GenerationParams) -> Conditioning:
        cond, uncond = self.prompts.encode_pair(p.prompt, p.negative_prompt, clip_skip=p.clip_skip,
                                                need_negative=uses_cfg(p.guidance_scale))
        b = p.batch_size
        return Conditioning(cond.repeat(b, 1, 1), None if uncond is None else uncond.repeat(b, 1, 1))


def family_for(components: Components) -> ModelFamily:
    """The family of loaded components (today every supported model is SD 1.x/2.x-shaped)."""
    return SDFamily(components)
