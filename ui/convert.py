"""Widget and API values -> what ldm takes, and back: whole numbers from sliders and JSON, "0 =
the image's size", uploads as images, parsed infotext as txt2img values, the selected gallery item."""
from __future__ import annotations

from typing import Any

from PIL import Image

from ldm import metadata, samplers
from ldm.images import load_image

from .models import TITLE
from .state import Context


def as_int(name: str, value: Any) -> int:
    """Sliders and JSON deliver 20.0 for 20; anything not whole is the user's error."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def size_or_none(name: str, value: Any) -> int | None:
    """0 / None / empty = "take it from the image" (img2img, inpaint)."""
    return None if value in (None, "", 0, 0.0) else as_int(name, value)


def load_upload(ctx: Context, source: Any, what: str = "image", mode: str | None = "RGB") -> Image.Image:
    if source is None or source == "":
        raise ValueError(f"no {what}: upload one first")
    if isinstance(source, dict) and "path" in source:  # a gradio FileData passed through as a dict
        source = source["path"]
    return load_image(source, max_bytes=ctx.options.max_upload_bytes, mode=mode)


def infotext_fields(infotext: str) -> dict[str, Any]:
    """Parsed infotext -> txt2img parameter values (keys are txt2img's parameter names)."""
    if not infotext or not infotext.strip():
        return {}
    info = metadata.parse_infotext(infotext)
    fields = metadata.infotext_to_kwargs(info) | refiner_fields(info)
    if "sampler" in fields:
        try:  # old combined names ("DPM++ 2M Karras") split into sampler + schedule
            fields["sampler"], fields["schedule"] = samplers.resolve(fields["sampler"], fields.get("schedule"))
        except ValueError:
            fields.pop("sampler")
            fields.pop("schedule", None)
    fields.pop("strength", None)  # txt2img has no denoising strength
    return fields


def refiner_fields(info: dict[str, str]) -> dict[str, Any]:
    """A1111's "Refiner: name [hash]" and "Refiner switch at: 0.8" -> the txt2img refiner fields (the name: the
    dropdown's value; an unknown one is refused, with close names, when the image is generated)."""
    title = info.get("Refiner", "").strip()
    if not title:
        return {}
    match = TITLE.match(title)
    out: dict[str, Any] = {"refiner": match.group(1) if match else title}
    try:
        out["refiner_switch_at"] = float(info["Refiner switch at"])
    except (KeyError, ValueError):
        pass
    return out


def selected_image(gallery: list | None, index: int | None) -> str | None:
    """The file of the selected (or first) gallery item; gallery values are paths or (path, caption)."""
    if not gallery:
        return None
    i = index if isinstance(index, int) and 0 <= index < len(gallery) else 0
    item = gallery[i]
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("path") or item.get("image", {}).get("path")
    return item


def selected(values: list | None, index: int | None, default: Any = None) -> Any:
    if not values:
        return default
    return values[index] if isinstance(index, int) and 0 <= index < len(values) else values[0]
