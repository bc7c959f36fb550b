"""Where generated images go: numbered, prompt-named files (PNG, or JPEG/WebP) that carry their
infotext; with several users, each user's images in a folder of their own (`user_dir`)."""
from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from pathlib import Path

from PIL import Image

from ldm import metadata

from .tempfiles import owned_temp_dir


SAVE_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # --save-format -> suffix (infotext: ldm.metadata)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what the history lists


class Saver:
    """Writes images with infotext as `outputs/<task>/00012-<seed>-<slug>.png` (`.jpg`/`.webp` with
    `save_format`); with `per_user`, as `outputs/<user_dir(user)>/<task>/...`.

    If the outputs folder is unwritable the image goes to a temp folder instead (the caller warns),
    so the user always gets a PNG that carries its parameters.
    """

    def __init__(self, folder: Path | None, temp_max_age: float = 0, *, per_user: bool = False,
                 save_format: str = "png") -> None:
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"save format must be one of: {', '.join(SAVE_FORMATS)}; got {save_format!r}")
        self.folder = Path(folder) if folder is not None else None
        self.per_user = per_user
        self.suffix = SAVE_FORMATS[save_format]
        self._temp = owned_temp_dir(self, "ldm-ui-")  # removed when the Saver goes or the process exits
        self._lock = threading.Lock()
        self._next: dict[Path, int] = {}
        self.temp_max_age = temp_max_age  # temp PNGs older than this are deleted (0 = kept)
        self._pruned = time.monotonic()

    def root(self, user: str | None) -> Path | None:
        """The folder whose images `user` may see: theirs with per-user outputs, else the whole outputs
        folder; None when nothing is saved (or per-user outputs and no user)."""
        if self.folder is None or not self.per_user:
            return self.folder
        return self.folder / user_dir(user) if user else None

    def save(self, image: Image.Image, infotext: str | None, *, seed: int | None, prompt: str, task: str,
             extra: dict[str, str] | None = None, user: str | None = None) -> tuple[str | Image.Image, str | None]:
        """-> (file path or, if even the temp write failed, the image itself; warning or None).
        `extra`: more PNG text chunks (A1111's `postprocessing`; PNG only). `user`: the logged-in user."""
        warning = None
        root = self.root(user) or (self.folder / "_nobody" if self.folder is not None else None)
        if root is not None:
            try:
                return str(self._write(root / task, image, infotext, seed, prompt, extra, self.suffix)), None
            except OSError as exc:
                warning = f"could not save to {root / task}: {exc.strerror or exc}; the image is only in this page"
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
               extra: dict[str, str] | None = None, suffix: str = ".png") -> Path:
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            number = self._next.get(folder)
            if number is None:
                number = next_file_number(folder)
            path = folder / safe_filename(number, seed, prompt, suffix)
            while path.exists():  # another process writes here too
                number += 1
                path = folder / safe_filename(number, seed, prompt, suffix)
            try:
                if suffix != ".png":  # infotext in the EXIF UserComment, as A1111
                    metadata.save_image(image, path, infotext or "", quality=95)
                elif infotext or extra:
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


def safe_filename(number: int, seed: int | None, prompt: str, suffix: str = ".png") -> str:
    parts = [f"{number:05d}"] + ([str(seed)] if seed is not None else []) + [slug(prompt)]
    return "-".join(parts) + suffix


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def user_dir(user: str) -> str:
    """A user's folder name: the name itself when it is plain (letters, digits, `_`, `-`), else a
    slug, a dot (never in a plain name) and a hash of the name, so no two users share a folder and
    no name is a path. Folders starting with `_` are nobody's."""
    if _PLAIN_NAME.fullmatch(user):
        return user
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug(user, 40)}.{digest}"


def next_file_number(folder: Path) -> int:
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1
