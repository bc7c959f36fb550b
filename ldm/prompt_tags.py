"""A1111's extra-network tags in prompts: `<lora:name:w>`, `<lora:name:te_w:unet_w>`.

As AUTOMATIC1111 reads them: a tag is `<kind:args>`, args split on ":"; the first is the file name, then
the text-encoder multiplier (default 1), then the U-Net multiplier (default: the text-encoder one); named
arguments `te=`, `unet=` (and `dyn=`, ignored) are accepted too. Only positive prompts are parsed. The
tags are removed from the text that is encoded; the prompt written to the infotext keeps them.
`<lyco:...>` is the older name of the same thing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
UNSUPPORTED_KINDS = {"hypernet": "hypernetworks"}


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0  # text-encoder multiplier
    unet: float = 1.0  # U-Net multiplier

    def tag(self) -> str:
        args = [self.name, _num(self.te)] + ([] if self.unet == self.te else [_num(self.unet)])
        return f"<lora:{':'.join(args)}>"


def extract_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its LoRA tags, the tags in order). Malformed multipliers raise ValueError."""
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1).lower(), m.group(2)
        if kind in UNSUPPORTED_KINDS:
            raise ValueError(f"{m.group(0)}: {UNSUPPORTED_KINDS[kind]} are not supported; use a LoRA (<lora:name:1>)")
        if kind not in LORA_KINDS:
            return m.group(0)  # not an extra-network tag we know: plain text
        tags.append(_parse(m.group(0), args.split(":")))
        return ""

    text = _TAG.sub(take, prompt)
    return text, tags


def has_loras(prompt: str) -> bool:
    return any(m.group(1).lower() in LORA_KINDS for m in _TAG.finditer(prompt))


def _parse(tag: str, args: list[str]) -> LoraTag:
    name = args[0].strip()
    if not name:
        raise ValueError(f"{tag}: the LoRA name is empty; write <lora:name:weight>")
    positional, named = [], {}
    for arg in args[1:]:
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(arg)
    unknown = set(named) - {"te", "unet", "dyn"}
    if unknown or len(positional) > 3:
        raise ValueError(f"{tag}: unexpected argument(s) {', '.join(sorted(unknown)) or positional[3:]}; "
                         "write <lora:name:weight> or <lora:name:te_weight:unet_weight>")
    te = _multiplier(tag, named.get("te", positional[0] if positional else "1"))
    unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
    return LoraTag(name, te, te if unet_text is None else _multiplier(tag, unet_text))


def _multiplier(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: {text.strip()!r} is not a number; write <lora:name:0.8>") from None
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{tag}: the multiplier must be a finite number")
    return value


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)
