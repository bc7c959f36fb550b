"""Number sliders over the ranges ldm checks (`ldm.params`: the fixed ranges and `Limits.range`).

Gradio 6.31's Slider sets a typed value to its range without a word (in the page, when the number box
loses focus) and refuses one outside it before any handler runs. These sliders let every typed value
through (`gradio_compat.library_range`), so ldm's check is the one rule, for the page and the API, and
its message shows in the tab's status line. Where ldm's range is far wider than a comfortable drag
(steps to 1000, CFG to 100) or open-ended (inpaint padding, outpaint sides, x4 tiles) the track stops
earlier (`drag_top`: A1111's slider ends) and larger values are typed.
"""
from __future__ import annotations

import gradio as gr

from ldm.params import Range

from .gradio_compat import library_range

STEPS_DRAG_TOP = 150  # A1111's steps slider
CFG_DRAG_TOP = 30  # A1111's CFG slider
HIRES_SCALE_DRAG_TOP = 4  # A1111's "Upscale by"
MASK_BLUR_DRAG_TOP = 64  # A1111's "Mask blur"
PADDING_DRAG_TOP = 256  # A1111's "Only masked padding, pixels"
OUTPAINT_DRAG_TOP = 512  # pixels per side
TILE_DRAG_TOP = 1024  # the x4 upscaler's tile side, input pixels
TILE_OVERLAP_DRAG_TOP = 256


def slider(allowed: Range, *, step: float, drag_top: float | None = None, **kwargs) -> gr.Slider:
    """A slider from `allowed.low` (one step above it when ldm excludes it) to `allowed.high` or `drag_top`."""
    low = allowed.low + step if allowed.open_low else allowed.low
    high = allowed.high if drag_top is None else min(drag_top, allowed.high)
    if allowed.open_high and high == allowed.high:
        high -= step
    return library_range(gr.Slider(low, high, step=step, **kwargs))
