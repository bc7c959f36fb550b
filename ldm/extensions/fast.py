"""The opt-in fast preset: fewer U-Net FLOPs per image for a small change in the picture.

Two independent savings, both decided per step by `FastPreset`, a loop extension:

* Deep-feature reuse (the idea of DeepCache, Ma et al. 2023): between adjacent steps the U-Net's
  deep, low-resolution features barely change. Every `cache_interval`-th step runs the whole U-Net
  and keeps the input of the last up block; the steps in between run only the shallow path
  (conv_in -> first down block -> last up block -> conv_out) on top of that kept feature.
* Guidance truncation: late in the schedule the image is mostly fixed and the unconditional pass
  adds little, so the last `1 - cfg_until` of the steps run the conditional batch only.

The wrapper is created per run (`wrap_unet`), so a shared Pipeline stays stateless and thread-safe.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..denoise import Extension, WrappedUNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPreset(Extension):
    """`cache_interval`: full U-Net every k-th step (1 = never reuse). `cfg_until`: share of the
    steps, from the start, that keep classifier-free guidance (1.0 = all)."""

    cache_interval: int = 2
    cfg_until: float = 0.5

    def __post_init__(self) -> None:
        if self.cache_interval < 1:
            raise ValueError("cache_interval must be at least 1")
        if not 0.0 <= self.cfg_until <= 1.0:
            raise ValueError("cfg_until must be in [0, 1]")

    def guided_steps(self, total: int) -> int:
        """How many leading steps keep the unconditional pass; at least one, so guidance shapes the layout."""
        return max(1, math.ceil(total * self.cfg_until))

    def keeps_guidance(self, index: int, total: int) -> bool:
        return index < self.guided_steps(total)

    def wrap_unet(self, unet):
        return self.wrap(unet)

    def infotext(self) -> dict:
        return {"Fast": True}

    def wrap(self, unet):
        """A per-run U-Net callable that reuses deep features, or the U-Net itself if it cannot."""
        if self.cache_interval == 1:
            return unet
        reason = unsupported_reason(unet)
        if reason:
            log.info("fast preset: deep-feature reuse is off (%s); guidance truncation still applies", reason)
            return unet
        return DeepCacheUNet(unet, self.cache_interval)


def unsupported_reason(unet) -> str | None:
    """Why the shallow path cannot be run on this U-Net, or None."""
    needed = ("conv_in", "down_blocks", "up_blocks", "mid_block", "conv_out", "get_time_embed")
    if not all(hasattr(unet, n) for n in needed) or len(unet.up_blocks) < 2:
        return "not a diffusers UNet2DConditionModel"
    if getattr(unet.config, "addition_embed_type", None) not in (None, "text_time"):
        return "added embeddings other than SDXL's pooled text + time ids are not supported"
    if hasattr(unet, "_hf_hook"):
        return "the U-Net is offloaded with accelerate hooks that run on its forward only"
    # The last up block must need only the skips of conv_in and the first down block's resnets.
    if len(unet.up_blocks[-1].resnets) > 1 + len(unet.down_blocks[0].resnets):
        return "the last up block needs skips from deeper blocks"
    return None


class DeepCacheUNet(WrappedUNet):
    """Calls like the U-Net (`(sample, t, encoder_hidden_states=, class_labels=, added_cond_kwargs=, return_dict=False)`);
    call n runs the full network when n % interval == 0 and the shallow path otherwise."""

    def __init__(self, unet, interval: int):
        self.unet = unet
        self.interval = interval
        self.calls = 0
        self.full_calls = 0
        self.deep: torch.Tensor | None = None  # input of the last up block at the last full step

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None, return_dict: bool = False,
                 added_cond_kwargs: dict | None = None, **unsupported) -> tuple[torch.Tensor]:
        if any(v is not None for v in unsupported.values()):
            raise ValueError(f"the fast preset cannot be combined with {', '.join(sorted(unsupported))} (U-Net residuals "
                             "or other extra U-Net inputs); turn fast off")
        full = self.deep is None or self.calls % self.interval == 0
        self.calls += 1
        if full:
            self.full_calls += 1
            out = self._full(sample, timestep, encoder_hidden_states, class_labels, added_cond_kwargs)
        else:
            out = self._shallow(sample, timestep, encoder_hidden_states, class_labels, added_cond_kwargs)
        return (out,)

    # -- the two paths share the embedding prologue and the output epilogue of the U-Net ----------

    def _prologue(self, sample, timestep, ehs, class_labels, added):
        u = self.unet
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        class_emb = u.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
        aug_emb = u.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added or {})  # SDXL: pooled + sizes
        if aug_emb is not None:
            emb = emb + aug_emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        return u.conv_in(sample), emb, ehs

    def _epilogue(self, h: torch.Tensor) -> torch.Tensor:
        u = self.unet
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    def _full(self, sample, timestep, ehs, class_labels, added) -> torch.Tensor:
        u = self.unet
        h, emb, ehs = self._prologue(sample, timestep, ehs, class_labels, added)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks:
            h, res = _down(block, h, emb, ehs)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=ehs)
            else:
                h = u.mid_block(h, emb)
        # Odd latent sizes: each upsampler must hit its skip's exact size, as diffusers does.
        odd = any(d % 2**u.num_upsamplers for d in sample.shape[-2:])
        last = len(u.up_blocks) - 1
        for i, block in enumerate(u.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if i == last:
                self.deep = h
            size = skips[-1].shape[2:] if odd and i < last else None
            h = _up(block, h, emb, ehs, res, size)
        return self._epilogue(h)

    def _shallow(self, sample, timestep, ehs, class_labels, added) -> torch.Tensor:
        u = self.unet
        h, emb, ehs = self._prologue(sample, timestep, ehs, class_labels, added)
        _, res = _down(u.down_blocks[0], h, emb, ehs)
        skips = ((h,) + res)[: len(u.up_blocks[-1].resnets)]
        deep = self.deep
        if deep.shape[0] != h.shape[0]:
            # Guidance was just truncated: the cached batch is [uncond, cond]; keep the cond half.
            deep = deep[-h.shape[0]:]
        return self._epilogue(_up(u.up_blocks[-1], deep, emb, ehs, skips, None))


def _down(block, h, emb, ehs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
    return block(hidden_states=h, temb=emb)


def _up(block, h, emb, ehs, res, size):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs, upsample_size=size)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
