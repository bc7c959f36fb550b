"""Procedural "shapes world" used to train and evaluate the bundled demo model.

Every image is 64x64 RGB: one shape (circle, square or upright triangle) of one
palette colour on a plain background of another palette colour.  The module
renders scenes into uint8 arrays, writes captions, fixes a held-out split of the
(object colour, shape, background colour) combinations, and provides a
deterministic pixel classifier that reads a picture back into
(background colour, object colour, shape).

Pure numpy; no import-time side effects.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

MIN_SIZE_FRAC = 0.35
MAX_SIZE_FRAC = 0.65

HOLDOUT_FRACTION = 0.15
HOLDOUT_SEED = 1234

_PALETTE_ARR = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (8, 3)


@dataclass(frozen=True)
class Scene:
    obj: str  # object colour
    shape: str
    bg: str  # background colour
    size: int  # bounding-box side in pixels
    x0: int  # bounding-box top-left corner
    y0: int

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.obj, self.shape, self.bg)


def caption(obj: str, shape: str, bg: str) -> str:
    """The evaluation template."""
    return f"a {obj} {shape} on a {bg} background"


def caption_variants(obj: str, shape: str, bg: str) -> list[str]:
    """Template caption plus partial captions and paraphrases used in training."""
    return [
        caption(obj, shape, bg),
        caption(obj, shape, bg),
        caption(obj, shape, bg),
        f"a {obj} {shape}",
        f"a {shape} on a {bg} background",
        f"{obj} {shape}, {bg} background",
        f"a {obj} {shape} in front of a {bg} background",
        f"{bg} background with a {obj} {shape}",
    ]


def all_combos() -> list[tuple[str, str, str]]:
    """All valid (object colour, shape, background colour) combinations (168)."""
    return [(o, s, b) for o, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if o != b]


def holdout_combos(seed: int = HOLDOUT_SEED, fraction: float = HOLDOUT_FRACTION) -> list[tuple[str, str, str]]:
    """Deterministic held-out set: round(fraction * 168) combos drawn with ``random.Random(seed)``.

    Draws are rejected until every pair contained in a held-out combo
    ((obj, shape), (obj, bg), (shape, bg)) still occurs in some training combo,
    so each held-out combo is a genuinely new composition of seen parts.
    """
    combos = all_combos()
    n = round(fraction * len(combos))
    rng = random.Random(seed)
    while True:
        held = sorted(rng.sample(combos, n))
        held_set = set(held)
        train = [c for c in combos if c not in held_set]
        pairs = set()
        for o, s, b in train:
            pairs.update({("os", o, s), ("ob", o, b), ("sb", s, b)})
        if all({("os", o, s), ("ob", o, b), ("sb", s, b)} <= pairs for o, s, b in held):
            return held


def train_combos(seed: int = HOLDOUT_SEED) -> list[tuple[str, str, str]]:
    held = set(holdout_combos(seed))
    return [c for c in all_combos() if c not in held]


def random_scene(rng: np.random.Generator, combo: tuple[str, str, str]) -> Scene:
    obj, shape, bg = combo
    lo = int(np.ceil(MIN_SIZE_FRAC * IMAGE_SIZE))
    hi = int(np.floor(MAX_SIZE_FRAC * IMAGE_SIZE))
    size = int(rng.integers(lo, hi + 1))
    x0 = int(rng.integers(0, IMAGE_SIZE - size + 1))
    y0 = int(rng.integers(0, IMAGE_SIZE - size + 1))
    return Scene(obj, shape, bg, size, x0, y0)


def shape_mask(shape: str, size: int, x0: int, y0: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (H, W) mask of a shape whose bounding box is [x0, x0+size) x [y0, y0+size)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5  # pixel centres
    u = (xx - x0) / size  # 0..1 inside the bounding box
    v = (yy - y0) / size
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a (64, 64, 3) uint8 array."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.bg]
    img[shape_mask(scene.shape, scene.size, scene.x0, scene.y0)] = PALETTE[scene.obj]
    return img


def generate_dataset(n: int, seed: int, combos: list[tuple[str, str, str]] | None = None):
    """Render ``n`` random scenes over ``combos`` (default: the training combos).

    Returns (images uint8 (n, 64, 64, 3), scenes list).  Combos are cycled in a
    shuffled order so every combo gets the same number of images (+-1).
    """
    combos = list(combos if combos is not None else train_combos())
    rng = np.random.default_rng(seed)
    order = []
    while len(order) < n:
        order.extend(rng.permutation(len(combos)).tolist())
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        sc = random_scene(rng, combos[order[i]])
        images[i] = render(sc)
        scenes.append(sc)
    return images, scenes


# ----------------------------------------------------------------------------
# classifier


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for (..., 3) pixels."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE_ARR) ** 2).sum(-1)
    return d.argmin(-1)


# (fill ratio of the bounding box, mean fill of the two top corner patches, of the two bottom ones)
_SHAPE_TEMPLATES = {
    "square": np.array([1.0, 1.0, 1.0]),
    "circle": np.array([np.pi / 4, 0.0, 0.0]),
    "triangle": np.array([0.5, 0.0, 0.75]),
}
# The fill ratio decides; the corners only break near-ties.  Calibrated so that slightly softened
# edges (e.g. renders passed through the demo VAE: squares keep fill 0.86-0.99 but their 3x3-pixel
# corner patches drop to ~0.4) still read as the shape that was drawn, while a circle's corners stay
# empty and its fill stays 0.69-0.83 and an upright triangle's top corners stay empty.
_SHAPE_WEIGHTS = np.array([8.0, 0.1, 0.1])


@dataclass(frozen=True)
class Classification:
    bg: str | None
    obj: str | None
    shape: str | None
    fill: float = 0.0


def classify(image) -> Classification:
    """Read (background colour, object colour, shape) from an RGB image.

    * background = most common nearest-palette colour of the border pixels;
    * object = most common nearest-palette colour among the other pixels
      (pixels whose nearest palette colour is not the background);
    * shape = nearest template (weighted) in (fill ratio of the object's
      bounding box, fill of the top corner patches, of the bottom ones), each
      patch 10% of the box side: circle ~0.785 with empty corners, square ~1.0
      with full corners, upright triangle ~0.5 with full bottom corners.  The
      fill ratio dominates; the corners break near-ties.
    Accepts a PIL image or an (H, W, 3) uint8 array.  Any size works; the
    image is not resized.
    """
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    labels = _nearest_palette(arr[..., :3])
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg_idx = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    rest = labels != bg_idx
    if rest.sum() < 4:
        return Classification(COLOURS[bg_idx], None, None)
    counts = np.bincount(labels[rest], minlength=len(COLOURS))
    obj_idx = int(counts.argmax())
    mask = labels == obj_idx
    # bounding box from rows/columns that hold at least 2 object pixels (ignores stray pixels)
    rows = np.nonzero(mask.sum(1) >= 2)[0]
    cols = np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) < 3 or len(cols) < 3:
        return Classification(COLOURS[bg_idx], COLOURS[obj_idx], None)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[y0:y1, x0:x1]
    bh, bw = box.shape
    fill = float(box.mean())
    ph, pw = max(1, round(0.1 * bh)), max(1, round(0.1 * bw))
    corners = [
        box[:ph, :pw].mean(),
        box[:ph, -pw:].mean(),
        box[-ph:, :pw].mean(),
        box[-ph:, -pw:].mean(),
    ]
    feat = np.array([fill, (corners[0] + corners[1]) / 2, (corners[2] + corners[3]) / 2])
    shape = min(_SHAPE_TEMPLATES, key=lambda s: float((_SHAPE_WEIGHTS * (feat - _SHAPE_TEMPLATES[s]) ** 2).sum()))
    return Classification(COLOURS[bg_idx], COLOURS[obj_idx], shape, fill)
