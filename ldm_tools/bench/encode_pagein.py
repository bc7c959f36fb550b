"""What leaving the VAE's encoder mapped (ldm.accel.read_on_demand) costs the first img2img after loading.

Each variant in a fresh process: `ldm.load`, then read every encoder weight once (the page-in alone: page faults on
the mapped file, or a plain memory read of a private copy), then two 512 px VAE encodes (the first one of a process
also pays one-time allocations). Variants:
- private: the encoder copied into RAM as well (how `ldm.load` kept it before);
- mapped: as `ldm.load` leaves it, the file in the page cache (just loaded, or read recently);
- mapped-cold: the VAE file's cached pages dropped first (posix_fadvise DONTNEED), as after an idle page-out:
  the page-in reads the disk.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from .measure import side_in_fresh_process, status_kb

VARIANTS = ("private", "mapped", "mapped-cold")


def measure_side(variant: str, folder: Path, size: int, _steps: int = 0) -> dict:
    import torch

    import ldm
    from ldm.latents import encode
    from ldm.resident import file_mappings, keep_resident

    pipe = ldm.load(folder, device="cpu", dtype="float32")
    encoder = [t for part in (pipe.vae.encoder, pipe.vae.quant_conv) for t in (*part.parameters(), *part.buffers())]
    if variant == "private":
        keep_resident([pipe.vae])
    elif variant == "mapped-cold":
        for path in {m.path for m in file_mappings() if m.path.startswith(str(folder / "vae"))}:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # only pages no process has faulted in go
            os.close(fd)
    maps = file_mappings()
    mapped = sum(t.nbytes for t in encoder if any(m.holds(t.data_ptr()) for m in maps))
    out = {"side": variant, "encoder_bytes": sum(t.nbytes for t in encoder), "mapped_bytes": mapped}
    torch.ones(1 << 20).sum()  # torch's one-time start-up of the op, not part of the page-in
    before, file_kb, t = resource.getrusage(resource.RUSAGE_SELF), status_kb("RssFile"), time.perf_counter()
    with torch.inference_mode():
        for w in encoder:
            w.sum()  # reads every page of the tensor
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.update(pagein_seconds=time.perf_counter() - t, minor_faults=after.ru_minflt - before.ru_minflt,
               major_faults=after.ru_majflt - before.ru_majflt, file_rss_growth=(status_kb("RssFile") - file_kb) * 1024)
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        for key in ("first_encode_seconds", "second_encode_seconds"):
            t = time.perf_counter()
            encode(pipe.vae, pixels, [torch.Generator().manual_seed(1)])
            out[key] = time.perf_counter() - t
    out["threads"] = torch.get_num_threads()
    return out


def run_side(variant: str, folder: Path, size: int, threads: int | None = None) -> dict:
    return side_in_fresh_process("encode_pagein", variant, folder, size, 0, threads)


def report(results: list[dict], settings: str) -> str:
    mb = 2**20
    rows = ["| process | encoder MB (mapped) | page-in s | minor / major faults | file RSS growth MB | 1st encode s | 2nd encode s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['side']} | {r['encoder_bytes'] / mb:.0f} ({r['mapped_bytes'] / mb:.0f}) | {r['pagein_seconds']:.3f} | "
                    f"{r['minor_faults']} / {r['major_faults']} | {r['file_rss_growth'] / mb:.0f} | {r['first_encode_seconds']:.1f} | "
                    f"{r['second_encode_seconds']:.1f} |")
    best = {v: min(r["pagein_seconds"] for r in results if r["side"] == v) for v in VARIANTS if any(r["side"] == v for r in results)}
    return (f"**First img2img after loading: reading the VAE encoder's weights** ({settings})\n\n" + "\n".join(rows) + "\n\n"
            "- best page-in: " + ", ".join(f"{v} {s:.3f} s" for v, s in best.items()) + "\n")
