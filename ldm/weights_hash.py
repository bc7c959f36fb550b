"""A1111's "Model hash" of loaded weights: computed once per loaded weights and shared by every
`Model` made from them (`Pipeline.with_vae`, `with_options`), ahead of need on a daemon thread
(`start`), so a multi-GB checkpoint is hashed while the first request runs, not before it.

A caller that needs the hash while it is being computed waits for that computation (one read of the
file, never two); one that needs it first computes it itself. The computation (`hasher`) holds only the
weights' path and the models folder, never the model: a checkpoint switch frees the old pipeline while
its file is still being read.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .library import Library

log = logging.getLogger(__name__)

BLOCK = 1 << 24  # bytes read at a time


def weights_files(path: Path) -> list[Path]:
    """What the hash covers: a single file; for a diffusers folder its U-Net weights (as A1111 has no
    hash for folders, the U-Net is what tells two folders apart)."""
    return [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors"))


def short_hash(files: list[Path], digits: int = 10) -> str:
    """The first `digits` hex digits of the SHA-256 of `files`, read in order."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(BLOCK), b""):
                h.update(block)
    return h.hexdigest()[:digits]


def hasher(path: Path, library: Library | None) -> Callable[[], str]:
    """The computation of the hash of the weights at `path`: through the models folder's hash cache
    (ldm-hashes.json) when `library` has them, else by reading them."""
    def compute() -> str:
        entry = library.entry_at("checkpoints", path) if library is not None else None
        return library.short_hash(entry) if entry is not None else short_hash(weights_files(path))

    return compute


class WeightsHash:
    """The hash of one set of loaded weights: `value(compute)` computes it once (later callers wait for
    the first); `start(compute)` does that on a daemon thread now."""

    def __init__(self) -> None:
        self._value: str | None = None
        self._computing = threading.Lock()  # held while the hash is computed
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def known(self) -> str | None:
        """The hash if it is computed, else None (never waits)."""
        return self._value

    def value(self, compute: Callable[[], str]) -> str:
        if self._value is not None:
            return self._value
        with self._computing:
            if self._value is None:
                self._value = compute()
            return self._value

    def start(self, compute: Callable[[], str]) -> None:
        with self._starting:
            if self._value is not None or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, args=(compute,), daemon=True, name="ldm-model-hash")
            self._thread.start()

    def _run(self, compute: Callable[[], str]) -> None:
        try:
            self.value(compute)
        except OSError as exc:  # the file went away: the first infotext that needs the hash will say so
            log.warning("could not hash the model's weights: %s", exc)
            with self._starting:
                self._thread = None
