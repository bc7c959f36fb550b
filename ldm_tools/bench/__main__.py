"""`python -m ldm_tools.bench [--quick]`: ours vs diffusers on SD-1.5-shaped random weights, alternating runs.

    python -m ldm_tools.bench --quick                 # 256 px, 4 steps: a few minutes on 2 CPU cores
    python -m ldm_tools.bench --repeats 2 --docs      # 512 px, 20 steps, DPM++ 2M; writes docs/performance.md
    python -m ldm_tools.bench --vae-tiling 2048       # peak memory of a tiled 2048x2048 VAE decode
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # ldm_tools/bench/__main__.py -> repo root
SHAPES = {"full": ("sd15-random", 1.0), "half": ("sd15-half", 0.5)}  # cached folder name, channel scale


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 px, 4 steps")
    p.add_argument("--size", type=int, default=None, help="override the image side in pixels")
    p.add_argument("--steps", type=int, default=None, help="override the step count")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3 quick, 2 full)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default="full",
                   help="full: SD-1.5's channels; half: half the channels of every layer (quick; fixed costs weigh more)")
    p.add_argument("--sampler", default="DPM++ 2M", help="A1111 sampler name (the issue's quick runs use DDIM)")
    p.add_argument("--model-dir", type=Path, default=None, help="default runs/bench/sd15-<shape>")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--docs", action="store_true", help="also update the matching block of docs/performance.md")
    p.add_argument("--note", default="", help="conditions to state in the report, e.g. other jobs running")
    p.add_argument("--skip-fast", action="store_true")
    p.add_argument("--opt-in", action="store_true", help="also time token merging and the TAESD approximate decode (random TAESD weights)")
    p.add_argument("--channels-last", action="store_true", help="also time ours with channels_last U-Net weights")
    p.add_argument("--openvino", action="store_true",
                   help="also time ours with openvino=True (U-Net and VAE decoder through OpenVINO, float32; converted once into OUT/openvino)")
    p.add_argument("--goal3", action="store_true",
                   help="also time fast preset + ToMe 0.5 + approximate decode (random TAESD weights) against diffusers, without --opt-in's separate rows")
    p.add_argument("--tag", default="", help="suffix for the output files and the docs block")
    p.add_argument("--skip-same-dtype", action="store_true", help="do not time ours in diffusers' dtype (saves a slow fp32 run)")
    p.add_argument("--vae-tiling", type=int, default=None, metavar="PX", help="only measure a tiled VAE decode of PX x PX")
    p.add_argument("--tile", type=int, default=64, help="VAE tile in latent pixels for --vae-tiling")
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: SD-1.5 512 px and SDXL 1024 px shapes in fp16, SDPA/xformers/channels_last/compile vs diffusers (needs --device cuda)")
    p.add_argument("--sdxl-unet-rss", type=int, default=None, metavar="PX",
                   help="only measure peak RSS and time of one guided SDXL-shaped U-Net step at PX x PX (random weights)")
    p.add_argument("--sdxl-load-rss", choices=("float16", "bfloat16", "float32"), default=None, metavar="DTYPE",
                   help="only measure peak RSS and time of ldm.load on a real-size random SDXL single file (written, then deleted)")
    p.add_argument("--sdxl-step", type=int, default=None, metavar="PX",
                   help="only time guided SDXL U-Net steps at PX x PX, fp32: ours vs diffusers on the same single file, "
                        "alternating processes (--repeats pairs, --steps per process; needs ~12-15 GB free)")
    p.add_argument("--run-rss", action="store_true",
                   help="only measure peak RSS of loading and of one DDIM txt2img run (--size, default 512; --steps, default 2), "
                        "ours vs diffusers in fresh processes, fp32, alternating ABBA for --repeats pairs")
    p.add_argument("--encode-pagein", action="store_true",
                   help="only measure what the first img2img after loading pays to read the mapped VAE encoder (--size, "
                        "default 512): private / mapped / mapped with the file dropped from the page cache, fresh processes, --repeats rounds")
    p.add_argument("--sdxl-file", type=Path, default=None, help="for --sdxl-load-rss / --sdxl-step: an existing SDXL single file instead of a written one")
    p.add_argument("--demo", type=Path, default=None, metavar="MODEL", help="only evaluate the demo model's accuracy: default vs fast vs auto dtype")
    p.add_argument("--demo-seeds", type=int, default=2)
    p.add_argument("--demo-seen", type=int, default=25, help="seen combinations to evaluate (all held-out ones are)")
    return p


def _log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "bench.log", "a") as f:
        f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        return _demo(args)
    if args.sdxl_unet_rss:
        return _sdxl_unet_rss(args)
    if args.sdxl_load_rss:
        return _sdxl_load_rss(args)
    if args.sdxl_step:
        return _sdxl_step(args)
    if args.suite == "gpu":
        return _gpu_suite(args)
    from .models import ensure_sd15_folder

    name, width = SHAPES[args.shape]
    folder = ensure_sd15_folder(args.model_dir or ROOT / "runs" / "bench" / name, ROOT / "ldm" / "configs" / "clip-tokenizer", width=width)
    if args.vae_tiling:
        return _vae_tiling(args, folder)
    if args.run_rss:
        return _run_rss(args, folder)
    if args.encode_pagein:
        return _encode_pagein(args, folder)
    return _compare(args, folder)


def _compare(args, folder: Path) -> int:
    import torch

    from . import measure, report
    from .runners import Settings

    device = torch.device(args.device)
    size = args.size or (256 if args.quick else 512)
    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 2)
    s = Settings(width=size, height=size, steps=steps, sampler=args.sampler)
    mode = f"{'quick' if args.quick else 'full'}-{args.shape}-{size}px-{steps}steps" + (f"-{args.tag}" if args.tag else "")
    _log(args.out, f"== {mode} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {repeats} repeats, threads {torch.get_num_threads()}")
    info = measure.machine(device)
    b = _Bench.build(args, folder, s, device)
    samples = b.run(args.out, repeats)
    rows = {name: report.summary(v) for name, v in samples.items()}
    first = {n: v[0].image for n, v in samples.items()}
    for n, img in first.items():
        img.save(args.out / f"{mode}-{n.split(' (')[0].replace(' ', '_').replace('+', 'plus')}.png")
    conditions = {
        "settings": f"{size}x{size}, {steps} steps, {s.sampler}, CFG {s.guidance_scale}, batch 1, random SD-1.5-shaped weights ({args.shape} width)",
        **info,
        "load average at end": measure.load_average(),
        "run": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {repeats} alternating repeats after one warm-up run each",
    }
    if args.note:
        conditions["note"] = args.note
    ratios, flops, diffs = b.ratios(rows), b.flop_rates(rows), b.diffs(first)
    text = report.markdown(mode, conditions, rows, ratios, flops, diffs)
    (args.out / f"{mode}.md").write_text(text)
    (args.out / f"{mode}.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "flops": flops, "diffs": diffs,
                                                       "conditions": conditions}, indent=1, default=str))
    _log(args.out, text)
    if args.docs:
        report.update_docs(ROOT / "docs" / "performance.md", ("quick" if args.quick else "full") + (f"-{args.tag}" if args.tag else ""), text)
    return 0


class _Bench:
    """The configurations of one comparison: diffusers in its default dtype for the device, ours in
    that dtype (unless skipped), ours with dtype="auto" (bf16 CPUs), and the fast preset."""

    def __init__(self, s, device, ours_ref, theirs, ref_dtype: str, auto, fast: bool, same: bool):
        from .runners import run_diffusers, run_ours

        self.s, self.device, self.ours_ref, self.auto = s, device, ours_ref, auto
        self.theirs_name = f"diffusers {ref_dtype}"
        self.same = f"ours {ref_dtype}" if same else None
        self.auto_name = f"ours auto (bf16 U-Net/text, fp32 VAE, {auto.accel.attention} attention)" if auto else None
        self.default = self.auto_name or self.same or self.theirs_name  # what "ours" means for the fast preset
        self.fast_pipe = auto or ours_ref
        self.fast_name = f"ours {'auto' if auto else ref_dtype} + fast" if fast else None
        self.configs = {self.theirs_name: lambda: run_diffusers(theirs, self.s)}
        if self.same:
            self.configs[self.same] = lambda: run_ours(ours_ref, self.s)
        if auto:
            self.configs[self.auto_name] = lambda: run_ours(auto, self.s)
        if fast:
            self.configs[self.fast_name] = lambda: run_ours(self.fast_pipe, self.s, fast=True)
        # opt-in configurations: name -> (the configuration it is compared with, target)
        self.extras = {self.fast_name: (self.default, ">= 1.6")} if fast else {}

    def add(self, name: str, run, base: str, target: str) -> None:
        self.configs[name] = run
        self.extras[name] = (base, target)

    @classmethod
    def build(cls, args, folder: Path, s, device) -> "_Bench":
        import ldm
        from ldm.devices import cpu_has_native_bf16

        from .runners import diffusers_pipeline, run_ours

        ref_dtype = "float16" if device.type == "cuda" else "float32"  # diffusers' default precision per device
        ours_ref = ldm.load(folder, device=device, dtype=ref_dtype)
        theirs = diffusers_pipeline(ours_ref, s)
        auto = None
        if device.type == "cpu" and cpu_has_native_bf16():
            auto = ldm.load(folder, device=device, dtype="auto")
        b = cls(s, device, ours_ref, theirs, ref_dtype, auto, fast=not args.skip_fast, same=not args.skip_same_dtype)
        if args.channels_last:
            nhwc = ldm.load(folder, device=device, dtype=ref_dtype, channels_last=True)
            b.add(f"ours {ref_dtype} channels_last", lambda: run_ours(nhwc, b.s), b.theirs_name, ">= 1.0")
        if args.openvino:
            ov = ldm.load(folder, device=device, openvino=True, openvino_cache=str(args.out / "openvino"))
            b.add("ours + OpenVINO", lambda: run_ours(ov, b.s), b.theirs_name, ">= 1.3")
        if args.opt_in or args.goal3:
            b.add_opt_in(args, ours_ref if auto is None else auto, separate=args.opt_in)
        return b

    def add_opt_in(self, args, pipe, separate: bool = True) -> None:
        """Token merging (tomesd's default 0.5 at full resolution) and the TAESD decode, alone and with the fast preset."""
        from ldm.extensions import TokenMerging

        from .models import taesd_decoder_file
        from .runners import run_ours

        approx = pipe.with_approx_decode(taesd_decoder_file(args.out / "VAE-approx" / "taesd_decoder.safetensors"))
        tome = (TokenMerging(0.5),)
        if separate:
            self.add("ours + ToMe 0.5", lambda: run_ours(pipe, self.s, extensions=tome), self.default, "faster, quality stated")
            self.add("ours + approx decode", lambda: run_ours(approx, self.s), self.default, "faster, quality stated")
        else:  # the combination's pixels with the real VAE: its quality cost apart from the (random) TAESD decoder
            self.add("ours + fast + ToMe", lambda: run_ours(pipe, self.s, fast=True, extensions=tome), self.theirs_name, "quality stated")
        self.add("ours + fast + ToMe + approx decode", lambda: run_ours(approx, self.s, fast=True, extensions=tome), self.theirs_name, ">= 2.5")

    def run(self, out: Path, repeats: int) -> dict[str, list]:
        from . import measure
        from .runners import Settings

        # One untimed 1-step run each: kernel selection, allocator growth, lazy imports.
        warm = Settings(width=self.s.width, height=self.s.height, steps=1)
        saved, self.s = self.s, warm
        try:
            for name in self.configs:
                self.configs[name]()
        finally:
            self.s = saved
        samples: dict[str, list] = {name: [] for name in self.configs}
        for r in range(repeats):
            order = list(self.configs) if r % 2 == 0 else list(reversed(self.configs))  # alternate to cancel drift
            for name in order:
                sample = self.configs[name]()
                samples[name].append(sample)
                _log(out, f"  repeat {r + 1} {name}: {sample.seconds:.2f} s, {sample.per_step:.3f} s/step, "
                          f"decode {sample.decode_seconds:.2f} s, load {measure.load_average()}")
        return samples

    def ratios(self, rows: dict) -> list[tuple[str, tuple, str]]:
        from .report import ratio

        out = []
        if self.same:
            out.append((f"{self.same} / {self.theirs_name} (same dtype; <1 = ours faster)", ratio(rows, self.same, self.theirs_name), "<= 1.02"))
        if self.auto_name:
            out.append((f"speed-up of ours auto over {self.theirs_name} (diffusers' CPU default)", ratio(rows, self.theirs_name, self.auto_name), ">= 2.0"))
        for name, (base, target) in self.extras.items():
            out.append((f"speed-up of {name} over {base}", ratio(rows, base, name), target))
        preview = _preview_seconds(self.ours_ref, self.s) / rows[self.default]["step_median"]
        out.append((f"latent preview time / {self.default} step time", (preview, preview, preview), "<= 0.02"))
        return out

    def flop_rates(self, rows: dict):
        return _flop_rates(self.ours_ref, self.auto, rows, {self.same: self.ours_ref, self.auto_name: self.auto}, self.s, self.device)

    def diffs(self, first: dict) -> list[tuple[str, dict]]:
        from . import report

        pairs = [(self.same, self.theirs_name), (self.auto_name, self.theirs_name),
                 *((name, base) for name, (base, _) in self.extras.items())]
        return [(f"{a} vs {b}", report.image_diff(first[a], first[b])) for a, b in pairs if a and b]


def _preview_seconds(pipe, s) -> float:
    """Median time of one live preview (ldm.latents.preview) of a batch-1 latent at this size."""
    import statistics

    import torch

    from ldm.latents import preview

    x = torch.randn(1, 4, s.height // pipe.vae_scale_factor, s.width // pipe.vae_scale_factor)
    preview(x)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        preview(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flop_rates(ours_ref, auto, rows, pipes: dict, s, device):
    """(config, FLOP per step, achieved FLOP/s, matmul peak FLOP/s) for the plain (non-fast) configs of ours."""
    import torch

    from . import measure

    h, w = s.height // ours_ref.vae_scale_factor, s.width // ours_ref.vae_scale_factor
    unet = (auto or ours_ref).unet  # FLOPs do not depend on dtype; the low-precision model counts faster
    x = torch.zeros(2, unet.config.in_channels, h, w, dtype=unet.dtype, device=device)
    emb = torch.zeros(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype, device=device)
    per_step = measure.unet_flops(unet, x, torch.tensor(500, device=device), emb)
    out = []
    for name, pipe in pipes.items():
        if name is None or pipe is None:
            continue
        peak = measure.matmul_peak(pipe.unet.dtype, device)
        out.append((f"{name}", per_step, per_step / rows[name]["step_median"], peak))
    return out


def _demo(args) -> int:
    import torch

    from . import measure
    from .demo_eval import evaluate

    table = evaluate(args.demo, args.demo_seeds, args.demo_seen)
    text = (f"**demo model accuracy, default vs fast preset vs dtype auto**\n\n- model {args.demo}, {args.demo_seeds} seeds per "
            f"prompt, ldm_tools.eval's classifier, 64x64, 20 steps Euler, CFG 7.5; threads {torch.get_num_threads()}, "
            f"load average {measure.load_average()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            + (f"- note: {args.note}\n" if args.note else "") + "\n" + table)
    _log(args.out, text)
    if args.docs:
        from .report import update_docs

        update_docs(ROOT / "docs" / "performance.md", "demo", text)
    return 0


def _vae_tiling(args, folder: Path) -> int:
    """Peak memory and time of decoding one PX x PX image from latents with tiling, VAE alone in float32."""
    import torch
    from diffusers import AutoencoderKL

    from ldm.latents import decode

    from . import measure

    device = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).to(device).eval()
    latents = torch.randn(1, 4, args.vae_tiling // 8, args.vae_tiling // 8, generator=torch.Generator().manual_seed(0))
    before = measure.rss_bytes()
    measure.reset_peak(device)
    t = time.perf_counter()
    with torch.inference_mode():
        pixels = decode(vae, latents.to(device), tile=args.tile)
    seconds = time.perf_counter() - t
    peak = measure.peak_bytes(device)
    text = (f"**tiled VAE decode {args.vae_tiling}x{args.vae_tiling}**\n\n- float32 VAE, tile {args.tile} latent px, "
            f"threads {torch.get_num_threads()}, load average {measure.load_average()}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n- output {tuple(pixels.shape)}; {seconds:.1f} s; "
            f"peak RSS {peak / 1024**3:.2f} GB (process, VAE weights included; {before / 1024**3:.2f} GB before decoding)\n"
            + (f"- note: {args.note}\n" if args.note else ""))
    _log(args.out, text)
    if args.docs:
        from .report import update_docs

        update_docs(ROOT / "docs" / "performance.md", "vae-tiling", text)
    return 0


def _gpu_suite(args) -> int:
    import torch

    from . import gpu_suite
    from .models import ensure_sd15_folder, ensure_sdxl_folder

    gpu_suite.require_cuda(torch.device(args.device))  # before building GBs of weights
    tok = ROOT / "ldm" / "configs" / "clip-tokenizer"
    folders = {"sd15": ensure_sd15_folder(ROOT / "runs" / "bench" / "sd15-random", tok),
               "sdxl": ensure_sdxl_folder(ROOT / "runs" / "bench" / "sdxl-random", tok)}
    text = gpu_suite.run(args, folders, steps=args.steps or 20, repeats=args.repeats or 3)
    _log(args.out, text)
    return 0


def _sdxl_unet_rss(args) -> int:
    """One guided (batch 2) SDXL-shaped U-Net forward at PX, fp32 on the CPU: peak RSS of the process and time."""
    import torch

    from . import measure
    from .models import sdxl_unet

    unet = sdxl_unet(0)
    h = args.sdxl_unet_rss // 8
    x, emb = torch.randn(2, 4, h, h), torch.randn(2, 77, 2048)
    added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.tensor([[args.sdxl_unet_rss] * 2 + [0, 0] + [args.sdxl_unet_rss] * 2] * 2, dtype=torch.float32)}
    before = measure.rss_bytes()
    measure.reset_peak(torch.device("cpu"))
    t = time.perf_counter()
    with torch.inference_mode():
        unet(x, torch.tensor(500), encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)
    seconds = time.perf_counter() - t
    text = (f"**SDXL-shaped U-Net step {args.sdxl_unet_rss}x{args.sdxl_unet_rss}, fp32, CPU**\n\n- CPU {measure.cpu_model()} "
            f"({measure.cpu_flags()}), threads {torch.get_num_threads()}, load average {measure.load_average()}\n"
            f"- one guided U-Net call (batch 2): {seconds:.1f} s; peak RSS {measure.peak_bytes(torch.device('cpu')) / 1024**3:.2f} GB "
            f"(weights {sum(p.numel() for p in unet.parameters()) * 4 / 1024**3:.2f} GB; {before / 1024**3:.2f} GB before the call)\n")
    _log(args.out, text)
    return 0


def _sdxl_load_rss(args) -> int:
    import torch

    from . import sdxl_file

    head = f"- {_machine(torch.get_num_threads())}\n"
    text = sdxl_file.run(args.out, args.sdxl_load_rss, args.sdxl_file) + head + (f"- note: {args.note}\n" if args.note else "")
    _log(args.out, text)
    return 0


def _sdxl_step(args) -> int:
    import torch

    from . import sdxl_file, sdxl_step

    file, written = args.sdxl_file, None
    if file is None:
        file = written = args.out / "sdxl-random-fp16.safetensors"
        sdxl_file.write_random(file, sdxl_file.original_shapes())
    head = f"- {_machine(args.threads or torch.get_num_threads())}\n"
    try:
        results = _alternating(args, ("ours", "diffusers"),
                               lambda side: sdxl_step.run_side(side, file, args.sdxl_step, args.steps or 2, args.threads))
    finally:
        if written is not None:
            written.unlink(missing_ok=True)
    text = sdxl_step.report(results, args.sdxl_step) + head + (f"- note: {args.note}\n" if args.note else "")
    _log(args.out, text)
    return 0


def _run_rss(args, folder: Path) -> int:
    from . import run_rss

    size, steps = args.size or 512, args.steps or 2
    results = _alternating(args, ("ours", "diffusers"), lambda side: run_rss.run_side(side, folder, size, steps, args.threads))
    settings = (f"{args.shape}-width SD-1.5-shaped random weights, fp32, {size}x{size}, {steps} DDIM steps, CFG 7.5, batch 1; "
                + _machine(results[0]["threads"]))
    _log(args.out, run_rss.report(results, settings) + (f"- note: {args.note}\n" if args.note else ""))
    return 0


def _encode_pagein(args, folder: Path) -> int:
    from . import encode_pagein

    size = args.size or 512
    results = _alternating(args, tuple(encode_pagein.VARIANTS),
                           lambda variant: encode_pagein.run_side(variant, folder, size, args.threads))
    settings = f"{args.shape}-width SD-1.5-shaped random weights, fp32, {size}x{size}; " + _machine(results[0]["threads"])
    _log(args.out, encode_pagein.report(results, settings) + (f"- note: {args.note}\n" if args.note else ""))
    return 0


def _alternating(args, sides: tuple[str, ...], run) -> list[dict]:
    """run(side) for every side, --repeats rounds, the order reversed every other round (ABBA: cancels drift);
    each result logged as it comes."""
    results = []
    for r in range(args.repeats or 1):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            results.append(run(side))
            _log(args.out, f"  {side}: {json.dumps(results[-1])}")
    return results


def _machine(threads) -> str:
    """The line every memory/timing report ends with: what it ran on, and when."""
    import torch

    from . import measure

    return (f"CPU {measure.cpu_model()} ({measure.cpu_flags()}), torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"threads {threads}, load average {measure.load_average()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


if __name__ == "__main__":
    sys.exit(main())
