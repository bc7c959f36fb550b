"""A1111 infotext: the `parameters` PNG text chunk that Civitai and the other UIs read."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# A1111's order for the known keys; anything else follows, then Version last.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash", "VAE",
    "Variation seed", "Variation seed strength", "Denoising strength", "Mask blur", "Clip skip",
)
_PARAM = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',\n:"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Prompt line, 'Negative prompt:' line when non-empty, then 'Key: value, ...' (keys with None omitted)."""
    known = [k for k in KEY_ORDER if k in params]
    rest = [k for k in params if k not in KEY_ORDER and k != "Version"]
    keys = known + rest + (["Version"] if "Version" in params else [])
    line = ", ".join(f"{k}: {_quote(params[k])}" for k in keys if params[k] is not None and params[k] != "")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back: {"Prompt", "Negative prompt", "Steps", "Seed", ...} with string values."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            value = value.strip()
            if value.startswith('"') and value.endswith('"') and len(value) > 1:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            params[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def infotext_to_kwargs(info: Mapping[str, str]) -> dict[str, Any]:
    """Map a parsed infotext to `Pipeline.txt2img` keyword arguments (what 'send to txt2img' fills)."""
    out: dict[str, Any] = {"prompt": info.get("Prompt", ""), "negative_prompt": info.get("Negative prompt", "")}
    conversions = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                   "Sampler": ("sampler", str), "Schedule type": ("schedule", str), "Clip skip": ("clip_skip", int),
                   "Denoising strength": ("strength", float)}
    for key, (name, cast) in conversions.items():
        if key in info:
            try:
                out[name] = cast(info[key])
            except ValueError:
                pass
    size = re.fullmatch(r"(\d+)x(\d+)", info.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size[1]), int(size[2])
    return out


def png_info(infotext: str) -> PngInfo:
    meta = PngInfo()
    meta.add_text("parameters", infotext)
    return meta


def save_png(image: Image.Image, path: str | Path, infotext: str) -> Path:
    path = Path(path)
    image.save(path, format="PNG", pnginfo=png_info(infotext))
    return path


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text of a PNG (or the EXIF UserComment-free JPEG/WebP info), if any."""
    text = image.info.get("parameters")
    return text if isinstance(text, str) else None
