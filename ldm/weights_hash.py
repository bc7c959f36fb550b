"""A1111's "Model hash" of loaded weights: computed once per loaded weights and shared by every
`Model` made from them (`Pipeline.with_vae`, `with_options`), ahead of need on a daemon thread
(`start`), so a multi-GB checkpoint is hashed while the first request runs, not before it.

A caller that needs the hash while it is being computed waits for that computation (one read of the
file, never two); one that needs it first computes it itself.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

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
        except OSError:  # the file went away: the first infotext that needs the hash will say so
            with self._starting:
                self._thread = None
