"""Tests for ldm.images: guarded loading and diffusers-exact tensor conversion."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin

from ldm.images import DEFAULT_MAX_PIXELS, load_image, pil_to_tensor, tensor_to_pil, to_8bit


def _blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any declared size; compresses ~1000:1."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_image(w: int = 64, h: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (h, w) + channels, dtype=np.uint8)
    return Image.fromarray(data)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record any attempt to decode pixel data."""
    calls: list[str] = []

    def fake_load(self: ImageFile.ImageFile) -> None:
        calls.append(f"{self.size}")
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fake_load)
    return calls


# ---------------------------------------------------------------- bombs and limits


def test_pixel_limit_refuses_from_header(no_decoding: list[str]) -> None:
    data = _blank_png(5000, 5000)  # 25 MP > 16.7 MP default, below PIL's own guard
    assert len(data) < 10_000
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"image is 5000x5000 pixels; the limit is 16,777,216 pixels \(4096x4096\)"):
        load_image(data)
    assert time.perf_counter() - start < 1.0
    assert no_decoding == []


def test_pixel_limit_is_configurable(no_decoding: list[str]) -> None:
    with pytest.raises(ValueError, match="image is 100x100 pixels; the limit is 9,999 pixels$"):
        load_image(_blank_png(100, 100), max_pixels=9_999)
    assert no_decoding == []


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL's warning range, PIL's error range
def test_decompression_bomb_becomes_value_error(side: int, no_decoding: list[str]) -> None:
    data = _blank_png(side, side)
    assert len(data) < 100_000  # a tiny file claiming 100-400 megapixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        with pytest.raises(ValueError, match="too large|pixels; the limit"):
            load_image(data, max_pixels=10**9)
        with pytest.raises(ValueError, match="too large|pixels; the limit"):
            load_image(data)
    assert no_decoding == []


def test_byte_limit_checked_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.truncate(int(31.2 * 2**20))  # sparse: costs no disk and nothing is read
    with pytest.raises(ValueError, match=r"^upload is 31.2 MB; the limit is 20 MB$"):
        load_image(big, max_bytes=20 * 2**20)
    with pytest.raises(ValueError, match="upload is 2 MB; the limit is 1 MB"):
        load_image(b"\0" * 2_000_000, max_bytes=1_000_000)


def test_byte_limit_reads_streams_only_up_to_the_limit() -> None:
    class EndlessStream:
        requested: list[int] = []

        def read(self, n: int = -1) -> bytes:
            assert n >= 0, "tried to read an endless stream to the end"
            self.requested.append(n)
            return b"\0" * n

    stream = EndlessStream()
    with pytest.raises(ValueError, match="the limit is"):
        load_image(stream, max_bytes=1000)  # type: ignore[arg-type]
    assert stream.requested == [1001]


def test_small_upload_within_byte_limit_loads() -> None:
    data = _encode(_noise_image())
    assert load_image(io.BytesIO(data), max_bytes=len(data)).size == (64, 48)


# ---------------------------------------------------------------- not images


@pytest.mark.parametrize(
    "source, match",
    [
        (b"this is plain text, not a picture", "not an image file: upload"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image file"),  # PNG magic, garbage header
        (io.StringIO("text"), "text mode"),
        (12345, "cannot load an image from int"),
        (Image.new("RGB", (0, 0)), "empty image"),
        (Image.new("RGB", (0, 5)), "empty image"),
    ],
)
def test_non_images_are_refused(source: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_image(source)  # type: ignore[arg-type]


def test_non_image_file_and_paths(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an image file: notes.png"):
        load_image(text)
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(fmt: str) -> None:
    data = _encode(_noise_image(128, 128), fmt)
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_pixels": 0}, "max_pixels"), ({"max_bytes": -5}, "max_bytes"), ({"mode": "RGBZ"}, "unknown image mode")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_image(_noise_image(), **kwargs)


# ---------------------------------------------------------------- decoding behaviour


def test_sources_agree(tmp_path: Path) -> None:
    img = _noise_image()
    data = _encode(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = np.asarray(img)
    for source in (img, data, bytearray(data), memoryview(data), io.BytesIO(data), path, str(path)):
        out = load_image(source)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), expected)
    with path.open("rb") as f:
        np.testing.assert_array_equal(np.asarray(load_image(f)), expected)


def test_pil_source_is_not_aliased() -> None:
    img = _noise_image()
    out = load_image(img)
    assert out is not img
    out.paste((0, 0, 0), (0, 0, 64, 48))
    assert img.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (30, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 5, 5))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(img, exif=exif.tobytes()))
    assert out.size == (20, 30)
    assert out.getpixel((19, 0)) == (255, 0, 0)  # now top-right
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getexif().get(0x0112, 1) == 1  # orientation consumed, not applied twice later


def test_mode_conversion_and_png_text() -> None:
    rgba = _noise_image(mode="RGBA")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle, Steps: 20")
    data = _encode(rgba, pnginfo=info)
    kept = load_image(data, mode=None)
    assert kept.mode == "RGBA"
    assert kept.info["parameters"] == "a red circle, Steps: 20"
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(rgba))
    rgb = load_image(data)  # default: plain convert, alpha dropped
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(rgba)[..., :3])
    assert load_image(data, mode="L").mode == "L"


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
    data = _encode(Image.fromarray(values))
    assert load_image(data, mode=None).mode.startswith("I")
    out = np.asarray(load_image(data))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 128, 255])
    np.testing.assert_array_equal(np.asarray(load_image(data, mode="I")), values)  # 16-bit kept


def test_to_8bit() -> None:
    assert to_8bit(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))).getpixel((1, 0)) == 128
    assert to_8bit(Image.fromarray(np.array([[0, 200]], np.int32))).getpixel((1, 0)) == 200
    rgb = _noise_image()
    assert to_8bit(rgb) is rgb


def test_default_limit() -> None:
    assert DEFAULT_MAX_PIXELS == 4096 * 4096
    assert load_image(_blank_png(4096, 4096)).size == (4096, 4096)  # exactly at the limit is fine


# ---------------------------------------------------------------- tensors vs diffusers


@pytest.fixture(scope="module")
def processor():  # noqa: ANN201 - diffusers type
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor()  # the configuration SD pipelines use


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pil_to_tensor_matches_diffusers(processor, mode: str) -> None:  # noqa: ANN001
    images = [_noise_image(64, 48, mode, seed) for seed in range(3)]  # multiples of 8: no resize
    ours = pil_to_tensor(images)
    theirs = processor.preprocess(images)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)  # bit-exact
    assert ours.min() >= -1 and ours.max() <= 1


def _random_outputs(dtype: torch.dtype, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, channels, 24, 32), generator=g) * 2.6 - 1.3  # includes out-of-range values
    # Values exactly on rounding boundaries: pixel k + 0.5.
    k = torch.arange(24 * 32, dtype=torch.float64) % 255
    x[0, 0] = ((k + 0.5) / 255 * 2 - 1).reshape(24, 32).float()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 1])
def test_tensor_to_pil_matches_diffusers(processor, dtype: torch.dtype, channels: int) -> None:  # noqa: ANN001
    x = _random_outputs(dtype, channels)
    ours = tensor_to_pil(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Pillow's fromarray(mode=...) notice
        theirs = processor.postprocess(x, output_type="pil")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.mode == b.mode == ("RGB" if channels == 3 else "L")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_is_lossless() -> None:
    images = [_noise_image(seed=s) for s in range(2)]
    back = tensor_to_pil(pil_to_tensor(images))
    for a, b in zip(images, back):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A single CHW tensor and a grad-tracking tensor are accepted too.
    t = pil_to_tensor(images[0])[0].requires_grad_()
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(t)[0]), np.asarray(images[0]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 2, 8, 8), "1, 3 or 4 channels"),
        (torch.zeros(8, 8), "NCHW"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point"),
        (np.zeros((1, 3, 8, 8)), "torch tensor"),
    ],
)
def test_tensor_to_pil_rejects(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tensor_to_pil(bad)  # type: ignore[arg-type]


def test_pil_to_tensor_rejects_mixed_batches() -> None:
    with pytest.raises(ValueError, match="same size and mode"):
        pil_to_tensor([_noise_image(64, 48), _noise_image(32, 48)])
    with pytest.raises(ValueError, match="at least one"):
        pil_to_tensor([])
