"""Overlapping tiles and seam-free blending, for images too large to process in one piece.

A "grid" is the coordinate system tiles are planned in (latent pixels for the VAE, low-res pixels
for the x4 upscaler). Each tile is processed on its own and its output, `scale` times larger than
the tile, is blended into a canvas with weights that ramp smoothly from ~0 to 1 across every overlap,
so neighbouring tiles cross-fade instead of meeting at a hard edge.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Box:
    """A tile in grid coordinates."""

    top: int
    left: int
    height: int
    width: int

    def scaled(self, s: int) -> "Box":
        return Box(self.top * s, self.left * s, self.height * s, self.width * s)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """This box of an NCHW tensor."""
        return x[..., self.top : self.top + self.height, self.left : self.left + self.width]


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start positions along one axis: as few tiles as cover `length` with at least `overlap`
    shared pixels between neighbours, spread evenly so the last tile ends exactly at the edge."""
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must be larger than the tile overlap {overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


def plan(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """Row-major tiles covering a height x width grid; a side shorter than `tile` is one tile."""
    th, tw = min(tile, height), min(tile, width)
    return [Box(t, l, th, tw) for t in starts(height, tile, overlap) for l in starts(width, tile, overlap)]


def _axis_weights(begin: int, size: int, prev_end: int | None, next_begin: int | None) -> torch.Tensor:
    """1-D weights of one tile: smoothstep up across the overlap with the previous tile, down across
    the overlap with the next. In a two-tile overlap the two weights sum to exactly 1."""
    x = torch.arange(size, dtype=torch.float64) + 0.5  # pixel centres: never exactly 0
    w = torch.ones(size, dtype=torch.float64)
    if prev_end is not None and prev_end > begin:
        w = torch.minimum(w, _smoothstep(x / (prev_end - begin)))
    if next_begin is not None and next_begin < begin + size:
        w = torch.minimum(w, _smoothstep((size - x) / (begin + size - next_begin)))
    return w


def _smoothstep(u: torch.Tensor) -> torch.Tensor:
    u = u.clamp(0, 1)
    return u * u * (3 - 2 * u)


def _neighbours(values: list[int], v: int) -> tuple[int | None, int | None]:
    i = values.index(v)
    return (values[i - 1] if i > 0 else None), (values[i + 1] if i + 1 < len(values) else None)


def weights(box: Box, boxes: list[Box], scale: int) -> torch.Tensor:
    """[H, W] blending weights for `box`'s output (grid box times `scale`) among `boxes`."""
    tops = sorted({b.top for b in boxes})
    lefts = sorted({b.left for b in boxes})
    up, down = _neighbours(tops, box.top)
    left, right = _neighbours(lefts, box.left)
    s = box.scaled(scale)
    wy = _axis_weights(s.top, s.height, None if up is None else (up + box.height) * scale, None if down is None else down * scale)
    wx = _axis_weights(s.left, s.width, None if left is None else (left + box.width) * scale, None if right is None else right * scale)
    return (wy[:, None] * wx[None, :]).float()


def blend(boxes: list[Box], run: Callable[[Box], torch.Tensor], grid_hw: tuple[int, int], scale: int) -> torch.Tensor:
    """Run every tile (`run(box)` -> NCHW output of box size times `scale`) and cross-fade the outputs
    into one NCHW float32 tensor of grid size times `scale`. Only the canvas and one tile are alive at once."""
    canvas = total = None
    for box in boxes:
        out = run(box).float()
        if canvas is None:
            n, c = out.shape[:2]
            canvas = torch.zeros(n, c, grid_hw[0] * scale, grid_hw[1] * scale, device=out.device)
            total = torch.zeros(grid_hw[0] * scale, grid_hw[1] * scale, device=out.device)
        w = weights(box, boxes, scale).to(out.device)
        s = box.scaled(scale)
        s.crop(canvas).add_(out * w)
        s.crop(total).add_(w)
        del out
    return canvas / total
