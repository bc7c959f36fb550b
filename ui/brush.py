"""The inpaint editor's brush: sized to the picture (a radius of a sixteenth of its shorter side, so a
64 px picture gets a stroke 8 px wide, not one that covers it), shown and set in a labelled number
next to the editor, and painting a half-transparent white so people still see what is under the mask.

The editor turns any painted pixel into mask (`ui.editor`: alpha > 0), so the half-transparent paint
masks exactly what it covers.

A picture sent from another tab gets its brush in the send itself (`sent`): the server knows the
picture's size there. Gradio 6.31's editor also reports a sent picture as an upload, and an upload
event with the editor as output covers the editor with its progress overlay until the answer comes
(seconds under load: the editor exports its layers first), which swallowed a person's first strokes;
so the upload fit shows no progress and changes nothing when the brush already fits.

A typed radius reaches the brush seconds later on a large picture: Gradio 6.31 applies an update of the
editor's props only after exporting and uploading the editor's picture and layers (its `update_state`
refreshes the value first). The ring the editor draws around the pointer shows the brush in use. A
value typed meanwhile ("30", then "300", while "3" is being applied) is sent once the pending one is
done (`trigger_mode="always_last"`; the default "once" dropped it, leaving a 3 px brush under a number
reading 300), and the number's event never fails, since Gradio drops a deferred value after a failure.
"""
from __future__ import annotations

import math
from typing import Any

import gradio as gr

from ldm.images import DEFAULT_MAX_PIXELS
from ldm.params import Range

from .convert import as_int
from .editor import editor_image
from .errors import failed_text, readable
from .gradio_compat import image_size
from .ranges import slider

MASK_COLOUR = ("#ffffff", 0.5)  # white at half opacity: the mask and the picture under it
DEFAULT_SIZE = 16  # before any picture (a 256 px one)
MAX_SIZE = 256  # the largest fitted brush, and the number's track; larger ones are typed
# A typed radius is used as typed up to the side of the largest square picture the server opens; outside
# this, the brush keeps its size and the tab's status line says why (the number keeps what was typed).
SIZES = Range(1, math.isqrt(DEFAULT_MAX_PIXELS))


def brush(size: int) -> gr.Brush:
    return gr.Brush(default_size=int(size), colors=[MASK_COLOUR], default_color=MASK_COLOUR, color_mode="fixed")


def size_for(width: int, height: int) -> int:
    """The brush radius (Gradio's brush size is a radius): a sixteenth of the shorter side, at least 1 px."""
    return max(1, min(MAX_SIZE, round(min(width, height) / 16)))


def size_field() -> gr.Slider:
    return slider(SIZES, drag_top=MAX_SIZE, value=DEFAULT_SIZE, step=1, label="Brush radius, px (of the picture)",
                  elem_id="inpaint-brush-size")


def set_size(value: Any) -> gr.ImageEditor:
    """The brush-size number -> the editor's brush, or ValueError for a radius outside SIZES."""
    n = as_int("brush radius", value)
    if n not in SIZES:
        raise ValueError(f"brush radius must be from {SIZES.text()} pixels (of the picture), got {n}; "
                         "the brush keeps its size")
    return gr.ImageEditor(brush=brush(n))


def typed_size(value: Any) -> tuple[Any, Any]:
    """The brush-size number -> (editor update, status line): the brush, or the status line saying why
    not (`set_size`'s message; the brush keeps its size)."""
    try:
        return set_size(value), gr.skip()
    except ValueError as exc:
        return gr.skip(), failed_text(exc)


def sent(path: str) -> tuple[gr.ImageEditor, int]:
    """A picture file sent into the editor -> (editor update: the picture and its brush, brush-size number)."""
    n = size_for(*image_size(path))
    picture = {"background": path, "layers": [], "composite": path}
    return gr.ImageEditor(value=picture, brush=brush(n)), n


def fit(value: Any, current: float | None):
    """(editor value, brush-size number) -> (number, editor update) for its picture; skips without a
    picture, and when the brush already fits it (a sent picture, reported as an upload)."""
    try:
        picture = editor_image(value)
    except ValueError:  # no picture (cleared): keep the brush
        return gr.skip(), gr.skip()
    n = size_for(*picture.size)
    if current == n:
        return gr.skip(), gr.skip()
    return n, gr.ImageEditor(brush=brush(n))


def wire_brush(editor: gr.ImageEditor, size: gr.Slider, status: gr.Textbox) -> None:
    """An uploaded picture sets the brush to its size; the number sets the editor's brush, or says in the
    tab's `status` line why it cannot."""
    editor.upload(readable(fit), [editor, size], [size, editor], queue=False, show_progress="hidden",
                  api_visibility="private")
    size.input(readable(typed_size), size, [editor, status], queue=False, show_progress="hidden",
               trigger_mode="always_last", api_visibility="private")
