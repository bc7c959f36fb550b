"""The inpaint editor's value (background + painted layers) -> the picture and mask ldm takes."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ldm.images import load_image


def editor_to_image_and_mask(editor: dict | None, mask_upload: Any = None) -> tuple[Image.Image, Image.Image]:
    """An ImageEditor value (background + painted layers) -> (RGB image, "L" mask, 255 = repaint).

    Strokes are opaque paint on transparent layers; ldm would read a varying alpha as
    transparent = repaint, the opposite, so the layers become an explicit white-on-black mask.
    An uploaded mask wins over the drawing.
    """
    image = editor_image(editor)
    if mask_upload is not None:
        return image, load_image(mask_upload, mode=None)  # alpha kept: ldm reads it
    painted = np.zeros((image.height, image.width), dtype=bool)
    for layer in (editor or {}).get("layers") or []:
        layer = _as_pil(layer)
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").getchannel("A"))
        if alpha.shape != painted.shape:  # a canvas bigger than the picture: scale to it
            alpha = np.asarray(layer.convert("RGBA").getchannel("A").resize(image.size, Image.Resampling.NEAREST))
        painted |= alpha > 0
    if not painted.any():
        raise ValueError("no mask: paint over the area to repaint, or upload a mask")
    return image, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def editor_image(editor: dict | None) -> Image.Image:
    """The picture in an ImageEditor value, as RGB (what outpainting starts from)."""
    background = (editor or {}).get("background")
    if background is None:
        raise ValueError("no image: upload one in the inpaint editor first")
    return _flatten(_as_pil(background))


def _as_pil(value: Any) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return load_image(value, mode=None)


def _flatten(image: Image.Image) -> Image.Image:
    """RGBA -> RGB over white (what the editor shows); other modes converted."""
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
