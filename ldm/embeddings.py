"""Textual-inversion embeddings from the models folder, used by file name in prompts, as A1111 does.

A prompt word spelled like an embedding's file name ("bad-hands" for embeddings/bad-hands.safetensors) is
replaced by the embedding's vectors: matched on token ids (the name tokenized alone), longest name first.
Each vector takes one of the chunk's 75 token places, an embedding never straddles two chunks (it starts a
new chunk when it does not fit), and attention weights `(bad-hands:1.2)` apply to its vectors like to words.

Files: `.safetensors` holding `emb_params` [n, dim], A1111's `string_to_param.*`, a single tensor
(diffusers' `{token: vector}`), or SDXL's `clip_l`/`clip_g` pair (each text encoder takes its own).
Pickled `.pt`/`.bin` embeddings are not read. ComfyUI's explicit `embedding:name` is read too; there an unknown
name is an error listing close names (a bare word cannot be told apart from text, so it is just text). Embeddings whose width does not fit a text encoder are
skipped for it (listed in `skipped`), as A1111 skips them; the text is then encoded as words.

The vectors are written into the text encoder's token-embedding output with a forward hook on
`get_input_embeddings()` (transformers 5's CLIPTextModel takes no `inputs_embeds`).
"""
from __future__ import annotations

import difflib
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .components import check_safetensors
from .denoise import Extension
from .library import Library

log = logging.getLogger(__name__)
MAX_VECTORS = 75  # a chunk's token places
_EXPLICIT = re.compile(r"\bembedding:([\w\-]+(?:[./][\w\-]+)*)")  # ComfyUI's explicit `embedding:name`


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Embedding:
    name: str  # the file's stem: the word that calls it
    vectors: torch.Tensor  # [n, dim]
    entry: object  # the library entry (for the TI hash)


class EmbeddingFiles:
    """The embeddings/ folder of a library, read lazily and re-read when a file changes."""

    def __init__(self, library: Library):
        self.library = library
        self._loaded: dict[str, tuple[tuple, dict[str, torch.Tensor]]] = {}  # path -> (stamp, tensors)

    def tensors(self) -> list[tuple[object, dict[str, torch.Tensor]]]:
        """(entry, {key: tensor}) for every readable embedding file; unreadable ones are logged and skipped."""
        out, seen = [], set()
        for entry in self.library.list("embeddings"):
            if not entry.path.is_file():
                continue
            st = entry.path.stat()
            stamp, key = (st.st_size, st.st_mtime_ns), str(entry.path)
            seen.add(key)
            cached = self._loaded.get(key)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, read_embedding_file(entry.path))
                except (EmbeddingError, ValueError, OSError) as exc:
                    log.warning("embedding %s skipped: %s", entry.path, exc)
                    cached = (stamp, {})
                self._loaded[key] = cached
            if cached[1]:
                out.append((entry, cached[1]))
        for gone in set(self._loaded) - seen:
            del self._loaded[gone]
        return out

    def for_encoder(self, tokenizer, dim: int, key: str | None = None) -> "EncoderEmbeddings":
        """The embeddings one text encoder of width `dim` can use; `key`: its part of two-encoder files."""
        return EncoderEmbeddings(self, tokenizer, dim, key)


def read_embedding_file(path) -> dict[str, torch.Tensor]:
    """{"vectors": [n, dim]} or {"clip_l": ..., "clip_g": ...} from a .safetensors embedding file."""
    from safetensors.torch import load_file

    check_safetensors(path)  # refuses pickles renamed .safetensors, truncated and malformed files
    data = load_file(str(path))
    if "clip_l" in data or "clip_g" in data:
        return {k: _matrix(path, k, data[k]) for k in ("clip_l", "clip_g") if k in data}
    if "emb_params" in data:
        return {"vectors": _matrix(path, "emb_params", data["emb_params"])}
    params = [k for k in data if k.startswith("string_to_param")]
    if len(params) == 1:
        return {"vectors": _matrix(path, params[0], data[params[0]])}
    if len(data) == 1:
        (name, tensor), = data.items()
        return {"vectors": _matrix(path, name, tensor)}
    raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected emb_params, string_to_param, "
                         f"clip_l/clip_g or a single tensor; found {', '.join(sorted(data)[:5])})")


