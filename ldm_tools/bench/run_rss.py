"""Peak RSS of loading and of one generation, ours vs diffusers, each in a fresh process, same settings.

Per process: the load's peak and the RSS after it; then one txt2img run, its peak split into phases
(prompt + first step, later steps, VAE decode + image conversion) by resetting the peak (VmHWM) at each
step callback; and at the end the file-backed part of the RSS (weights diffusers leaves mapped count
there, only for the pages its run touched) and the private part.
"""
from __future__ import annotations

import time
from pathlib import Path

from .measure import side_in_fresh_process, status_kb

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


def _status() -> dict[str, int]:
    return {key: status_kb(key) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_side(side: str, folder: Path, size: int, steps: int) -> dict:
    import torch

    t = time.perf_counter()
    if side == "ours":
        import ldm

        pipe = ldm.load(folder, device="cpu", dtype="float32")
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    load = {"load_seconds": time.perf_counter() - t, "load_peak": _status()["VmHWM"], "after_load": _status()["VmRSS"]}
    peaks: list[int] = []

    def tick() -> None:
        peaks.append(_status()["VmHWM"])
        _reset_peak()

    _reset_peak()
    t = time.perf_counter()
    if side == "ours":
        pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, steps=steps, sampler="DDIM", seed=1,
                     callback=lambda *a: tick())
    else:
        def on_step_end(_pipe, i, timestep, kwargs):
            tick()
            return kwargs

        pipe(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step_end)
    seconds = time.perf_counter() - t
    end = _status()
    return {"side": side, **load, "run_seconds": seconds, "first_step_peak": peaks[0], "later_steps_peak": max(peaks[1:], default=0),
            "decode_peak": end["VmHWM"], "run_peak": max(*peaks, end["VmHWM"]), "after_run": end["VmRSS"],
            "anon_after_run": end["RssAnon"], "file_after_run": end["RssFile"], "threads": torch.get_num_threads()}


def run_side(side: str, folder: Path, size: int, steps: int, threads: int | None = None) -> dict:
    return side_in_fresh_process("run_rss", side, folder, size, steps, threads)


def report(results: list[dict], settings: str) -> str:
    gib = 1024**3
    cols = ("load_peak", "after_load", "first_step_peak", "later_steps_peak", "decode_peak", "after_run", "anon_after_run",
            "file_after_run")
    rows = ["| process | load s | " + " | ".join(c.replace("_", " ") + " GiB" for c in cols) + " | run s |",
            "|---|---|" + "---|" * len(cols) + "---|"]
    for r in results:
        rows.append(f"| {r['side']} | {r['load_seconds']:.0f} | " + " | ".join(f"{r[c] / gib:.2f}" for c in cols)
                    + f" | {r['run_seconds']:.0f} |")
    peak = {s: max(r["run_peak"] for r in results if r["side"] == s) for s in ("ours", "diffusers")}
    load = {s: max(r["load_peak"] for r in results if r["side"] == s) for s in ("ours", "diffusers")}
    return (f"**Peak RSS of one generation, ours vs diffusers, fresh processes** ({settings})\n\n" + "\n".join(rows) + "\n\n"
            f"- run peak: ours {peak['ours'] / gib:.2f} GiB, diffusers {peak['diffusers'] / gib:.2f} GiB: ours / diffusers "
            f"**{peak['ours'] / peak['diffusers']:.3f}** (target <= 1)\n"
            f"- load peak: ours {load['ours'] / gib:.2f} GiB, diffusers {load['diffusers'] / gib:.2f} GiB (diffusers leaves "
            "the weights mapped: they enter its RSS during the run)\n")
