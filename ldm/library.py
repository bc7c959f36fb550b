"""A models folder laid out like AUTOMATIC1111's (or ComfyUI's): what is in it, by kind, name, size and hash.

    models/
      Stable-diffusion/  (ComfyUI: checkpoints/)      checkpoints: .safetensors files or diffusers folders
      Lora/              (loras/; also LyCORIS/)       LoRAs: .safetensors
      VAE/               (vae/)                        VAEs
      embeddings/                                      textual-inversion embeddings
      ControlNet/        (controlnet/)                 ControlNets
      ESRGAN/            (upscale_models/)             image upscalers

Subfolders are allowed. Only `.safetensors` files and diffusers folders are listed; pickles (.ckpt, .pt,
.pth, .bin) are reported in `Library.refused` with the reason and never opened. Names are paths relative
to the kind's folder without the suffix ("sub/name"); a unique file stem ("name") finds the file too.

Hashes follow A1111: checkpoints and VAEs "Model hash"/"VAE hash" = the first 10 hex digits of the file's
SHA-256; LoRAs = the first 12 of the kohya "addnet" hash (SHA-256 of the tensor data after the header);
embeddings = the first 12 of the file's SHA-256. They are computed only when asked for and cached in
`<models dir>/ldm-hashes.json` (keyed by path, size and modification time), so listing never hashes.
ControlNets are the exception, as in A1111's ControlNet extension ("name [hash]" in its model list and
infotext): A1111's old 8-hex model hash (`legacy_hash`), which reads only 64 KiB and is not cached.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# kind -> its folder names: A1111's first (created when the models folder is new), then ComfyUI's and others.
FOLDERS = {
    "checkpoints": ("Stable-diffusion", "checkpoints"),
    "loras": ("Lora", "loras", "LyCORIS"),
    "vaes": ("VAE", "vae"),
    "embeddings": ("embeddings",),
    "controlnets": ("ControlNet", "controlnet"),
    "upscalers": ("ESRGAN", "upscale_models"),
}
KINDS = tuple(FOLDERS)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SHORT_HASH = {"checkpoints": 10, "vaes": 10, "controlnets": 8, "upscalers": 10, "loras": 12, "embeddings": 12}
CACHE_FILE = "ldm-hashes.json"
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # A1111's "name.safetensors [abcdef0123]"


class UnknownModelName(ValueError):
    """A name that is not in the models folder; the message lists close names."""


@dataclass(frozen=True)
class Entry:
    kind: str  # one of KINDS
    name: str  # relative to the kind's folder, without the suffix, "/" separated
    path: Path  # the .safetensors file or the diffusers folder
    size: int  # bytes (a folder: its files' total)

    @property
    def stem(self) -> str:
        return self.name.rpartition("/")[2]

    @property
    def filename(self) -> str:
        """The name with its suffix, as A1111's checkpoint titles show it."""
        return self.name + self.path.suffix if self.path.is_file() else self.name


