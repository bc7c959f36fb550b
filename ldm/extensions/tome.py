"""Token merging (opt-in): fewer tokens in the highest-resolution self-attention, for speed.

The idea is ToMe for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"; the tomesd package): neighbouring latent pixels carry nearly the same features, so
before a self-attention the most similar tokens are averaged together, attention runs on the shorter
sequence, and afterwards every merged token gets its group's result back (unmerge). Self-attention
costs N² in the tokens, so merging half of them at 512 px (4096 -> 2048) removes about 3/4 of the
largest attention's work; the picture changes slightly (measured in docs/performance.md).

How the merge is chosen (bipartite soft matching, per image and per attention call): the token grid
is cut into `stride` x `stride` cells; one token per cell, at a seeded random position, is a
destination, the rest are sources. Each source finds its most similar destination (cosine similarity
of the attention's input); the `ratio` x N sources with the highest similarity are averaged into
their destinations, the others stay. Only self-attention (attn1) is merged, and only at the
resolutions `max_downsample` allows (1: the full latent resolution, SD 1.x's 64x64 at 512 px; SDXL
has no attention there, use 2).

The wrapper swaps attention processors for the duration of each U-Net call and puts the originals
back afterwards, so a pipeline without the extension is untouched (run one call at a time per model,
as with LoRA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..denoise import Extension, WrappedUNet
from .fast import DeepCacheUNet

DOWNSAMPLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class TokenMerging(Extension):
    """`ratio`: share of the tokens merged away (0 < ratio < 1; tomesd's default 0.5).
    `max_downsample`: merge at latent resolution / 1, 2, 4 or 8 and finer. `seed`: the destination
    positions' RNG (fixed, so a seed gives the same picture every run)."""

    ratio: float = 0.5
    max_downsample: int = 1
    stride: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TokenMerging":
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"token merging ratio must be between 0 and 1 (exclusive); got {self.ratio!r}")
        if self.max_downsample not in DOWNSAMPLES:
            raise ValueError(f"max_downsample must be one of {', '.join(map(str, DOWNSAMPLES))}; got {self.max_downsample!r}")
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 2:
            raise ValueError(f"stride must be a whole number of at least 2; got {self.stride!r}")
        return self

    def wrap_unet(self, unet):
        return TokenMergedUNet(unet, self)

    def infotext(self) -> dict:
        return {"Token merging ratio": self.ratio}


class TokenMergedUNet(WrappedUNet):
    """Calls like the U-Net it wraps (a diffusers U-Net or the fast preset's `DeepCacheUNet`)."""

    def __init__(self, unet, tome: TokenMerging):
        self.unet, self.tome = unet, tome
        modules = unet.unet if isinstance(unet, DeepCacheUNet) else unet
        if not isinstance(modules, torch.nn.Module):
            raise ValueError("token merging needs a diffusers U-Net")
        # Self-attention layers only: their keys are the tokens themselves.
        self.layers = [m for m in modules.modules() if type(m).__name__ == "Attention" and not m.is_cross_attention
                       and hasattr(m, "set_processor")]
        self.generator = torch.Generator().manual_seed(tome.seed)

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        grid = tuple(sample.shape[-2:])
        originals = [layer.processor for layer in self.layers]
        try:
            for layer, original in zip(self.layers, originals):
                layer.set_processor(MergedAttention(original, grid, self.tome, self.generator))
            return self.unet(sample, *args, **kwargs)
        finally:
            for layer, original in zip(self.layers, originals):
                layer.set_processor(original)


class MergedAttention:
    """An attention processor that merges the tokens, calls the original processor, and unmerges."""

    def __init__(self, inner, latent_grid: tuple[int, int], tome: TokenMerging, generator: torch.Generator):
        self.inner, self.latent_grid, self.tome, self.generator = inner, latent_grid, tome, generator

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        grid = token_grid(self.latent_grid, hidden_states.shape[1], self.tome.max_downsample)
        if grid is None or encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        r = int(hidden_states.shape[1] * self.tome.ratio)
        merge, unmerge = bipartite_merge(hidden_states, grid, self.tome.stride, r, self.generator)
        return unmerge(self.inner(attn, merge(hidden_states), None, None, *args, **kwargs))


def token_grid(latent: tuple[int, int], tokens: int, max_downsample: int) -> tuple[int, int] | None:
    """(h, w) of the token grid when `tokens` is the latent grid downsampled by a factor <= max_downsample."""
    h, w = latent
    for d in DOWNSAMPLES:
        if d > max_downsample:
            break
        gh, gw = math.ceil(h / d), math.ceil(w / d)
        if gh * gw == tokens:
            return gh, gw
    return None


def bipartite_merge(x: torch.Tensor, grid: tuple[int, int], stride: int, r: int, generator: torch.Generator):
    """(merge, unmerge) for tokens x [B, N, C] on a row-major `grid`: merge averages the r sources most
    similar to a destination into it ([B, N - r, C]); unmerge copies each result back to every token
    of its group ([B, N, C])."""
    b, n, c = x.shape
    h, w = grid
    ch, cw = h // stride, w // stride
    # One destination per stride x stride cell at a random offset; cells cut off at the edges hold sources only.
    pick = torch.randint(stride * stride, (ch, cw), generator=generator)
    is_dst = torch.zeros(ch, cw, stride * stride, dtype=torch.bool)
    is_dst.scatter_(2, pick[..., None], True)
    is_dst = is_dst.view(ch, cw, stride, stride).transpose(1, 2).reshape(ch * stride, cw * stride)
    full = torch.zeros(h, w, dtype=torch.bool)
    full[: ch * stride, : cw * stride] = is_dst
    order = torch.argsort(full.flatten().to(torch.int8), descending=True, stable=True).to(x.device)
    n_dst = ch * cw
    dst_idx, src_idx = order[:n_dst], order[n_dst:]
    r = min(r, src_idx.numel())

    with torch.no_grad():  # similarity only chooses the groups
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # [B, Ns, Nd]
        best, best_dst = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)  # [B, Ns]: most similar sources first
        merged_src, kept_src = ranked[:, :r], ranked[:, r:]
        merged_dst = best_dst.gather(1, merged_src)  # [B, r] destination of each merged source

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[:, src_idx], t[:, dst_idx]
        expand = lambda i: i[..., None].expand(-1, -1, t.shape[-1])  # noqa: E731
        dst = dst.scatter_reduce(1, expand(merged_dst), src.gather(1, expand(merged_src)), reduce="mean", include_self=True)
        return torch.cat([src.gather(1, expand(kept_src)), dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        kept = kept_src.shape[1]
        expand = lambda i: i[..., None].expand(-1, -1, t.shape[-1])  # noqa: E731
        kept_out, dst_out = t[:, :kept], t[:, kept:]
        out = t.new_empty(b, n, t.shape[-1])
        out[:, dst_idx] = dst_out
        out.scatter_(1, expand(src_idx[kept_src]), kept_out)
        out.scatter_(1, expand(src_idx[merged_src]), dst_out.gather(1, expand(merged_dst)))
        return out

    return merge, unmerge
