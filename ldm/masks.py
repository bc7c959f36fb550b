"""Mask handling for inpainting and outpainting (PIL + numpy only).

Convention everywhere: a mask is a PIL image of mode "L" with the same size as
the image it applies to; 255 = repaint, 0 = keep, values in between are soft.
Regions are ``(x0, y0, x1, y1)`` boxes with exclusive ends, as PIL uses.
"""

from __future__ import annotations

import logging
import math
import numbers
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ldm.images import DEFAULT_MAX_PIXELS, load_image, to_8bit
from ldm.params import INPAINT_PADDING, MASK_BLUR, OUTPAINT_SIDE, check_int

__all__ = [
    "InpaintArea",
    "MaskedContent",
    "normalize_mask",
    "is_full",
    "require_mask",
    "check_mask_blur",
    "blur_mask",
    "mask_bbox",
    "crop_region",
    "expand_to_aspect",
    "paste_back",
    "pad_for_outpaint",
]

logger = logging.getLogger(__name__)

Region = tuple[int, int, int, int]

# A resized mask may be stretched this much (relative aspect ratio) before we
# refuse it: enough for rounding/off-by-a-few-pixels exports, not for a mask
# of a different picture.
_ASPECT_TOLERANCE = 0.05

_NOTHING_SELECTED = "mask selects nothing: paint (white) the area to repaint"


class InpaintArea(str, Enum):
    """What the model sees while inpainting."""

    WHOLE = "whole"  # the whole picture at the generation size
    MASKED = "masked"  # only the masked region (cropped, upscaled, pasted back)


class MaskedContent(str, Enum):
    """What the masked area starts from before denoising."""

    FILL = "fill"  # colours of the surroundings (ldm.fill.fill_masked)
    ORIGINAL = "original"  # the original pixels
    LATENT_NOISE = "latent_noise"  # random noise in latent space
    LATENT_NOTHING = "latent_nothing"  # zeros in latent space


# --------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------