class Library:
    """The models folder `root`. Created with the A1111 layout (and a log line) when it does not exist.
    Listing rescans the folders each time (cheap); hashes are computed on demand and cached on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            for kind in KINDS:
                (self.root / FOLDERS[kind][0]).mkdir(parents=True, exist_ok=True)
            log.warning("models folder %s did not exist: created it with the layout %s", self.root,
                        ", ".join(f[0] + "/" for f in FOLDERS.values()))
        elif not self.root.is_dir():
            raise NotADirectoryError(f"models folder {self.root} is not a folder")
        self._lock = threading.Lock()
        self._hashes: dict | None = None
        self._hashing: dict[str, threading.Lock] = {}  # cache key -> held while that entry is hashed

    def __repr__(self) -> str:
        return f"Library({str(self.root)!r})"

    # ---- listing ---------------------------------------------------------------------------------

    def folders(self, kind: str) -> list[Path]:
        """The existing folders holding `kind` (A1111's and ComfyUI's names may both exist)."""
        _check_kind(kind)
        seen, out = set(), []
        for name in FOLDERS[kind]:
            folder = self.root / name
            if folder.is_dir() and folder.resolve() not in seen:  # case-insensitive filesystems: VAE == vae
                seen.add(folder.resolve())
                out.append(folder)
        return out

    def list(self, kind: str) -> list[Entry]:
        """Every usable entry of `kind`, sorted by name."""
        return self._scan(kind)[0]

    def refused(self, kind: str) -> list[tuple[Path, str]]:
        """Files of `kind` that are not listed, each with the reason (pickles)."""
        return self._scan(kind)[1]

    checkpoints = property(lambda self: self.list("checkpoints"))
    loras = property(lambda self: self.list("loras"))
    vaes = property(lambda self: self.list("vaes"))
    embeddings = property(lambda self: self.list("embeddings"))
    controlnets = property(lambda self: self.list("controlnets"))
    upscalers = property(lambda self: self.list("upscalers"))

    def _scan(self, kind: str) -> tuple[list[Entry], list[tuple[Path, str]]]:
        entries: dict[str, Entry] = {}
        refused = []
        for folder in self.folders(kind):
            for path in _walk(folder):
                rel = path.relative_to(folder).with_suffix("").as_posix() if path.is_file() else path.relative_to(folder).as_posix()
                if path.is_dir():
                    entries.setdefault(rel, Entry(kind, rel, path, _folder_size(path)))
                elif path.suffix.lower() == ".safetensors":
                    entries.setdefault(rel, Entry(kind, rel, path, path.stat().st_size))
                elif path.suffix.lower() in PICKLE_SUFFIXES:
                    refused.append((path, f"{path.suffix} is a pickle format, which can run code when loaded: "
                                          "convert it to .safetensors"))
        return sorted(entries.values(), key=lambda e: e.name.lower()), refused

    def find(self, kind: str, name: str | os.PathLike) -> Entry:
        """The entry called `name`: "sub/name", "name" (a unique stem), with or without ".safetensors",
        or A1111's title "name.safetensors [hash]". Unknown names raise UnknownModelName listing close ones."""
        text = _TITLE_HASH.sub("", str(name)).strip().replace("\\", "/")
        text = text[: -len(".safetensors")] if text.lower().endswith(".safetensors") else text
        entries = self.list(kind)
        for e in entries:
            if e.name == text:
                return e
        by_stem = [e for e in entries if e.stem == text] or [e for e in entries if e.name.lower() == text.lower()]
        if len(by_stem) == 1:
            return by_stem[0]
        if len(by_stem) > 1:
            raise UnknownModelName(f"{_singular(kind)} name {text!r} is ambiguous in {self.root}: "
                                   f"{', '.join(e.name for e in by_stem)}; give the subfolder")
        names = [e.name for e in entries]
        close = difflib.get_close_matches(text, names, n=5, cutoff=0.5) or difflib.get_close_matches(
            text, [e.stem for e in entries], n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else (
            f"; available: {', '.join(names[:10])}" if names else f"; the folder is empty")
        where = " or ".join(str(f) for f in self.folders(kind)) or str(self.root / FOLDERS[kind][0])
        refused = [p for p, _ in self.refused(kind) if p.stem == text.rpartition("/")[2]]
        if refused:
            hint = f": {refused[0].name} is a pickle and is not loaded (convert it to .safetensors)"
        raise UnknownModelName(f"no {_singular(kind)} called {text!r} in {where}{hint}")

    # ---- hashes ----------------------------------------------------------------------------------

    def entry_at(self, kind: str, path: str | os.PathLike) -> Entry | None:
        """The entry of `kind` whose file or folder is `path`, if the folder has it."""
        target = Path(path).resolve()
        return next((e for e in self.list(kind) if e.path.resolve() == target), None)

    def sha256(self, entry: Entry) -> str:
        """The full hex SHA-256 A1111 uses for this entry (the addnet hash for LoRAs), cached on disk.
        Two threads asking for the same entry read it once: the second waits for the first's result."""
        method, key, files, stamp = self._stamp(entry)
        with self._lock:
            hashing = self._hashing.setdefault(key, threading.Lock())
        with hashing:
            return self._sha256(method, key, files, stamp)

    def _sha256(self, method: str, key: str, files: list[Path], stamp: list) -> str:
        with self._lock:
            cached = self._cache().get(key)
        if cached and cached.get("files") == stamp:
            return cached["sha256"]
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                if method == "addnet":
                    fh.seek(8 + int.from_bytes(fh.read(8), "little"))
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        value = digest.hexdigest()
        with self._lock:
            self._cache()[key] = {"files": stamp, "sha256": value}
            self._save_cache()
        return value

    def short_hash(self, entry: Entry) -> str:
        """A1111's short hash: 10 hex digits for checkpoints and VAEs, 12 for LoRAs and embeddings, the old
        8-hex model hash for ControlNets (`legacy_hash`)."""
        if entry.kind == "controlnets":
            return legacy_hash(entry.path)
        return self.sha256(entry)[: SHORT_HASH[entry.kind]]

    def cached_short_hash(self, entry: Entry) -> str | None:
        """The short hash if it is already known, else None: never reads the whole file (for listings)."""
        if entry.kind == "controlnets":
            return legacy_hash(entry.path)
        _, key, _, stamp = self._stamp(entry)
        with self._lock:
            cached = self._cache().get(key)
        if not cached or cached.get("files") != stamp:
            return None
        return cached["sha256"][: SHORT_HASH[entry.kind]]

    def listing(self, *, hashes: bool = False) -> dict[str, list[dict]]:
        """{kind: [{"name", "filename", "path", "size", "hash"}]} for every kind; "hash" is the short hash
        when cached (or computed, with hashes=True), else None."""
        out = {}
        for kind in KINDS:
            out[kind] = [{"name": e.name, "filename": e.filename, "path": str(e.path), "size": e.size,
                          "hash": self.short_hash(e) if hashes else self.cached_short_hash(e)} for e in self.list(kind)]
        return out

    def _stamp(self, entry: Entry):
        """(method, cache key, files hashed, [[file, size, mtime]]): a cached hash is valid while the stamp is."""
        method = "addnet" if entry.kind == "loras" and entry.path.is_file() else "sha256"
        files = _hashed_files(entry)
        stamp = [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
        return method, f"{method}:{entry.path.resolve()}", files, stamp

    def _cache(self) -> dict:
        if self._hashes is None:
            try:
                data = json.loads((self.root / CACHE_FILE).read_text())
                self._hashes = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._hashes = {}
        return self._hashes

    def _save_cache(self) -> None:
        tmp = self.root / f".{CACHE_FILE}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(self._hashes, indent=1, sort_keys=True))
            os.replace(tmp, self.root / CACHE_FILE)
        except OSError as exc:  # a read-only models folder still works, just without the cache
            log.warning("could not write the hash cache %s: %s", self.root / CACHE_FILE, exc)


def legacy_hash(path: Path) -> str:
    """A1111's old model hash, which its ControlNet extension shows ("name [hash]"): the first 8 hex digits of
    the SHA-256 of the 64 KiB at offset 1 MiB of the weights file (a folder: its first .safetensors file);
    "" for a folder without one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if not found:
            return ""
        path = found[0]
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def _check_kind(kind: str) -> None:
    if kind not in FOLDERS:
        raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")


def _singular(kind: str) -> str:
    return {"loras": "LoRA", "vaes": "VAE", "embeddings": "embedding"}.get(kind, kind[:-1])


def _is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder (model_index.json) or a single diffusers model (config.json + weights)."""
    return (path / "model_index.json").is_file() or (
        (path / "config.json").is_file() and any(path.glob("*.safetensors")))


def _walk(folder: Path):
    """Files and diffusers folders under `folder`, not descending into a diffusers folder; hidden names skipped."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if _is_diffusers_folder(path):
                yield path
            else:
                yield from _walk(path)
        elif path.is_file():
            yield path


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _hashed_files(entry: Entry) -> list[Path]:
    """What the hash covers: the file; for a diffusers pipeline folder its U-Net weights (as `Model.model_hash`),
    for a single diffusers model folder its weights."""
    if entry.path.is_file():
        return [entry.path]
    unet = entry.path / "unet"
    return sorted((unet if unet.is_dir() else entry.path).glob("*.safetensors"))
