"""Model families: what differs between SD 1.x/2.x and later families lives here, not in the loop.

A family owns the text encoders and how a prompt becomes conditioning (the cross-attention
embeddings, plus any loop extensions the family's U-Net needs, e.g. SDXL's pooled embeddings and
time ids), the default image size, and the limits its encoders impose (clip skip depth, tokens).

Adding a family: write a class with the members of `ModelFamily` (often a subclass of `SDFamily`),
return it from `family_for` for the components it recognises, and the engine, every task and the UI
work with it unchanged (docs/architecture.md has a worked example).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .components import Components
from .conditioning import Conditioning, plan_for, scheduled
from .family_sdxl import SDXLFamily, is_sdxl
from .guidance import uses_cfg
from .latents import vae_scale_factor
from .params import GenerationParams
from .prompt_schedule import PromptPlan, StepTexts
from .prompts import Chunk, PromptEncoder


class ModelFamily(Protocol):
    """What the engine asks of a family."""

    name: str
    default_size: int  # native width/height in pixels
    max_clip_skip: int  # the text encoder's depth

    def token_count(self, text: str) -> int: ...

    def encode(self, p: GenerationParams, plan: PromptPlan | None = None) -> Conditioning: ...


class SDFamily:
    """Stable Diffusion 1.x and 2.x: one CLIP text encoder (OpenAI CLIP or OpenCLIP, same code path;
    epsilon or v-prediction is a scheduler setting), cross-attention on its hidden states."""

    name = "sd"

    def __init__(self, components: Components, embeddings=None):
        # embeddings: ldm.embeddings.EmbeddingFiles (a models folder's textual inversions), or None
        te = components.text_encoder
        width = te.get_input_embeddings().embedding_dim
        self.prompts = PromptEncoder(components.tokenizer, te,
                                     embeddings.for_encoder(components.tokenizer, width) if embeddings else None)
        self.default_size = int(components.unet.config.sample_size) * vae_scale_factor(components.vae)
        # A1111's clip skip n reads hidden state -n; the deepest that exists is the first layer's output.
        self.max_clip_skip = int(components.text_encoder.config.num_hidden_layers)

    def token_count(self, text: str) -> int:
        return self.prompts.token_count(text)

    def encode(self, p: GenerationParams, plan: PromptPlan | None = None) -> Conditioning:
        """p's conditioning, step by step as `plan` (by default p's own prompt schedule) says: every distinct
        text encoded once, all padded to one length."""
        plan = plan or plan_for(p)
        guided = uses_cfg(p.guidance_scale)
        chunks = {t: self.prompts.chunks(t) for t in plan.texts(negative=guided)}
        n = max(len(c) for c in chunks.values())
        # Shorter texts are padded with empty chunks so that all have the same sequence length.
        encoded = {t: self.prompts.encode_chunks(c + [Chunk() for _ in range(n - len(c))], p.clip_skip)
                   for t, c in chunks.items()}
        b = p.batch_size

        def build(texts: StepTexts) -> Conditioning:
            cond = torch.cat([encoded[t].repeat(b, 1, 1) for t in texts.conds])
            return Conditioning(cond, encoded[texts.uncond].repeat(b, 1, 1) if guided else None, (), plan.weights)

        used = [e for text_chunks in chunks.values() for c in text_chunks for _, e in c.fixes]
        info = (self.prompts.embeddings.hashes(used),) if used else ()  # infotext "TI hashes"
        return scheduled(plan, build, info)


def family_for(components: Components, embeddings=None) -> ModelFamily:
    """The family of loaded components: SDXL when the U-Net takes SDXL's added "text_time"
    conditioning, else SD 1.x/2.x."""
    if is_sdxl(components):
        return SDXLFamily(components, embeddings)
    return SDFamily(components, embeddings)
