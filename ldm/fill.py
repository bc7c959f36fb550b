"""A1111's "fill" masked content: the masked area replaced by a smooth fill of its surroundings."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .images import to_8bit
from .masks import require_mask


def _upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of an HxWxC float array (via PIL "F" images, per channel)."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(values[..., c], dtype=np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in range(values.shape[2])
    ]
    return np.stack(channels, axis=2)


def _push_pull(colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Pyramid fill ("push-pull"): estimate every pixel from the known ones.

    colour is HxWxC, weight HxW in [0, 1] (1 = known). Each level halves the
    resolution by weighted 2x2 averaging (pull) until everything is covered,
    then the coarse estimates are bilinearly upsampled and blended under the
    unknown pixels (push). Holes thus get the colours of their nearest
    surroundings, smoothly, in O(pixels) whatever the hole size. Returns the
    pure estimate field (known pixels get a locally smoothed value; callers
    composite the originals back).
    """
    height, width = weight.shape
    # Pad to even size with zero weight so 2x2 blocks are well defined.
    ph, pw = height + height % 2, width + width % 2
    c = np.zeros((ph, pw, colour.shape[2]), dtype=np.float32)
    w = np.zeros((ph, pw), dtype=np.float32)
    c[:height, :width] = colour * weight[..., None]
    w[:height, :width] = weight
    w_sum = w.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    c_sum = c.reshape(ph // 2, 2, pw // 2, 2, -1).sum(axis=(1, 3))
    coarse_colour = c_sum / np.maximum(w_sum, 1e-12)[..., None]
    # Saturating weight: one fully known child makes the coarse pixel fully known.
    coarse_weight = np.minimum(w_sum, 1.0)
    if coarse_weight.min() < 1.0 and coarse_weight.size > 1:
        coarse = _push_pull(coarse_colour, coarse_weight)
        coarse = coarse_weight[..., None] * coarse_colour + (1.0 - coarse_weight[..., None]) * coarse
    else:
        coarse = coarse_colour
    return _upsample(coarse, ph, pw)[:height, :width]


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 "fill": replace the masked area by a smooth fill of the surrounding colours.

    Pixels where mask == 0 are returned unchanged (bit-exact); where mask == 255
    they are the fill; soft mask values blend the two. Unmasked pixels are the
    colour sources, weighted by (255 - mask). If nothing is unmasked there are
    no surroundings, so the fill is the image's mean colour. The result keeps the
    image's mode for L/RGB/RGBA, other modes become RGB.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image; got {type(image).__name__}")
    mask = require_mask(mask, covers=image)
    if image.mode not in ("L", "RGB", "RGBA"):
        image = to_8bit(image).convert("RGB")

    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    known = 1.0 - np.asarray(mask, dtype=np.float32) / np.float32(255.0)
    if known.max() <= 0.0:
        fill = np.broadcast_to(pixels.mean(axis=(0, 1)), pixels.shape)
    else:
        fill = _push_pull(pixels, known)
    fill_u8 = np.clip(np.rint(fill), 0, 255).astype(np.uint8)
    fill_image = Image.fromarray(fill_u8[..., 0] if fill_u8.shape[2] == 1 else fill_u8)
    return Image.composite(fill_image, image, mask)
