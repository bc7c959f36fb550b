"""Weights kept in private memory: CPU tensors that diffusers leaves as views of memory-mapped
`.safetensors` files are read again from the file, straight into private buffers.

Why: those views are clean page-cache pages, so after a pause under memory pressure the kernel drops
them and the next request reads the weights from disk again (and every first request takes millions
of page faults). Private copies stay in RAM (there is no swap on typical servers).

How, and what it costs: each tensor's bytes are read with pread(2) from the file offset its mapping
says (/proc/self/maps), never through the mapping itself. The mapped pages are therefore never faulted
in, so the load peak is the private weights plus one tensor, not the weights twice (copying through
the mapping counts every file page in the process's RSS until the last tensor of that file is copied).
Vocabulary-sized embedding tables stay mapped (`sparse_tables`), and so do the parts the caller names
(`leave_mapped`: ldm.accel.read_on_demand says which, and why).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps that maps a weight file."""

    lo: int
    hi: int
    offset: int  # file offset of address `lo`
    path: str
    modified: bool  # pages written since mapping (or unknown): copy through memory instead of the file
    device: tuple[int, int]  # (major, minor) and inode of the mapped file, to check the path still names it
    inode: int

    def holds(self, ptr: int) -> bool:
        return self.lo <= ptr < self.hi


def file_mappings(smaps: str | None = None, suffix: str = ".safetensors") -> list[Mapping]:
    """The mappings of weight files in this process, from /proc/self/smaps (or the same text given, which
    may also be /proc/self/maps'; none where /proc is missing)."""
    if smaps is None:
        try:
            with open("/proc/self/smaps") as f:
                smaps = f.read()
        except OSError:
            return []
    out: list[Mapping] = []
    current = None  # (fields of a weight file's header line) while its "Name: value" lines follow
    for line in smaps.splitlines():
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
            if current:
                out.append(_mapping(*current))
            current = (parts, None) if len(parts) == 6 and parts[5].strip().endswith(suffix) else None
        elif current and parts[:1] == ["Anonymous:"]:
            current = (current[0], int(parts[1]))
    if current:
        out.append(_mapping(*current))
    return out


def _mapping(parts: list[str], anonymous_kb: int | None) -> Mapping:
    lo, hi = (int(x, 16) for x in parts[0].split("-"))
    major, minor = (int(x, 16) for x in parts[3].split(":"))
    # safetensors maps files read-write private; while no page was written (Anonymous: 0) it equals the file
    modified = "w" in parts[1] and anonymous_kb != 0
    return Mapping(lo, hi, int(parts[2], 16), parts[5].strip(), modified, (major, minor), int(parts[4]))


def mapped_file_ranges(maps: str | None = None, suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process mapping weight files (/proc/self/maps; none elsewhere)."""
    return [(m.lo, m.hi) for m in file_mappings(maps, suffix)]


def _read_tensor(t: torch.Tensor, fd: int, offset: int) -> torch.Tensor:
    """A private tensor like `t` (contiguous) with the `t.nbytes` bytes at `offset` of the open file."""
    raw = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n
    return raw.view(t.dtype).view(t.shape)


SPARSE_ROWS = 1024  # embedding tables at least this long (vocabularies) are read a few rows at a time


def sparse_tables(module: torch.nn.Module) -> set[int]:
    """ids of the weights of `module`'s vocabulary-sized embedding tables. A prompt reads a few dozen of their
    rows (CLIP's token embedding: 49408 rows, 0.15-0.25 GB in fp32), so they stay mapped: the rows a request
    needs cost a page fault each, while a private copy would add the whole table to the process's memory."""
    return {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= SPARSE_ROWS}


def keep_resident(modules: Iterable, maps: list[Mapping] | None = None, *,
                  leave_mapped: Iterable[torch.nn.Module] = ()) -> int:
    """Replace every CPU parameter and buffer of `modules` that lies in a mapped weight file by a private
    copy with the same values, except `sparse_tables` and the tensors of the `leave_mapped` submodules;
    returns the bytes copied. Tensors elsewhere are left alone."""
    maps = file_mappings() if maps is None else maps
    if not maps:
        return 0
    kept = {id(t) for part in leave_mapped for t in (*part.parameters(), *part.buffers())}
    copied, files = 0, {}
    try:
        for module in modules:
            if module is None:
                continue
            skip = kept | sparse_tables(module)
            for t in (*module.parameters(), *module.buffers()):
                ptr = t.data_ptr()
                m = next((m for m in maps if m.holds(ptr)), None) if t.device.type == "cpu" else None
                if m is None or t.numel() == 0 or id(t) in skip:
                    continue
                fd = None if m.modified or not t.is_contiguous() else _open(m, files)
                # through the mapping only when the file cannot be read (replaced, deleted, no preadv)
                t.data = t.data.clone() if fd is None else _read_tensor(t.data, fd, m.offset + ptr - m.lo)
                copied += t.numel() * t.element_size()
    finally:
        for fd in files.values():
            if fd is not None:
                os.close(fd)
    return copied


def _open(m: Mapping, files: dict) -> int | None:
    """A descriptor of the mapped file (cached in `files`), or None if its path now names another file."""
    if m.path not in files:
        files[m.path] = None
        if hasattr(os, "preadv"):
            try:
                fd = os.open(m.path, os.O_RDONLY)
            except OSError:
                return None
            st = os.fstat(fd)
            if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (*m.device, m.inode):
                files[m.path] = fd
            else:
                os.close(fd)
    return files[m.path]
