"""The inpaint editor's brush: sized to the picture (a sixteenth of its shorter side, so a 64 px
picture gets a 4 px brush, not one that covers it), shown and set in a labelled number next to the
editor, and painting a half-transparent white so people still see what is under the mask.

The editor turns any painted pixel into mask (`ui.editor`: alpha > 0), so the half-transparent paint
masks exactly what it covers.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from .editor import editor_image
from .errors import readable

MASK_COLOUR = ("#ffffff", 0.5)  # white at half opacity: the mask and the picture under it
DEFAULT_SIZE = 16  # before any picture (a 256 px one)
MAX_SIZE = 256


def brush(size: int) -> gr.Brush:
    return gr.Brush(default_size=int(size), colors=[MASK_COLOUR], default_color=MASK_COLOUR, color_mode="fixed")


def size_for(width: int, height: int) -> int:
    """A sixteenth of the shorter side, at least 1 px."""
    return max(1, min(MAX_SIZE, round(min(width, height) / 16)))


def size_field() -> gr.Slider:
    return gr.Slider(1, MAX_SIZE, value=DEFAULT_SIZE, step=1, label="Brush size, px (of the picture)",
                     elem_id="inpaint-brush-size")


def fit(value: Any):
    """editor value -> (brush-size number, editor update) for its picture; skips without a picture.
    Only on upload: a brush update right after a picture is *sent* into the editor (send-to) leaves
    Gradio 6.31's editor not painting, so a sent picture keeps the current brush."""
    try:
        picture = editor_image(value)
    except ValueError:  # no picture (cleared): keep the brush
        return gr.skip(), gr.skip()
    n = size_for(*picture.size)
    return n, gr.ImageEditor(brush=brush(n))


def wire_brush(editor: gr.ImageEditor, size: gr.Slider) -> None:
    """An uploaded picture sets the brush to its size; the number sets the editor's brush."""
    editor.upload(readable(fit), editor, [size, editor], queue=False, api_visibility="private")
    size.input(readable(lambda n: gr.ImageEditor(brush=brush(n))), size, editor, queue=False, api_visibility="private")
