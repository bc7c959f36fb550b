"""Infotext as A1111 reads and writes it (issue 17 items 7, 8): stripped lines, hires fields,
EXIF UserComment in JPEG and WebP."""
from __future__ import annotations

import pytest
from PIL import Image

from ldm import metadata

HIRES = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 32x32, "
         "Denoising strength: 0.4, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")


def test_windows_line_ends_and_indented_continuations_parse_as_a1111():
    text = "a cat,\r\n   big\r\nNegative prompt: dog\r\n  ugly\r\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1\r\n"
    info = metadata.parse_infotext(text)
    assert info["Prompt"] == "a cat,\nbig" and info["Negative prompt"] == "dog\nugly"
    assert info["Seed"] == "1" and info["Steps"] == "20"


def test_hires_fields_are_restored():
    kwargs = metadata.infotext_to_kwargs(metadata.parse_infotext(HIRES))
    assert kwargs["hires_scale"] == 2.0 and kwargs["hires_steps"] == 10
    assert kwargs["hires_strength"] == 0.4 and kwargs["hires_upscaler"] == "latent"
    assert "hires_scale" not in metadata.infotext_to_kwargs(metadata.parse_infotext(HIRES.split(", Hires")[0]))


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_infotext_in_exif_user_comment(tmp_path, suffix):
    path = metadata.save_image(Image.new("RGB", (16, 16)), tmp_path / f"x{suffix}", HIRES + ", Model: “ü”")
    with Image.open(path) as im:
        raw = im.getexif().get_ifd(metadata.EXIF_IFD)[metadata.USER_COMMENT]
        assert raw.startswith(b"UNICODE\0") and raw[8:] == (HIRES + ", Model: “ü”").encode("utf-16-be")
        assert metadata.read_infotext(im) == HIRES + ", Model: “ü”"


def test_a1111_user_comment_variants_are_read():
    text = "a cat\nSteps: 2, Seed: 1, Size: 8x8"
    assert metadata.user_comment(b"UNICODE\0" + text.encode("utf-16-be")) == text  # piexif / A1111
    assert metadata.user_comment(b"UNICODE\0" + text.encode("utf-16-le")) == text
    assert metadata.user_comment(b"ASCII\0\0\0" + text.encode()) == text


def test_an_image_without_parameters_has_none(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    with Image.open(tmp_path / "plain.jpg") as im:
        assert metadata.read_infotext(im) is None
