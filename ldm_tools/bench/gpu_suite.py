"""`python -m ldm_tools.bench --device cuda --suite gpu`: SD-1.5 and SDXL shapes on a GPU, fp16.

For each shape (SD 1.5 at 512 px, SDXL at 1024 px, random weights) it times diffusers' pipeline in
fp16 and ours with each acceleration choice (PyTorch SDPA, xformers when it works, channels_last on
and off, torch.compile), alternating, and prints U-Net iterations per second (guided batch of 2, the
unit stable-fast reports: 61.8 it/s A100, 104.6 it/s H100 for SD 1.5 at 512 px) and end-to-end seconds.
`plan` decides which configurations run; it is unit-tested on the CPU (tests/test_bench_suites.py).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

SIZES = {"sd15": 512, "sdxl": 1024}


@dataclass(frozen=True)
class GpuConfig:
    family: str  # "sd15" or "sdxl"
    size: int
    attention: str = "sdpa"  # ldm.Options.attention
    channels_last: bool = True  # the CUDA default
    compile: bool = False

    @property
    def name(self) -> str:
        extras = [self.attention] + (["channels_last"] if self.channels_last else ["NCHW"]) + (["compile"] if self.compile else [])
        return f"ours fp16 {' + '.join(extras)}"


def plan(families: tuple[str, ...] = ("sd15", "sdxl"), *, xformers: bool, compile: bool = True) -> list[GpuConfig]:
    """The configurations to time per family: the default (SDPA, channels_last), NCHW, xformers if it works
    here, and compiled (each compiled shape is compiled once in the warm-up, not timed)."""
    unknown = set(families) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown model shape(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIZES)}")
    out = []
    for fam in families:
        size = SIZES[fam]
        out += [GpuConfig(fam, size), GpuConfig(fam, size, channels_last=False)]
        if xformers:
            out.append(GpuConfig(fam, size, attention="xformers"))
        if compile:
            out.append(GpuConfig(fam, size, compile=True))
    return out


def require_cuda(device) -> None:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs --device cuda on a machine with a CUDA GPU (torch.cuda.is_available() is False here)")


def run(args, folders: dict[str, Path], steps: int = 20, repeats: int = 3) -> str:
    """Time every planned configuration (alternating) and return the markdown table."""
    import torch

    import ldm
    from ldm.accel import xformers_works

    from .runners import Settings, diffusers_pipeline, run_diffusers, run_ours

    device = torch.device(args.device)
    require_cuda(device)
    configs = plan(tuple(folders), xformers=xformers_works(device))
    lines = [f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {steps} steps, DPM++ 2M, fp16", "",
             "| shape | configuration | U-Net it/s (median) | end-to-end s (min) | end-to-end s (median) | peak GPU GB |",
             "|---|---|---|---|---|---|"]
    for fam, folder in folders.items():
        s = Settings(width=SIZES[fam], height=SIZES[fam], steps=steps)
        runs = {}
        base = ldm.load(folder, device=device, dtype="float16")
        theirs = diffusers_pipeline(base, s)
        runs["diffusers fp16"] = lambda: run_diffusers(theirs, s)
        for c in (c for c in configs if c.family == fam):
            pipe = ldm.load(folder, device=device, dtype="float16", attention=c.attention, channels_last=c.channels_last,
                            compile=c.compile)
            runs[c.name] = lambda pipe=pipe: run_ours(pipe, s)
        for fn in runs.values():  # warm-up: kernel selection, compilation
            fn()
        samples = {n: [] for n in runs}
        for r in range(repeats):
            for n in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                samples[n].append(runs[n]())
        for n, v in samples.items():
            it_s = 1 / statistics.median(x.per_step for x in v)
            lines.append(f"| {fam} {SIZES[fam]} px | {n} | {it_s:.2f} | {min(x.seconds for x in v):.2f} | "
                         f"{statistics.median(x.seconds for x in v):.2f} | {max(x.peak_bytes for x in v) / 1024**3:.2f} |")
    return "\n".join(lines) + "\n"
