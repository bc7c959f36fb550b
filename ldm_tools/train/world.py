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
from collections.abc import Callable
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


OUTLINE_WIDTH = 5  # pixels: the demo LoRA's style draws the shape as a rim this wide, hollow inside
SMALL_TRIANGLE_RIM, SMALL_TRIANGLE = 3, 34  # ... but 3 pixels for triangles under 34 pixels (`rim_width`)


def rim_width(scene: Scene) -> int:
    """The demo LoRA's rim width for a scene. A triangle's inscribed circle is 0.31 of its side (a circle's
    or square's 0.5), so a 5-pixel rim leaves a small triangle only a sliver of hole, which the demo VAE
    closes (0% of 160 triangles under 27 pixels stayed hollow through it; 57% with a 3-pixel rim); a
    3-pixel rim on a large shape breaks up in the VAE instead (76% vs 97% with 5 pixels)."""
    small = scene.shape == "triangle" and scene.size < SMALL_TRIANGLE
    return SMALL_TRIANGLE_RIM if small else OUTLINE_WIDTH


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of an (H, W) mask by a (2r+1)-pixel square (pure numpy)."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] |= \
                mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def render(scene: Scene, outline: int | Callable[[Scene], int] = 0) -> np.ndarray:
    """Render a scene to a (64, 64, 3) uint8 array; `outline` > 0 (or a function of the scene giving it,
    e.g. `rim_width`) draws the shape as a rim that many
    pixels wide with the background showing inside (the demo LoRA's style). A black-outline style was
    tried first: the demo VAE, trained on two-colour images, decodes a black ring as a darkened
    background and shifts the object's colour, while a two-colour rim decodes cleanly."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.bg]
    mask = shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
    outline = outline(scene) if callable(outline) else outline
    if outline:
        mask &= dilate(~mask, outline)  # keep only pixels within `outline` of the outside
    img[mask] = PALETTE[scene.obj]
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


def palette_labels(image_u8: np.ndarray) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest palette colour."""
    return _nearest_palette(np.asarray(image_u8)[..., :3])


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


# ----------------------------------------------------------------------------
# style detector (the demo LoRA)

# enclosed background / (object + enclosed background) from which a shape counts as hollow. Renders with
# outline=5 score 0.17-0.46 (circles), 0.32-0.57 (squares), 0.05-0.26 (triangles of side >= 26; the smallest
# triangles, 23-25 px, keep only a sliver of hole, 0.02-0.05, hence `rim_width`'s 3-pixel rim for them, which
# scores >= 0.2); plain renders score 0.
HOLLOW_THRESHOLD = 0.05


def _flood(seed: np.ndarray, free: np.ndarray) -> np.ndarray:
    """The pixels of `free` 4-connected to `seed`."""
    reach = seed & free
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= free
        if (grown == reach).all():
            return reach
        reach = grown


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask, each as a mask."""
    left, out = mask.copy(), []
    while left.any():
        seed = np.zeros_like(mask)
        seed[np.unravel_index(np.argmax(left), left.shape)] = True
        region = _flood(seed, left)
        out.append(region)
        left &= ~region
    return out


def holes(mask: np.ndarray) -> np.ndarray:
    """Pixels outside `mask` that are not in the largest 4-connected region outside it (the background).
    A shape cut by the image border still has its hole: the border closes it off from the background."""
    outside = regions(~mask)
    if not outside:
        return np.zeros_like(mask)
    background = max(outside, key=lambda r: int(r.sum()))
    return ~mask & ~background


def hollow_fraction(image) -> float:
    """How hollow the object is: background-coloured pixels enclosed by non-background pixels, as a
    fraction of the filled object. Independent of the object's colour (thin rims decode with shifted
    colours)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3]
    labels = _nearest_palette(arr)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    fg = labels != np.bincount(border, minlength=len(COLOURS)).argmax()
    hole = holes(fg)
    return float(hole.sum() / max(1, (fg | hole).sum()))


def is_hollow(image) -> bool:
    """The demo LoRA's style detector."""
    return hollow_fraction(image) >= HOLLOW_THRESHOLD


def solid(image) -> np.ndarray:
    """The image with the background enclosed by the object painted in the object's colour, so that
    `classify` reads a hollow (LoRA-styled) shape like a filled one."""
    arr = np.array(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3]
    labels = _nearest_palette(arr)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = np.bincount(border, minlength=len(COLOURS)).argmax()
    fg = labels != bg
    if not fg.any():
        return arr
    obj = np.bincount(labels[fg], minlength=len(COLOURS)).argmax()
    arr[holes(fg)] = _PALETTE_ARR[obj].astype(np.uint8)
    return arr
