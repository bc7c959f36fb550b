"""ControlNet preprocessors that need no downloaded weights: an image in, a control map out.

`PREPROCESSORS` is the one table of them (A1111's module names, labels, and each one's settings
with defaults and ranges) that the library validates against and the UI builds its widgets from.
A setting left out or given as None takes its default; any other value outside its range is refused.
`RESOLUTION` is the range of A1111's "preprocessor resolution" (`check_resolution`): maps here are always
made at the size they are used at (A1111's "pixel perfect"), so callers that take the setting only check it.
Depth, pose and normal maps need models: make them elsewhere and use "none".

Each function takes an RGB uint8 array (H, W, 3) and its settings and returns a uint8 map of the
same size (H, W) or (H, W, 3); `preprocess` wraps that for PIL images. OpenCV
(opencv-python-headless) is imported on first use only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .params import Range, check_int

RESOLUTION = Range(64, 2048)  # A1111's "Preprocessor resolution" slider: the shorter side a map is made at


@dataclass(frozen=True)
class Setting:
    """One numeric setting of a preprocessor (a slider in the UI)."""

    name: str  # keyword in ControlUnit.settings
    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 1.0

    def check(self, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{self.label} must be a number, got {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.label} must be from {self.minimum:g} to {self.maximum:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class Preprocessor:
    name: str  # A1111's module name, written to the infotext
    label: str
    run: Callable[..., np.ndarray]  # (rgb uint8 HxWx3, **settings, seed=) -> uint8 map
    settings: tuple[Setting, ...] = ()

    def resolve(self, given: Mapping | None) -> dict:
        """Defaults filled in (for names left out or given as None), every value checked; unknown names refused."""
        given = dict(given or {})
        known = {s.name: s for s in self.settings}
        unknown = sorted(set(given) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise ValueError(f"preprocessor {self.name!r} has no setting {', '.join(map(repr, unknown))} "
                             f"(its settings: {allowed})")
        return {name: s.check(s.default if given.get(name) is None else given[name]) for name, s in known.items()}


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is in requirements.txt
        raise RuntimeError("this preprocessor needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _none(img: np.ndarray, seed: int = 0) -> np.ndarray:
    return img


def _invert(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """For a drawing with black lines on white: the white-on-black map line ControlNets expect."""
    return 255 - img


def _canny(img: np.ndarray, low: float = 100, high: float = 200, seed: int = 0) -> np.ndarray:
    """Canny edges (on all three channels, as A1111's canny module), white on black."""
    return _cv2().Canny(np.ascontiguousarray(img), float(low), float(high))


def _lineart(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Difference of Gaussians: how much darker each pixel is than its blurred surroundings (sigma 6),
    normalised by the median line strength; dark lines become bright lines on black."""
    x = img.astype(np.float32)
    g = _cv2().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 0.0)
    return (intensity * 127).clip(0, 255).astype(np.uint8)


def _xdog(img: np.ndarray, threshold: float = 32, seed: int = 0) -> np.ndarray:
    """Scribble from an extended difference of Gaussians (sigmas 0.5 and 5), thresholded to black/white."""
    cv2 = _cv2()
    x = img.astype(np.float32)
    dog = np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2).clip(0, 255)
    return np.where(2 * dog > threshold, 255, 0).astype(np.uint8)


def _tile(img: np.ndarray, rate: float = 1.0, seed: int = 0) -> np.ndarray:
    """Down-sample by `rate` (area averaging); the map is enlarged back to the generation size later."""
    if rate <= 1:
        return img
    h, w = img.shape[:2]
    return _cv2().resize(img, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=_cv2().INTER_AREA)


def _blur(img: np.ndarray, sigma: float = 9.0, seed: int = 0) -> np.ndarray:
    return _cv2().GaussianBlur(img, (0, 0), float(sigma))


def _shuffle(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Content shuffle: the image re-sampled along a smooth random flow field (cells of 256 px), seeded."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    rng = np.random.default_rng(seed)
    cell = 256

    def smooth_noise() -> np.ndarray:
        coarse = rng.uniform(0, 1, (h // cell + 2, w // cell + 2)).astype(np.float64)
        fine = cv2.resize(coarse, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]
        fine = fine - fine.min()
        return fine / fine.max() if fine.max() > 0 else fine

    flow_x = (smooth_noise() * (w - 1)).astype(np.float32)
    flow_y = (smooth_noise() * (h - 1)).astype(np.float32)
    return cv2.remap(img, flow_x, flow_y, cv2.INTER_LINEAR)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none (the image is the control map)", _none),
    Preprocessor("canny", "canny edges", _canny, (
        Setting("low", "Canny low threshold", 100, 1, 255),
        Setting("high", "Canny high threshold", 200, 1, 255),
    )),
    Preprocessor("lineart_standard", "lineart (difference of Gaussians; dark lines on white)", _lineart),
    Preprocessor("scribble_xdog", "scribble (XDoG)", _xdog, (Setting("threshold", "XDoG threshold", 32, 1, 64),)),
    Preprocessor("invert", "invert (white background, black lines)", _invert),
    Preprocessor("tile_resample", "tile (down-sample)", _tile, (
        Setting("rate", "Down sampling rate", 1.0, 1.0, 8.0, 0.01),
    )),
    Preprocessor("blur_gaussian", "blur (Gaussian)", _blur, (Setting("sigma", "Sigma", 9.0, 0.01, 64.0, 0.01),)),
    Preprocessor("shuffle", "shuffle (seeded)", _shuffle),
)}


def get_preprocessor(name: str) -> Preprocessor:
    if not isinstance(name, str) or name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; choose one of: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


def preprocess(image: Image.Image, name: str = "none", settings: Mapping | None = None, *, seed: int = 0) -> Image.Image:
    """The control map of `image` (an RGB PIL image) as an RGB image of the same size (tile's is smaller)."""
    pre = get_preprocessor(name)
    values = pre.resolve(settings)
    out = pre.run(np.asarray(image.convert("RGB")), **values, seed=seed)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(out.astype(np.uint8)), "RGB")


def check_resolution(value, name: str = "preprocessor resolution") -> None:
    """A1111's preprocessor resolution, None for unset, or ValueError naming `name`."""
    if value is not None:
        check_int(name, value, RESOLUTION, " pixels (the shorter side)")
