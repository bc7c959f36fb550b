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
    # As A1111: each line stripped (Windows "\r\n", indented continuation lines).
    lines = [line.strip() for line in text.strip().split("\n")]
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
    if "Hires upscale" in info:  # the hires fix: its denoising strength is the second pass's
        out.update(_hires_kwargs(info))
    return out


def _hires_kwargs(info: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name, cast in (("Hires upscale", "hires_scale", float), ("Hires steps", "hires_steps", int),
                            ("Denoising strength", "hires_strength", float)):
        try:
            out[name] = cast(info[key])
        except (KeyError, ValueError):
            pass
    if info.get("Hires upscaler", "").strip():  # A1111's "Latent" / "Lanczos": our names in lower case
        out["hires_upscaler"] = info["Hires upscaler"].strip().lower()  # hires.plan judges it
    return out


def png_info(infotext: str, extra: Mapping[str, str] | None = None) -> PngInfo:
    """`parameters` (when not empty) and any `extra` chunks, e.g. A1111's `postprocessing`."""
    meta = PngInfo()
    if infotext:
        meta.add_text("parameters", infotext)
    for key, text in (extra or {}).items():
        meta.add_text(key, text)
    return meta


def save_png(image: Image.Image, path: str | Path, infotext: str, extra: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    image.save(path, format="PNG", pnginfo=png_info(infotext, extra))
    return path


def postprocessing(scale: float, upscaler: str) -> str:
    """A1111's `postprocessing` text for a plain resize: "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"."""
    return format_infotext("", "", {"Postprocess upscale by": f"{scale:g}", "Postprocess upscaler": upscaler}).strip()


def with_size(infotext: str, width: int, height: int) -> str:
    """The same infotext with `Size:` saying width x height (what a resized copy now is)."""
    lines = infotext.split("\n")
    if infotext and re.search(r"(^|, )Size: \d+x\d+", lines[-1]):
        lines[-1] = re.sub(r"(^|, )Size: \d+x\d+", rf"\g<1>Size: {width}x{height}", lines[-1], count=1)
    return "\n".join(lines)


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # where A1111 puts infotext in JPEG and WebP files


def save_image(image: Image.Image, path: str | Path, infotext: str, **save_args) -> Path:
    """Save with the infotext where A1111 puts it: a PNG `parameters` chunk, or for JPEG/WebP
    (chosen by the suffix) the EXIF UserComment as `UNICODE\0` + UTF-16 (big-endian, as piexif)."""
    path = Path(path)
    if path.suffix.lower() not in (".jpg", ".jpeg", ".webp"):
        return save_png(image, path, infotext)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf-16-be")
    image.convert("RGB").save(path, exif=exif.tobytes(), **save_args)
    return path


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text of a PNG, or of a JPEG/WebP the EXIF UserComment (A1111's place), if any."""
    text = image.info.get("parameters")
    if isinstance(text, str):
        return text
    try:
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no infotext
        return None
    text = user_comment(comment) if isinstance(comment, bytes) else comment if isinstance(comment, str) else None
    return text or None


def user_comment(raw: bytes) -> str:
    """An EXIF UserComment: an 8-byte character-code prefix (UNICODE, ASCII, ...) and the text."""
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        little = len(body) > 1 and body[1] == 0 and body[0] != 0  # piexif writes big-endian; some write LE
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if code in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return raw.decode("utf-8", errors="replace").rstrip("\0")
