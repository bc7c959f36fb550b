"""The line at the top of the page: which model is serving, its family and native size, and for the
bundled demo model what it can draw (so a first prompt is not a landscape it never saw).

Read at every page load (`gr.Markdown(value=callable)`), so it follows checkpoint switches on reload.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

# model family (ldm's `family.name`) -> what people call it
FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL"}

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"
DEMO_NOTE = ("The demo model draws one shape (circle, square or triangle) in one of 8 colours (red, green, blue, "
             "yellow, purple, orange, white, black) on a plain background of another colour, at 64×64 px: try "
             "“a red circle on a blue background”.")


def model_line(pipe: Any, inpaint: Any = None, upscale: Any = None) -> str:
    """Markdown: model · family · native size (· dedicated inpaint / x4 models), plus the demo's note."""
    family = FAMILIES.get(pipe.family.name, pipe.family.name)
    size = pipe.default_size
    parts = [f"**Model** `{_md(pipe.name)}`", f"**Family** {family}", f"**Native size** {size}×{size} px"]
    parts += [f"**Inpaint** `{_md(inpaint.name)}`"] if inpaint is not None else []
    parts += [f"**Upscale** `{_md(upscale.name)}`"] if upscale is not None else []
    text = " · ".join(parts)
    if is_demo(pipe):
        text += f"  \n{DEMO_NOTE}"
    return text


def is_demo(pipe: Any) -> bool:
    try:
        return Path(pipe.components.path).resolve() == DEMO_WEIGHTS
    except OSError:
        return False


def _md(text: Any) -> str:
    return html.escape(str(text)).replace("`", "'")