def _array_to_image(array: np.ndarray) -> Image.Image:
    """HxW / HxWxC (C = 1..4) bool, integer (0..255) or float (0..1) -> 8-bit PIL image."""
    if array.size == 0:
        raise ValueError(f"mask array is empty (shape {array.shape})")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ValueError(
            f"mask array must be HxW or HxWxC with C = 1, 2, 3 or 4; got shape {array.shape}"
        )
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("mask array contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float mask values must be in [0, 1]; got {lo:g} to {hi:g}")
        pixels = np.rint(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer mask values must be in 0..255; got {lo} to {hi}")
        pixels = array.astype(np.uint8)
    else:
        raise ValueError(f"mask array must be bool, integer or float; got dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(pixels))  # L, LA, RGB or RGBA by shape


def _to_image(mask: Any) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask
    if isinstance(mask, np.ndarray):
        return _array_to_image(mask)
    if isinstance(mask, (bytes, bytearray, memoryview)) or hasattr(mask, "read"):
        return load_image(mask, mode=None)  # ValueError for undecodable data
    raise ValueError(
        f"mask must be a PIL image, a numpy array or encoded image bytes; got {type(mask).__name__}"
        + (" (load files with ldm.images.load_image first)" if isinstance(mask, str) else "")
    )


def _to_grey(image: Image.Image) -> Image.Image:
    """Apply the alpha-or-luminance rule; returns a new "L" image."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"mask is an empty image ({image.width}x{image.height} pixels)")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency becomes a real alpha band
    elif image.mode in ("RGBa", "La"):
        image = image.convert(image.mode[:-1] + "A")  # un-premultiply
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        lo, hi = alpha.getextrema()
        if lo != hi:
            # Varying alpha carries the mask: erased (transparent) = repaint.
            return alpha.point(lambda v: 255 - v)
        # Constant alpha carries no information: fall through to luminance.
    image = to_8bit(image)  # 16-bit / float masks are scaled, not clipped
    try:
        return image.convert("L")
    except ValueError as exc:
        raise ValueError(
            f"unsupported mask mode {image.mode!r}; use L, 1, RGB, RGBA, LA, P, I, I;16 or F"
        ) from exc


def _check_size(size: Any) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
        ok = all(int(v) == v for v in size) and width > 0 and height > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"size must be (width, height) with two positive integers; got {size!r}")
    return width, height


def normalize_mask(mask: Any, size: tuple[int, int], *, invert: bool = False) -> Image.Image:
    """Turn any user mask into the canonical "L" mask of exactly ``size`` (w, h).

    Accepts PIL images (L, 1, RGB, RGBA, LA, P, I, I;16, F, ...), numpy arrays
    (HxW or HxWxC; bool, uint8 or float in [0, 1]) and encoded image bytes.
    An alpha band that varies is the mask with transparent = repaint
    (255 - alpha); otherwise luminance is used (white = repaint). Soft values
    are kept (no binarisation). ``invert`` flips the result. A mask of another
    size but (within 5%) the same aspect ratio is resized with NEAREST.
    """
    width, height = _check_size(size)
    grey = _to_grey(_to_image(mask))
    if invert:
        grey = grey.point(lambda v: 255 - v)

    if grey.size != (width, height):
        mask_w, mask_h = grey.size
        # Compare ratios on a log scale so 5% wider and 5% taller are treated alike.
        ratio_error = abs(math.log((mask_w / mask_h) / (width / height)))
        if ratio_error > math.log1p(_ASPECT_TOLERANCE):
            raise ValueError(
                f"mask is {mask_w}x{mask_h} but the image is {width}x{height}: "
                "aspect ratios differ; upload a mask of the image's shape"
            )
        logger.info(
            "mask is %dx%d but the image is %dx%d: resizing the mask (nearest neighbour)",
            mask_w, mask_h, width, height,
        )
        # NEAREST keeps hard masks hard; soft edges come from blur_mask later.
        grey = grey.resize((width, height), Image.Resampling.NEAREST)

    if grey.getextrema()[1] == 0:
        raise ValueError(_NOTHING_SELECTED)
    return grey  # always a new image: _to_grey converts or copies


# --------------------------------------------------------------------------
# inspection, blur, regions
# --------------------------------------------------------------------------


def require_mask(mask: Any, what: str = "mask", *, covers: Image.Image | None = None) -> Image.Image:
    """`mask` as an "L" image; with `covers`, also check it has that image's size."""
    if covers is not None and isinstance(mask, Image.Image) and mask.size != covers.size:
        raise ValueError(
            f"{what} is {mask.width}x{mask.height} but the image is {covers.width}x{covers.height}; the mask must "
            "cover the whole image: normalize the mask to the image size first"
        )
    if not isinstance(mask, Image.Image):
        raise ValueError(f"{what} must be a PIL image of mode 'L'; got {type(mask).__name__}")
    if mask.mode == "1":
        return mask.convert("L")
    if mask.mode != "L":
        raise ValueError(f"{what} must have mode 'L' (use normalize_mask); got mode {mask.mode!r}")
    return mask


def is_full(mask: Image.Image) -> bool:
    """True when every pixel is 255 (the whole image is repainted: plain img2img)."""
    return require_mask(mask).getextrema() == (255, 255)


def check_mask_blur(radius: Any) -> None:
    """A blur radius (pixels) from `ldm.params.MASK_BLUR`, or ValueError."""
    if not isinstance(radius, numbers.Real) or isinstance(radius, bool) or not math.isfinite(radius) \
            or radius not in MASK_BLUR:
        raise ValueError(f"mask blur radius must be a number of pixels from {MASK_BLUR.text()}, got {radius!r}")


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Feather the mask with a Gaussian blur of standard deviation ``radius`` px.

    A1111 uses an OpenCV Gaussian with sigma = radius truncated at ~2.5 sigma;
    PIL's GaussianBlur(radius) takes the same sigma (approximated by three box
    blurs, support ~3 sigma), which is visually indistinguishable. PIL extends
    edge pixels, so a mask touching the border (outpainting) stays solid there.
    ``radius == 0`` returns an unchanged copy.
    """
    mask = require_mask(mask)
    check_mask_blur(radius)
    if radius == 0:
        return mask.copy()
    return mask.filter(ImageFilter.GaussianBlur(radius))


def mask_bbox(mask: Image.Image) -> Region:
    """(x0, y0, x1, y1), exclusive ends, of the pixels > 0."""
    bbox = require_mask(mask).getbbox()
    if bbox is None:
        raise ValueError(_NOTHING_SELECTED)
    return bbox


def crop_region(mask: Image.Image, padding: int) -> Region:
    """Bounding box of the mask grown by ``padding`` px on every side, clamped to the image."""
    check_int("padding", padding, INPAINT_PADDING, " (pixels)")
    x0, y0, x1, y1 = mask_bbox(mask)
    width, height = mask.size
    return (max(x0 - padding, 0), max(y0 - padding, 0), min(x1 + padding, width), min(y1 + padding, height))


def _check_region(region: Any, image_w: int, image_h: int) -> Region:
    try:
        x0, y0, x1, y1 = (int(v) for v in region)
        ok = all(int(v) == v for v in region)
    except (TypeError, ValueError):
        ok = False
    if not ok or not (0 <= x0 < x1 <= image_w and 0 <= y0 < y1 <= image_h):
        raise ValueError(
            f"region must be (x0, y0, x1, y1) integers with 0 <= x0 < x1 <= {image_w} "
            f"and 0 <= y0 < y1 <= {image_h}; got {region!r}"
        )
    return x0, y0, x1, y1


def _grow_span(lo: int, hi: int, new_len: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) to new_len, centred, then shifted back inside [0, limit)."""
    new_len = min(new_len, limit)  # cannot fit: use the whole side
    extra = new_len - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, hi


def expand_to_aspect(region: Region, target_w: int, target_h: int, image_w: int, image_h: int) -> Region:
    """Grow ``region`` so its aspect ratio equals target_w / target_h (A1111 "only masked").

    Only the short side grows (the region always still contains the original),
    centred where possible and shifted inside the image at the edges. The new
    length is rounded to the nearest pixel; if it exceeds the image it is
    clamped, and the aspect ratio then cannot be met exactly.
    """
    for name, value in (("target_w", target_w), ("target_h", target_h), ("image_w", image_w), ("image_h", image_h)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    x0, y0, x1, y1 = _check_region(region, image_w, image_h)
    w, h = x1 - x0, y1 - y0
    # Integer cross-multiplication: exact for equal ratios, no float drift.
    if w * target_h > h * target_w:  # too wide: grow the height
        new_h = (w * target_h + target_w // 2) // target_w
        y0, y1 = _grow_span(y0, y1, max(new_h, h), image_h)
    elif w * target_h < h * target_w:  # too tall: grow the width
        new_w = (h * target_w + target_h // 2) // target_h
        x0, x1 = _grow_span(x0, x1, max(new_w, w), image_w)
    return x0, y0, x1, y1


# --------------------------------------------------------------------------
# compositing and outpainting
# --------------------------------------------------------------------------


def paste_back(
    original: Image.Image,
    generated: Image.Image,
    mask: Image.Image,
    region: Region | None = None,
) -> Image.Image:
    """Composite ``generated`` over ``original`` with ``mask`` as alpha.

    ``generated`` covers ``region`` (or the whole image when None) and is
    resized with LANCZOS if its size differs. ``mask`` is full-image size.
    Integer compositing: mask == 0 gives the original pixel exactly, mask == 255
    the generated one; outside ``region`` the original is always kept.
    """
    for name, value in (("original", original), ("generated", generated)):
        if not isinstance(value, Image.Image):
            raise ValueError(f"{name} must be a PIL image; got {type(value).__name__}")
    mask = require_mask(mask, covers=original)
    if region is None:
        region = (0, 0, original.width, original.height)
    x0, y0, x1, y1 = _check_region(region, original.width, original.height)
    if generated.mode != original.mode:
        generated = generated.convert(original.mode)
    if generated.size != (x1 - x0, y1 - y0):
        generated = generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    layer = original.copy()
    layer.paste(generated, (x0, y0))
    return Image.composite(layer, original, mask)


def pad_for_outpaint(image: Image.Image, left: int, right: int, top: int, bottom: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas for outpainting.

    Returns (canvas, mask): the canvas is (w + left + right) x (h + top + bottom)
    with the new area filled by replicating the border pixels (a neutral start
    that continues the edge colours), and an "L" mask with 255 on the new area
    and 0 over the original. A canvas over `max_pixels` (the input-image limit,
    ldm.images) is refused before it is allocated.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image; got {type(image).__name__}")
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        check_int(f"outpaint {name}", value, OUTPAINT_SIDE, " (pixels)")
    if not any(sides.values()):
        raise ValueError("outpainting needs at least one side > 0 pixels (left, right, top or bottom)")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
    width, height = image.width + left + right, image.height + top + bottom
    if width * height > max_pixels:
        raise ValueError(f"outpainting {image.width}x{image.height} by left {left}, right {right}, top {top}, bottom "
                         f"{bottom} makes a {width}x{height} canvas, over the limit of {max_pixels:,} pixels")
    if image.mode not in ("L", "RGB", "RGBA"):
        image = to_8bit(image).convert("RGB")

    pixels = np.asarray(image)
    pad = ((top, bottom), (left, right)) + (((0, 0),) if pixels.ndim == 3 else ())
    canvas = Image.fromarray(np.pad(pixels, pad, mode="edge"))

    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask
