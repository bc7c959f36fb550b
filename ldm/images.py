"""Safe image loading and small image utilities.

Everything here is a pure function: no module state, nothing happens at import
time, and torch is imported lazily so that PIL-only callers (e.g. ``ldm.masks``)
stay light.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "load_image",
    "to_8bit",
    "pil_to_tensor",
    "tensor_to_pil",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096

ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_EXIF_ORIENTATION = 0x0112
_MB = 1024 * 1024


def _format_mb(n_bytes: int, decimals: int = 1, *, round_up: bool = False) -> str:
    """'31.2 MB' / '20 MB' (MB = 2**20 bytes)."""
    scale = 10**decimals
    mb = n_bytes / _MB
    if round_up:  # a refused upload must never print as "the limit" or below
        mb = math.ceil(mb * scale) / scale
    text = f"{mb:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + " MB"


def _format_pixel_limit(max_pixels: int) -> str:
    side = math.isqrt(max_pixels)
    square = f" ({side}x{side})" if side * side == max_pixels else ""
    return f"{max_pixels:,} pixels{square}"


def _check_bytes(n_bytes: int, max_bytes: int | None) -> None:
    if max_bytes is not None and n_bytes > max_bytes:
        # Add decimals until the two numbers visibly differ (20.01 MB vs 20 MB).
        for decimals in (1, 2, 3, 6):
            size, limit = _format_mb(n_bytes, decimals, round_up=True), _format_mb(max_bytes, decimals)
            if size != limit:
                break
        raise ValueError(f"upload is {size}; the limit is {limit}")


def _check_dimensions(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} is an empty image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ValueError(
            f"image is {width}x{height} pixels; the limit is {_format_pixel_limit(max_pixels)}"
        )


def _read_source(source: object, max_bytes: int | None) -> tuple[bytes, str]:
    """Return the encoded bytes and a display name, enforcing max_bytes before
    anything is decoded (and, for paths, before anything is read)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"not an image file: {path} is a directory")
        _check_bytes(path.stat().st_size, max_bytes)  # FileNotFoundError is left as is
        # Read into memory so the returned image never holds an OS file handle
        # (multi-frame formats would otherwise keep the file open).
        return path.read_bytes(), path.name
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), max_bytes)
        return data, "upload"
    if hasattr(source, "read"):
        # Read at most one byte past the limit: enough to know it is too big
        # without pulling an arbitrarily large stream into memory.
        data = source.read(-1 if max_bytes is None else max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError("the file object was opened in text mode; open it with 'rb'")
        name = os.path.basename(str(getattr(source, "name", "upload")))
        if max_bytes is not None and len(data) > max_bytes:
            # The stream may be longer still; report the size when it is knowable.
            total = len(data)
            try:
                total = max(total, os.fstat(source.fileno()).st_size)  # type: ignore[attr-defined]
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                pass
            _check_bytes(total, max_bytes)
        return bytes(data), name
    raise ValueError(
        f"cannot load an image from {type(source).__name__}; "
        "pass a PIL image, a file path, bytes or a binary file object"
    )


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale high-bit-depth greyscale images ("I;16*", "I", "F") to 8-bit "L".

    PIL's own ``convert("L")`` *clips* these modes, which turns a normal 16-bit
    PNG almost entirely white. Ranges are inferred because PIL does not record
    them: "I;16*" is 0..65535; "I" is 0..65535 if any value exceeds 255, else
    0..255; "F" is 0..1 if no value exceeds 1, else 0..255. Other modes are
    returned unchanged.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64) / 257.0
    elif mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and values.max() > 255:
            values = np.clip(values, 0, 65535) / 257.0
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not make an otherwise fine image unloadable
        logger.info("ignoring unreadable EXIF data")
        return 1


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    mode: str | None = "RGB",
) -> Image.Image:
    """Load an image from a PIL image, a path, bytes or a binary file object.

    Refusals happen as early as possible and always as ``ValueError`` with a
    readable message: too many bytes (before reading/decoding), too many or zero
    pixels (from the header, before decoding), not an image, damaged/truncated.
    A missing path raises ``FileNotFoundError``.

    PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP, an
    application-wide setting this library does not touch) still applies on top
    of ``max_pixels``; its error and warning are reported as ``ValueError`` too.

    EXIF orientation is applied. With ``mode`` (default "RGB") the result is
    converted with a plain ``Image.convert``: alpha is simply dropped (not
    composited onto a background); 16-bit greyscale is scaled, not clipped
    (see :func:`to_8bit`). With ``mode=None`` the decoded image is returned
    as is, keeping ``.info`` (PNG text chunks, e.g. generation parameters).
    Multi-frame files yield their first frame.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer; got {max_pixels!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
    ):
        raise ValueError(f"max_bytes must be a positive integer or None; got {max_bytes!r}")
    if mode is not None and mode not in Image.MODES:
        raise ValueError(f"unknown image mode {mode!r}; use one of {', '.join(Image.MODES)} or None")

    caller_owned = isinstance(source, Image.Image)
    if caller_owned:
        image, name = source, "image"
    else:
        data, name = _read_source(source, max_bytes)
        if not data:
            raise ValueError(f"not an image file: {name} is empty")

    with warnings.catch_warnings():
        # Turn PIL's bomb *warning* into an exception so it is reported like the
        # error (note: warning filters are process-wide while this block runs).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if not caller_owned:
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ValueError(
                    f"image is too large to open ({exc}); the limit is {_format_pixel_limit(max_pixels)}"
                ) from exc
            except UnidentifiedImageError as exc:
                raise ValueError(f"not an image file: {name}") from exc
            except Exception as exc:  # broken headers make plugins raise all sorts of things
                raise ValueError(f"not an image file: {name} ({exc})") from exc

        # Image.open only parsed the header: refuse by dimensions before decoding.
        _check_dimensions(image.size, max_pixels, name)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"image is too large to decode ({exc})") from exc
        except Exception as exc:  # truncated data, corrupt streams, decoder errors
            raise ValueError(f"could not decode {name}: the file is damaged or truncated ({exc})") from exc

    if _exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)  # returns a new image, orientation tag removed
    elif caller_owned:
        image = image.copy()  # never hand back (and let callers mutate) the caller's object

    if mode is not None and image.mode != mode:
        if mode not in ("I", "F") and not mode.startswith("I;16"):
            image = to_8bit(image)  # scale 16-bit/float down instead of clipping
        image = image.convert(mode)
    return image


def pil_to_tensor(images: Sequence[Image.Image] | Image.Image) -> "torch.Tensor":
    """Images -> float32 NCHW tensor in [-1, 1].

    Bit-identical to diffusers' ``VaeImageProcessor.preprocess`` for images that
    need no resizing: ``float32(x) / 255.0`` in numpy, then ``2.0 * x - 1.0``
    in torch (same ops, same order, so same rounding). "L" gives C=1, "RGB" C=3,
    "RGBA" C=4; other modes are converted to RGB first.
    """
    import torch

    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("pil_to_tensor needs at least one image")
    prepared: list[Image.Image] = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise ValueError(f"pil_to_tensor takes PIL images; got {type(img).__name__}")
        prepared.append(img if img.mode in ("L", "RGB", "RGBA") else to_8bit(img).convert("RGB"))
    sizes = {img.size for img in prepared}
    modes = {img.mode for img in prepared}
    if len(sizes) > 1 or len(modes) > 1:
        raise ValueError(
            "all images in a batch must have the same size and mode; got "
            + ", ".join(f"{im.width}x{im.height} {im.mode}" for im in prepared)
        )
    arrays = np.stack([np.array(img).astype(np.float32) / 255.0 for img in prepared], axis=0)
    if arrays.ndim == 3:  # greyscale: add the channel axis
        arrays = arrays[..., None]
    tensor = torch.from_numpy(arrays.transpose(0, 3, 1, 2))
    return (2.0 * tensor - 1.0).contiguous()


def tensor_to_pil(x: "torch.Tensor") -> list[Image.Image]:
    """NCHW (or CHW) tensor in [-1, 1] -> list of PIL images.

    Pixel-identical to diffusers' ``VaeImageProcessor.postprocess(output_type="pil")``:
    ``(x * 0.5 + 0.5).clamp(0, 1)`` in the tensor's own dtype, then float32
    numpy, ``(v * 255).round().astype(uint8)``. C=1 gives "L", 3 "RGB", 4 "RGBA".
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise ValueError(f"tensor_to_pil takes a torch tensor; got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"tensor_to_pil needs an NCHW tensor with 1, 3 or 4 channels; got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"tensor_to_pil needs a floating-point tensor in [-1, 1]; got {x.dtype}")
    x = (x.detach() * 0.5 + 0.5).clamp(0, 1)
    arrays = x.cpu().permute(0, 2, 3, 1).float().numpy()
    arrays = (arrays * 255).round().astype("uint8")
    if arrays.shape[-1] == 1:
        arrays = arrays[..., 0]
    return [Image.fromarray(a) for a in arrays]
