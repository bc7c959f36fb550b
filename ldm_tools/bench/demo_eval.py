"""Accuracy of the demo model (ldm_tools.eval's shapes-world classifier) with the fast preset and with
dtype="auto", against the default settings: does a speed-up cost correctness?"""
from __future__ import annotations

import time
from pathlib import Path


class _WithOptions:
    """A Pipeline whose txt2img always gets extra keywords (e.g. fast=True), for ldm_tools.eval's helpers."""

    def __init__(self, pipe, **options):
        self.pipe, self.options = pipe, options

    def txt2img(self, *args, **kwargs):
        return self.pipe.txt2img(*args, **kwargs, **self.options)


def evaluate(model: Path, seeds: int = 2, seen_limit: int = 25) -> str:
    """Held-out combinations plus an evenly spaced subset of `seen_limit` seen ones (the full set
    takes hours per variant on a busy 2-core CPU)."""
    import ldm
    from ldm.devices import cpu_has_native_bf16

    from ..eval.demo import evaluate_txt2img
    from ..train import world as W

    base = ldm.load(model, device="cpu", dtype="float32")
    variants = {"float32 (default)": base, "float32 + fast": _WithOptions(base, fast=True)}
    if cpu_has_native_bf16():
        auto = ldm.load(model, device="cpu", dtype="auto")
        variants["auto (bf16 U-Net/text)"] = auto
        variants["auto + fast"] = _WithOptions(auto, fast=True)
    seen_all = W.train_combos()
    seen = seen_all[:: max(1, len(seen_all) // seen_limit)][:seen_limit]
    rows = [f"| variant | seen ({len(seen)} of {len(seen_all)}): all correct % | held-out ({len(W.holdout_combos())}): all correct % "
            "| seen obj/shape/bg % | s per image |", "|---|---|---|---|---|"]
    for name, pipe in variants.items():
        t = time.perf_counter()
        seen_scores, per_img, _ = evaluate_txt2img(pipe, seen, seeds)
        held_scores, _, _ = evaluate_txt2img(pipe, W.holdout_combos(), seeds)
        s, h = seen_scores.pct(), held_scores.pct()
        rows.append(f"| {name} | {s['all']:.1f} | {h['all']:.1f} | {s['obj']:.0f}/{s['shape']:.0f}/{s['bg']:.0f} | {per_img:.2f} |")
        print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    return "\n".join(rows) + "\n"
