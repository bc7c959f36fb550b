"""Classic resamplers (Lanczos, bicubic, nearest): no model, exactly PIL's pixels. `RESAMPLERS` is the
one list of their names that the UI and the hires fix read."""
from __future__ import annotations

import math

from PIL import Image

from . import images as imgs
from .options import Options

RESAMPLERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
_RESIZABLE_MODES = ("L", "LA", "RGB", "RGBA")


def upscale_image(image, scale: float, method: str = "lanczos", *, max_size: int = Options.max_upscale_size) -> Image.Image:
    """Resize by `scale` with a classic filter: the same pixels as PIL's `resize` with that filter.
    The new size is the old one times `scale`, rounded to whole pixels (at least 1)."""
    method_key = method.lower() if isinstance(method, str) else method
    if method_key not in RESAMPLERS:
        raise ValueError(f"unknown resampling method {method!r}; choose one of: {', '.join(RESAMPLERS)}")
    check_scale("scale", scale)
    img = imgs.load_image(image, mode=None)
    if img.mode not in _RESIZABLE_MODES:  # palette/16-bit images: PIL would silently use nearest or clip
        img = imgs.load_image(img, mode="RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    check_output(img.size, f"x{scale:g}", size, max_size, "max_size")
    return img.resize(size, RESAMPLERS[method_key])


def check_scale(name: str, scale, low: float = 0.0) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= low:
        raise ValueError(f"{name} must be a number above {low:g}, got {scale!r}")


def check_output(size: tuple[int, int], how: str, out: tuple[int, int], limit: int, setting: str) -> None:
    if max(out) > limit:
        raise ValueError(
            f"upscaling {size[0]}x{size[1]} {how} gives {out[0]}x{out[1]}; the largest side allowed is {limit} ({setting})"
        )
