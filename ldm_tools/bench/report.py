"""Summaries and the markdown written to runs/bench/ and docs/performance.md."""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from .runners import Sample

GB = 1024**3


def summary(samples: list[Sample]) -> dict[str, float]:
    e2e = [s.seconds for s in samples]
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    befores = [s.rss_before for s in samples if s.rss_before is not None]
    return {
        "runs": len(samples),
        "e2e_min": min(e2e),
        "e2e_median": statistics.median(e2e),
        "cpu_min": min(s.cpu_seconds for s in samples),
        "step_median": statistics.median(s.per_step for s in samples),
        "decode_median": statistics.median(s.decode_seconds for s in samples),
        "peak_gb": max(peaks) / GB if peaks else float("nan"),
        "peak_over_start_gb": max(p - b for p, b in zip(peaks, befores)) / GB if peaks and befores else float("nan"),
    }


def image_diff(a: Image.Image, b: Image.Image) -> dict[str, float]:
    """Max and mean absolute difference (0-255) and PSNR in dB."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    d = np.abs(x - y)
    mse = float((d**2).mean())
    return {"max": float(d.max()), "mean": float(d.mean()), "psnr": math.inf if mse == 0 else 10 * math.log10(255**2 / mse)}


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(rows: dict, a: str, b: str) -> tuple[float, float, float]:
    """a / b of end-to-end wall time by median and by best run, and of the best process CPU time."""
    return (rows[a]["e2e_median"] / rows[b]["e2e_median"], rows[a]["e2e_min"] / rows[b]["e2e_min"],
            rows[a]["cpu_min"] / rows[b]["cpu_min"])


def markdown(title: str, conditions: dict[str, str], rows: dict[str, dict], ratios: list[tuple[str, tuple, str]],
             flops: list[tuple[str, float, float, float]], diffs: list[tuple[str, dict]]) -> str:
    out = [f"**{title}**", ""]
    out += [f"- {k}: {v}" for k, v in conditions.items()]
    out += ["", "| configuration | runs | end-to-end s (min) | end-to-end s (median) | CPU s (min) | loop s/step (median) | VAE decode s (median) | peak RSS GB (process) | peak over start GB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['runs']} | {_f(r['e2e_min'])} | {_f(r['e2e_median'])} | {_f(r.get('cpu_min'))} | {_f(r['step_median'], 3)} | "
                   f"{_f(r['decode_median'])} | {_f(r['peak_gb'])} | {_f(r['peak_over_start_gb'])} |")
    if ratios:
        out += ["", "| comparison | median | best of runs | best CPU time | target |", "|---|---|---|---|---|"]
        out += [f"| {name} | {' | '.join(_f(x, 3) for x in v)} | {target} |" for name, v, target in ratios]
    if flops:
        out += ["", "| U-Net step (guided batch of 2) | GFLOP per step | achieved GFLOP/s | matmul peak GFLOP/s | share of peak |",
                "|---|---|---|---|---|"]
        out += [f"| {name} | {_f(f / 1e9, 0)} | {_f(a / 1e9, 1)} | {_f(p / 1e9, 1)} | {_f(100 * a / p, 0)}% |" for name, f, a, p in flops]
    if diffs:
        out += ["", "| image difference (same seed, 0-255) | max | mean | PSNR dB |", "|---|---|---|---|"]
        out += [f"| {name} | {_f(d['max'], 0)} | {_f(d['mean'])} | {_f(d['psnr'], 1)} |" for name, d in diffs]
    return "\n".join(out) + "\n"


def update_docs(doc: Path, key: str, text: str) -> None:
    """Replace the block between <!-- bench:key --> markers (appended if missing); the prose around it is hand-written."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{text}{end}"
    current = doc.read_text() if doc.exists() else "# Performance\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _m: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new)