def _matrix(path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach().to(torch.float32)
    t = t.unsqueeze(0) if t.dim() == 1 else t
    if t.dim() != 2 or not 1 <= t.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {key} has shape {list(tensor.shape)}; expected [vectors (1..{MAX_VECTORS}), width]")
    return t


class EncoderEmbeddings:
    """The embeddings usable with one tokenizer + text encoder; `table()` is a snapshot for one prompt."""

    def __init__(self, files: EmbeddingFiles, tokenizer, dim: int, key: str | None):
        self.files, self.tokenizer, self.dim, self.key = files, tokenizer, dim, key
        self.skipped: list[str] = []  # "name: why", for embeddings that do not fit this encoder
        self._ids: dict[str, tuple[int, ...]] = {}

    def table(self) -> "EmbeddingTable":
        found: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        skipped, names = [], set()
        for entry, tensors in self.files.tensors():
            vectors = tensors.get(self.key) if self.key else tensors.get("vectors", tensors.get("clip_l"))
            if vectors is None or vectors.shape[1] != self.dim:
                got = f"width {vectors.shape[1]}" if vectors is not None else f"parts {', '.join(tensors)}"
                skipped.append(f"{entry.stem}: {got}, this text encoder needs width {self.dim}")
                continue
            names.add(entry.stem)
            ids = self._ids.get(entry.stem)
            if ids is None:
                ids = self._ids[entry.stem] = tuple(self.tokenizer(entry.stem, add_special_tokens=False)["input_ids"])
            if ids:
                found.setdefault(ids[0], []).append((ids, Embedding(entry.stem, vectors, entry)))
        for options in found.values():
            options.sort(key=lambda o: -len(o[0]))  # longest name first, as A1111
        self.skipped = skipped
        return EmbeddingTable(found, names, skipped)

    def hashes(self, used: list[Embedding]) -> Extension:
        """A no-op loop extension that writes `TI hashes` into the infotext (how a family reports them)."""
        return TIHashes(self.files.library, used)


class EmbeddingTable:
    """Which token runs of a prompt are embeddings (`find_at`), for `ldm.prompts.chunk_prompt`."""

    def __init__(self, by_first_token: dict, names: set[str] = frozenset(), skipped: list[str] = ()):
        self.by_first_token = by_first_token
        self.names = names
        self.skipped = skipped

    def explicit(self, text: str) -> str:
        """`text` with ComfyUI's `embedding:name` written as the bare name; unknown names raise ValueError."""
        def name(m: re.Match) -> str:
            wanted = m.group(1).rpartition("/")[2].removesuffix(".safetensors")
            if wanted in self.names:
                return wanted
            why = next((s for s in self.skipped if s.startswith(f"{wanted}:")), None)
            if why:
                raise ValueError(f"embedding {wanted!r} does not fit this model ({why})")
            close = difflib.get_close_matches(wanted, sorted(self.names), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"no embedding called {wanted!r} in the models folder's embeddings/{hint}")

        return _EXPLICIT.sub(name, text)

    def __bool__(self) -> bool:
        return bool(self.by_first_token)

    def named(self, name: str) -> Embedding:
        return next(e for options in self.by_first_token.values() for _, e in options if e.name == name)

    def only(self, names: set[str], skipped: list[str]) -> "EmbeddingTable":
        kept = {first: [(ids, e) for ids, e in options if e.name in names] for first, options in self.by_first_token.items()}
        return EmbeddingTable({k: v for k, v in kept.items() if v}, self.names & names, skipped)

    def find_at(self, ids: list[int], position: int) -> tuple[Embedding, int] | None:
        """(embedding, number of prompt tokens its name spans) if one starts at `position`, else None."""
        for name_ids, emb in self.by_first_token.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return emb, len(name_ids)
        return None


def joint(tables: list[EmbeddingTable]) -> list[EmbeddingTable]:
    """Text encoders that read one chunking (SDXL's two) keep only the embeddings all of them can use: an
    SDXL file needs both its clip_l and clip_g parts, as in A1111; why the others were left out is shared."""
    if len(tables) < 2:
        return tables
    common = set.intersection(*(t.names for t in tables))
    skipped = list(dict.fromkeys(s for t in tables for s in t.skipped))
    return [t.only(common, skipped) for t in tables]


@contextmanager
def injected(text_encoder, rows: list[list[tuple[int, torch.Tensor]]]):
    """While inside, the token-embedding output of batch row i has rows[i]'s (position, [n, dim] vectors)
    written over positions position..position+n (positions count the BOS token)."""
    if not any(rows):
        yield
        return

    def hook(module, args, output):
        out = output.clone()
        for i, fixes in enumerate(rows):
            for pos, vectors in fixes:
                out[i, pos : pos + vectors.shape[0]] = vectors.to(out.device, out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TIHashes(Extension):
    def __init__(self, library: Library, used: list[Embedding]):
        self.library, self.used = library, used

    def infotext(self) -> dict:
        return ti_hashes(self.library, self.used)


def ti_hashes(library: Library | None, used: list[Embedding]) -> dict:
    """A1111's infotext entry `TI hashes: "name: <12 hex>, ..."` for the embeddings a prompt used."""
    if not used or library is None:
        return {}
    names = dict.fromkeys((e.name, e.entry) for e in used)
    return {"TI hashes": ", ".join(f"{name}: {library.short_hash(entry)}" for name, entry in names)}
