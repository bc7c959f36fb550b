"""The extra-networks panel's data (no Gradio): the models folder's LoRAs and embeddings, and the prompt
text a click inserts, as AUTOMATIC1111 writes it: `<lora:name:1>` for a LoRA, the file name for an
embedding. Hashes are shown only once ldm has cached them (listing never reads the files)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import Context

LORA = "LoRA"
EMBEDDING = "Embedding"
HEADERS = ["Kind", "Name", "Hash"]


def network_rows(ctx: "Context") -> list[list[str]]:
    """[kind, name, short hash or ""] for every LoRA, then every embedding, of the serving model's folder."""
    pipe = ctx.pipes.base
    library = pipe.library if pipe is not None else None
    if library is None:
        return []
    rows = [[LORA, e.name, library.cached_short_hash(e) or ""] for e in library.loras]
    rows += [[EMBEDDING, e.stem, library.cached_short_hash(e) or ""] for e in library.embeddings]
    return rows


def tag_for(kind: str, name: str) -> str:
    if kind == LORA:
        return f"<lora:{name}:1>"
    if kind == EMBEDDING:
        return name
    raise ValueError(f"unknown extra-network kind {kind!r}; one of {LORA}, {EMBEDDING}")


def insert_tag(prompt: str, kind: str, name: str) -> str:
    """`prompt` with the network's tag appended (after a space); unchanged if the tag is already there."""
    tag = tag_for(kind, name)
    prompt = prompt or ""
    if tag in prompt:
        return prompt
    sep = "" if not prompt or prompt[-1].isspace() else " "  # A1111's default separator
    return f"{prompt}{sep}{tag}"
