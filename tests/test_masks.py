"""Tests for ldm.masks: mask normalisation, regions, fill, compositing, outpainting."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.fill import fill_masked
from ldm.masks import (
    InpaintArea,
    MaskedContent,
    blur_mask,
    crop_region,
    expand_to_aspect,
    is_full,
    mask_bbox,
    normalize_mask,
    pad_for_outpaint,
    paste_back,
)
from ldm.params import MASK_BLUR

SIZE = (64, 48)  # (w, h): deliberately not square to catch w/h mix-ups


def _pattern() -> np.ndarray:
    """uint8 HxW: 255 inside a rectangle, 0 elsewhere."""
    a = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    a[10:30, 20:50] = 255
    return a


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _palette_with_transparency() -> Image.Image:
    # Index 0 is transparent (= repaint) and used inside the rectangle.
    idx = np.where(_pattern() == 255, 0, 1).astype(np.uint8)
    img = Image.fromarray(idx).convert("P")
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.info["transparency"] = 0
    return img


def _sources() -> dict[str, object]:
    p = _pattern()
    rgb_noise = _noise(p.shape + (3,))
    return {
        "L": Image.fromarray(p),
        "1": Image.fromarray(p).convert("1"),
        "RGB": Image.fromarray(np.stack([p] * 3, axis=2)),
        "RGBA varying alpha": Image.fromarray(np.dstack([rgb_noise, 255 - p])),
        "RGBA constant alpha": Image.fromarray(np.dstack([p, p, p, np.full_like(p, 255)])),
        "RGBA constant zero alpha": Image.fromarray(np.dstack([p, p, p, np.zeros_like(p)])),
        "LA varying alpha": Image.fromarray(np.dstack([_noise(p.shape), 255 - p])),
        "LA constant alpha": Image.fromarray(np.dstack([p, np.full_like(p, 128)])),
        "P": Image.fromarray(np.stack([p] * 3, axis=2)).convert("P"),
        "P transparency": _palette_with_transparency(),
        "I;16": Image.fromarray(p.astype(np.uint16) * 257),
        "I 16-bit range": Image.fromarray(p.astype(np.int32) * 257),
        "I 8-bit range": Image.fromarray(p).convert("I"),
        "F 0..1": Image.fromarray(p.astype(np.float32) / 255),
        "numpy bool": p > 0,
        "numpy uint8": p,
        "numpy float": p.astype(np.float32) / 255,
        "numpy HxWx1": p[..., None],
        "numpy RGB": np.stack([p] * 3, axis=2),
        "numpy RGBA alpha": np.dstack([rgb_noise, 255 - p]),
        "PNG bytes": _png(Image.fromarray(p)),
        "binary file": io.BytesIO(_png(Image.fromarray(p))),
    }


@pytest.mark.parametrize("name", list(_sources()))
def test_normalize_mask_formats(name: str) -> None:
    source = _sources()[name]
    mask = normalize_mask(source, SIZE)
    assert mask.mode == "L" and mask.size == SIZE
    np.testing.assert_array_equal(np.asarray(mask), _pattern(), err_msg=name)


def test_normalize_mask_keeps_soft_values_and_inverts() -> None:
    ramp = np.tile(np.linspace(0, 255, SIZE[0]).round().astype(np.uint8), (SIZE[1], 1))
    soft = normalize_mask(Image.fromarray(ramp), SIZE)
    np.testing.assert_array_equal(np.asarray(soft), ramp)  # no binarisation
    flipped = normalize_mask(Image.fromarray(ramp), SIZE, invert=True)
    np.testing.assert_array_equal(np.asarray(flipped), 255 - ramp)


def test_invert_applies_after_alpha_rule() -> None:
    p = _pattern()
    rgba = Image.fromarray(np.dstack([_noise(p.shape + (3,)), 255 - p]))
    np.testing.assert_array_equal(np.asarray(normalize_mask(rgba, SIZE, invert=True)), 255 - p)


def test_normalize_mask_does_not_alias_input() -> None:
    src = Image.fromarray(_pattern())
    out = normalize_mask(src, SIZE)
    out.paste(0, (0, 0, 64, 48))
    assert src.getextrema() == (0, 255)


def test_wrong_size_is_resized_nearest_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    small = Image.fromarray(_pattern()).resize((32, 24), Image.Resampling.NEAREST)
    with caplog.at_level(logging.INFO, logger="ldm.masks"):
        mask = normalize_mask(small, SIZE)
    assert mask.size == SIZE
    assert set(np.unique(np.asarray(mask))) <= {0, 255}  # NEAREST keeps it hard
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm.masks"]
    assert any("32x24" in m and "64x48" in m for m in messages), messages


def test_small_aspect_difference_is_tolerated() -> None:
    mask = normalize_mask(np.full((100, 103), 255, np.uint8), (100, 100))  # 3% wider
    assert mask.size == (100, 100) and is_full(mask)


def test_aspect_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mask is 100x400 but the image is 512x512: aspect ratios differ"):
        normalize_mask(Image.new("L", (100, 400), 255), (512, 512))
    with pytest.raises(ValueError, match="aspect ratios differ"):
        normalize_mask(Image.new("L", (106, 100), 255), (100, 100))  # 6% wider


def test_all_black_selects_nothing() -> None:
    with pytest.raises(ValueError, match="mask selects nothing: paint \\(white\\) the area to repaint"):
        normalize_mask(Image.new("L", SIZE, 0), SIZE)
    with pytest.raises(ValueError, match="selects nothing"):
        normalize_mask(Image.new("L", SIZE, 255), SIZE, invert=True)
    with pytest.raises(ValueError, match="selects nothing"):
        normalize_mask(np.zeros((48, 64), bool), SIZE)


def test_is_full() -> None:
    full = normalize_mask(Image.new("RGB", SIZE, "white"), SIZE)
    assert is_full(full)
    assert not is_full(normalize_mask(_pattern(), SIZE))
    assert not is_full(Image.new("L", SIZE, 254))


@pytest.mark.parametrize(
    "bad, match",
    [
        ("mask.png", "PIL image, a numpy array or encoded image bytes"),
        (b"definitely not an image", "not an image file"),
        ([[0, 255]], "PIL image, a numpy array"),
        (np.full((48, 64), 1.5), r"float mask values must be in \[0, 1\]"),
        (np.full((48, 64), np.nan), "NaN"),
        (np.full((48, 64), 300), "0..255"),
        (np.zeros((48, 64, 5), np.uint8), "HxW or HxWxC"),
        (np.zeros((0, 64), np.uint8), "empty"),
        (Image.new("L", (0, 0)), "empty image"),
    ],
)
def test_normalize_mask_rejects_non_masks(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_mask(bad, SIZE)


@pytest.mark.parametrize("size", [(0, 10), (10,), "64x48", (10.5, 10), None])
def test_normalize_mask_rejects_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="size must be"):
        normalize_mask(_pattern(), size)  # type: ignore[arg-type]


def test_enums_are_strings() -> None:
    assert InpaintArea("masked") is InpaintArea.MASKED and InpaintArea.WHOLE == "whole"
    assert {m.value for m in MaskedContent} == {"fill", "original", "latent_noise", "latent_nothing"}


# ---------------------------------------------------------------- blur


def test_blur_zero_is_identity() -> None:
    mask = Image.fromarray(_pattern())
    out = blur_mask(mask, 0)
    assert out is not mask
    np.testing.assert_array_equal(np.asarray(out), _pattern())


def test_blur_softens_edges_keeps_interior() -> None:
    a = np.zeros((100, 100), np.uint8)
    a[20:80, 20:80] = 255
    out = np.asarray(blur_mask(Image.fromarray(a), 4))
    assert out[50, 50] == 255  # interior untouched
    assert out[2, 2] == 0  # far outside untouched
    assert 60 < out[50, 20] < 200 and 60 < out[50, 79] < 200  # the edge is feathered
    assert 0 < out[50, 17] < out[50, 20] < out[50, 23] < 255  # monotone ramp across it
    # A mask touching the border stays solid at the border (outpainting strips).
    b = np.zeros((100, 100), np.uint8)
    b[:, :20] = 255
    assert np.asarray(blur_mask(Image.fromarray(b), 4))[:, 0].min() == 255


@pytest.mark.parametrize("radius", [-1, float("nan"), "3", None, MASK_BLUR.high + 1, 10**10])  # 1e10 crashed PIL
def test_blur_rejects_bad_radius(radius: object) -> None:
    with pytest.raises(ValueError, match="radius"):
        blur_mask(Image.fromarray(_pattern()), radius)  # type: ignore[arg-type]


def test_blur_requires_l_mask() -> None:
    with pytest.raises(ValueError, match="mode 'L'"):
        blur_mask(Image.new("RGB", SIZE), 2)


# ---------------------------------------------------------------- regions


def test_mask_bbox_is_exclusive() -> None:
    assert mask_bbox(Image.fromarray(_pattern())) == (20, 10, 50, 30)
    one = Image.new("L", (10, 10), 0)
    one.putpixel((9, 9), 1)  # any value > 0 counts
    assert mask_bbox(one) == (9, 9, 10, 10)
    with pytest.raises(ValueError, match="selects nothing"):
        mask_bbox(Image.new("L", (10, 10), 0))


def test_crop_region_pads_and_clamps() -> None:
    mask = Image.fromarray(_pattern())
    assert crop_region(mask, 0) == (20, 10, 50, 30)
    assert crop_region(mask, 5) == (15, 5, 55, 35)
    assert crop_region(mask, 15) == (5, 0, 64, 45)  # clamped at top and right
    assert crop_region(mask, 1000) == (0, 0, 64, 48)
    with pytest.raises(ValueError, match="padding"):
        crop_region(mask, -1)


def test_expand_to_aspect_centred() -> None:
    # 128x32 region in the middle of a 512x512 image, square target -> 128x128 centred.
    assert expand_to_aspect((192, 240, 320, 272), 512, 512, 512, 512) == (192, 192, 320, 320)
    # Tall region, wide target: the width grows.
    assert expand_to_aspect((240, 100, 272, 200), 512, 256, 512, 512) == (156, 100, 356, 200)


def test_expand_to_aspect_exact_aspect_unchanged() -> None:
    assert expand_to_aspect((10, 20, 74, 68), 512, 384, 200, 200) == (10, 20, 74, 68)


def test_expand_to_aspect_shifts_at_edges() -> None:
    # Touching the top: grows downwards instead, keeping the height it needs.
    assert expand_to_aspect((100, 0, 228, 32), 1, 1, 512, 512) == (100, 0, 228, 128)
    # Touching the bottom.
    assert expand_to_aspect((100, 480, 228, 512), 1, 1, 512, 512) == (100, 384, 228, 512)
    # Touching the right edge with a tall region.
    assert expand_to_aspect((500, 100, 512, 200), 1, 1, 512, 512) == (412, 100, 512, 200)


def test_expand_to_aspect_clamps_when_it_cannot_fit() -> None:
    # Needs 400 px of height in a 300 px tall image: clamped to the whole height.
    assert expand_to_aspect((0, 100, 400, 150), 1, 1, 512, 300) == (0, 0, 400, 300)


def test_expand_to_aspect_result_has_target_ratio() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        x0, y0 = (int(v) for v in rng.integers(0, 400, 2))
        x1, y1 = x0 + int(rng.integers(1, 112)), y0 + int(rng.integers(1, 112))
        tw, th = (int(v) for v in rng.choice([256, 384, 512, 768], 2))
        r = expand_to_aspect((x0, y0, x1, y1), tw, th, 512, 512)
        assert 0 <= r[0] <= x0 and 0 <= r[1] <= y0 and x1 <= r[2] <= 512 and y1 <= r[3] <= 512
        w, h = r[2] - r[0], r[3] - r[1]
        assert abs(w / h - tw / th) <= (tw / th) / min(w, h) + 1e-9  # within one pixel


@pytest.mark.parametrize(
    "args",
    [
        ((0, 0, 0, 10), 1, 1, 100, 100),  # empty region
        ((0, 0, 101, 10), 1, 1, 100, 100),  # outside the image
        ((-1, 0, 10, 10), 1, 1, 100, 100),
        ((0, 0, 10, 10), 0, 1, 100, 100),
        ((0, 0, 10), 1, 1, 100, 100),
    ],
)
def test_expand_to_aspect_rejects_bad_args(args: tuple) -> None:
    with pytest.raises(ValueError):
        expand_to_aspect(*args)


# ---------------------------------------------------------------- fill


def _red_blue(size: tuple[int, int] = (128, 96)) -> Image.Image:
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


def test_fill_masked_uses_surrounding_colours() -> None:
    img = _red_blue()
    mask = Image.new("L", img.size, 0)
    mask.paste(255, (40, 0, 88, 96))  # a vertical band across the colour boundary
    out = np.asarray(fill_masked(img, mask)).astype(int)
    src = np.asarray(img)
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[outside], src[outside])
    row = out[48]
    assert row[41, 0] > 200 and row[41, 2] < 55  # next to the red side: red
    assert row[86, 2] > 200 and row[86, 0] < 55  # next to the blue side: blue
    assert row[64, 0] > 60 and row[64, 2] > 60  # in between: a blend
    # Smooth: red decreases monotonically across the band, no jumps.
    assert np.all(np.diff(row[40:88, 0]) <= 0)
    assert np.abs(np.diff(row[40:88, 0])).max() < 40


def test_fill_masked_soft_mask_and_modes() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(_noise((40, 50)))  # mode L
    soft = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    soft[:, :10] = 0
    out = fill_masked(img, Image.fromarray(soft))
    assert out.mode == "L" and out.size == img.size
    np.testing.assert_array_equal(np.asarray(out)[soft == 0], np.asarray(img)[soft == 0])


def test_fill_masked_full_mask_uses_mean_colour() -> None:
    img = _red_blue((10, 10))
    out = np.asarray(fill_masked(img, Image.new("L", img.size, 255)))
    assert (out == [128, 0, 128]).all()


def test_fill_masked_size_mismatch() -> None:
    with pytest.raises(ValueError, match="normalize the mask"):
        fill_masked(_red_blue(), Image.new("L", (10, 10), 255))


# ---------------------------------------------------------------- paste back


def test_paste_back_exact_outside_mask_whole_image() -> None:
    rng = np.random.default_rng(3)
    original = Image.fromarray(_noise((48, 64, 3), 4))
    generated = Image.fromarray(_noise((48, 64, 3), 5))
    soft = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    soft[rng.random(soft.shape) < 0.3] = 0
    soft[rng.random(soft.shape) < 0.3] = 255
    out = np.asarray(paste_back(original, generated, Image.fromarray(soft)))
    np.testing.assert_array_equal(out[soft == 0], np.asarray(original)[soft == 0])
    np.testing.assert_array_equal(out[soft == 255], np.asarray(generated)[soft == 255])
    mid = (soft > 0) & (soft < 255)
    lo = np.minimum(np.asarray(original), np.asarray(generated))[mid]
    hi = np.maximum(np.asarray(original), np.asarray(generated))[mid]
    assert ((out[mid] >= lo) & (out[mid] <= hi)).all()  # a blend of the two


def test_paste_back_region_resizes_and_keeps_outside() -> None:
    original = Image.fromarray(_noise((48, 64, 3), 6))
    mask = Image.new("L", original.size, 0)
    mask.paste(255, (22, 12, 48, 28))
    mask = blur_mask(mask, 2)  # spills beyond the region: still only the region changes
    region = (16, 8, 56, 36)  # 40x28
    generated = Image.new("RGB", (80, 56), (0, 255, 0))  # 2x the region: LANCZOS down
    out = paste_back(original, generated, mask, region)
    a, o, m = np.asarray(out), np.asarray(original), np.asarray(mask)
    outside_region = np.ones(m.shape, bool)
    outside_region[8:36, 16:56] = False
    np.testing.assert_array_equal(a[outside_region], o[outside_region])
    np.testing.assert_array_equal(a[m == 0], o[m == 0])
    assert (a[m == 255] == [0, 255, 0]).all()


def test_paste_back_errors() -> None:
    original = Image.new("RGB", (64, 48))
    with pytest.raises(ValueError, match="whole image"):
        paste_back(original, original, Image.new("L", (32, 24), 255))
    with pytest.raises(ValueError, match="region"):
        paste_back(original, original, Image.new("L", (64, 48), 255), (0, 0, 65, 48))
    with pytest.raises(ValueError, match="mode 'L'"):
        paste_back(original, original, Image.new("RGB", (64, 48)))


# ---------------------------------------------------------------- outpaint


def test_pad_for_outpaint_sizes_mask_and_edges() -> None:
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, :] = (255, 0, 0)  # top row red
    a[-1, :] = (0, 0, 255)  # bottom row blue
    a[1:3, 0] = (0, 255, 0)  # left column (middle rows) green
    canvas, mask = pad_for_outpaint(Image.fromarray(a), 3, 2, 5, 1)
    assert canvas.size == (6 + 3 + 2, 4 + 5 + 1) and canvas.mode == "RGB"
    assert mask.size == canvas.size and mask.mode == "L"
    c, m = np.asarray(canvas), np.asarray(mask)
    assert (m[5:9, 3:9] == 0).all()
    assert m.sum() == 255 * (m.size - 4 * 6)
    np.testing.assert_array_equal(c[5:9, 3:9], a)  # original untouched
    assert (c[:5, 3:9] == [255, 0, 0]).all()  # top extends the top row
    assert (c[9:, 3:9] == [0, 0, 255]).all()  # bottom extends the bottom row
    assert (c[6:8, :3] == [0, 255, 0]).all()  # left extends the left column
    assert (c[:5, :3] == [255, 0, 0]).all()  # corner takes the corner pixel


def test_pad_for_outpaint_one_side_grey() -> None:
    canvas, mask = pad_for_outpaint(Image.new("L", (8, 8), 77), 0, 0, 0, 8)
    assert canvas.size == (8, 16) and canvas.mode == "L"
    assert canvas.getextrema() == (77, 77)
    assert mask_bbox(mask) == (0, 8, 8, 16)


@pytest.mark.parametrize(
    "sides, match",
    [((0, 0, 0, 0), "at least one side"), ((-1, 8, 0, 0), r"outpaint left must be a whole number, 0 or more \(pixels\), got -1"),
     ((1.5, 0, 0, 0), "whole number")],
)
def test_pad_for_outpaint_rejects_bad_sides(sides: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pad_for_outpaint(Image.new("RGB", (8, 8)), *sides)


def test_pad_for_outpaint_refuses_a_huge_canvas_before_allocating_it() -> None:
    image = Image.new("RGB", (64, 48))
    with pytest.raises(ValueError, match=r"64x48 by left 0, right 10000000.*10000064x48 canvas, over the limit"):
        pad_for_outpaint(image, 0, 10_000_000, 0, 0)  # 1.4 GB of pixels if it were built
    canvas, _ = pad_for_outpaint(image, 0, 16, 0, 0, max_pixels=80 * 48)  # exactly at the limit: fine
    assert canvas.size == (80, 48)
    with pytest.raises(ValueError, match="over the limit of 3,839 pixels"):
        pad_for_outpaint(image, 0, 16, 0, 0, max_pixels=80 * 48 - 1)
