"""Where generated images go: numbered, prompt-named PNGs that carry their infotext."""
from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

from PIL import Image

from ldm import metadata

from .tempfiles import owned_temp_dir


class Saver:
    """Writes PNGs with infotext as `outputs/<task>/00012-<seed>-<slug>.png`.

    If the outputs folder is unwritable the image goes to a temp folder instead (the caller warns),
    so the user always gets a PNG that carries its parameters.
    """

    def __init__(self, folder: Path | None, temp_max_age: float = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._temp = owned_temp_dir(self, "ldm-ui-")  # removed when the Saver goes or the process exits
        self._lock = threading.Lock()
        self._next: dict[Path, int] = {}
        self.temp_max_age = temp_max_age  # temp PNGs older than this are deleted (0 = kept)
        self._pruned = time.monotonic()

    def save(self, image: Image.Image, infotext: str | None, *, seed: int | None, prompt: str, task: str,
             extra: dict[str, str] | None = None) -> tuple[str | Image.Image, str | None]:
        """-> (file path or, if even the temp write failed, the image itself; warning or None).
        `extra`: more PNG text chunks (A1111's `postprocessing`)."""
        warning = None
        if self.folder is not None:
            try:
                return str(self._write(self.folder / task, image, infotext, seed, prompt, extra)), None
            except OSError as exc:
                warning = f"could not save to {self.folder / task}: {exc.strerror or exc}; the image is only in this page"
        self._prune_temp()
        try:
            return str(self._write(self._temp, image, infotext, seed, prompt, extra)), warning
        except OSError as exc:
            return image, warning or f"could not write a temporary PNG: {exc}"

    def _prune_temp(self) -> None:
        """--no-save and unwritable outputs put every image in the temp folder: keep it bounded."""
        if not self.temp_max_age or time.monotonic() - self._pruned < min(self.temp_max_age / 2, 600):
            return
        self._pruned = time.monotonic()
        cutoff = time.time() - self.temp_max_age
        for path in self._temp.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    def _write(self, folder: Path, image: Image.Image, infotext: str | None, seed: int | None, prompt: str,
               extra: dict[str, str] | None = None) -> Path:
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            number = self._next.get(folder)
            if number is None:
                number = next_file_number(folder)
            path = folder / safe_filename(number, seed, prompt)
            while path.exists():  # another process writes here too
                number += 1
                path = folder / safe_filename(number, seed, prompt)
            try:
                if infotext or extra:
                    metadata.save_png(image, path, infotext or "", extra)
                else:
                    image.save(path, format="PNG")
            except OSError:
                # A full disk can leave part of a file; removed, it does not push the numbering on.
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                raise
            self._next[folder] = number + 1  # only a saved file uses up its number
            return path


# ---- file names -----------------------------------------------------------------------------

_NUMBERED = re.compile(r"^(\d{5,})-")


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe excerpt of a prompt: ASCII letters/digits joined by '-', never a path."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    out = "-".join(words)[:max_len].strip("-")
    return out or "image"


def safe_filename(number: int, seed: int | None, prompt: str) -> str:
    parts = [f"{number:05d}"] + ([str(seed)] if seed is not None else []) + [slug(prompt)]
    return "-".join(parts) + ".png"


def next_file_number(folder: Path) -> int:
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1
