"""The parts of a generation side by side, PyTorch vs OpenVINO, on one loaded pipeline (issue 22, goal 1):

    python -m ldm_tools.bench.openvino_parts --size 512 --repeats 3 --threads 1

One `ldm.load(..., openvino=True)` of the SD-1.5-shaped random weights; the PyTorch side calls the same
modules' own forward (`forward.eager`), so both sides share every weight. Alternating, it times the
guided U-Net call (batch 2, 77 tokens), the unguided one (batch 1) and the VAE decode, reports process
CPU time (all threads: OpenVINO runs its own) and wall time, the first-use conversion and per-shape
compile times, the resident memory OpenVINO adds, and how far the outputs differ. From the parts it
computes a 20-step end to end (text encoding and the sampler are measured too, and are the same for
both); that figure is a sum of measured parts, not a measured run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _timed(fn) -> tuple[float, float, object]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def _alternate(pairs: dict, repeats: int, log) -> dict[str, dict[str, list[float]]]:
    """pairs: part -> {"pytorch": fn, "openvino": fn}; the order flips every repeat."""
    res = {part: {side: [] for side in sides} for part, sides in pairs.items()}
    for r in range(repeats):
        for part, sides in pairs.items():
            for side in (list(sides) if r % 2 == 0 else list(reversed(list(sides)))):
                cpu, wall, _ = _timed(sides[side])
                res[part][side].append((cpu, wall))
                log(f"  repeat {r + 1} {part} {side}: CPU {cpu:.2f} s, wall {wall:.2f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_tools.bench.openvino_parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="steps of the end to end computed from the parts")
    p.add_argument("--shape", choices=("full", "half"), default="full")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--note", default="")
    p.add_argument("--e2e", default="", help="real end-to-end runs after the parts, in this order, comma-separated: "
                   "openvino, goal3 (fast preset + ToMe 0.5 + approximate decode, random TAESD), pytorch")
    args = p.parse_args(argv)

    import torch

    import ldm

    from . import measure
    from .models import ensure_sd15_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    name, width = {"full": ("sd15-random", 1.0), "half": ("sd15-half", 0.5)}[args.shape]
    folder = ensure_sd15_folder(ROOT / "runs" / "bench" / name, ROOT / "ldm" / "configs" / "clip-tokenizer", width=width)
    info = measure.machine(torch.device("cpu"))
    cache = args.out / "openvino"
    rss0 = measure.rss_bytes()
    pipe = ldm.load(folder, device="cpu", openvino=True, openvino_cache=str(cache))
    unet, decoder, vae = pipe.unet, pipe.vae.decoder, pipe.vae
    rss_loaded = measure.rss_bytes()

    g = torch.Generator().manual_seed(0)
    h = args.size // 8
    x2 = torch.randn(2, 4, h, h, generator=g)
    emb2 = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    z = torch.randn(1, 4, h, h, generator=g) / vae.config.scaling_factor

    def unet_call(batch: int, side: str):
        fn = unet.forward if side == "openvino" else unet.forward.eager
        return lambda: fn(x2[:batch], t, encoder_hidden_states=emb2[:batch], return_dict=False)[0]

    def decode(side: str):
        def run():
            swap = decoder.forward
            if side == "pytorch":
                decoder.forward = swap.eager
            try:
                return vae.decode(z, return_dict=False)[0]
            finally:
                decoder.forward = swap
        return run

    # First use: conversion (unless cached) and compile per shape, then the output differences.
    with torch.inference_mode():
        first = {}
        for label, fn in (("U-Net batch 2", unet_call(2, "openvino")), ("U-Net batch 1", unet_call(1, "openvino")),
                          ("VAE decode", decode("openvino"))):
            cpu, wall, first[label] = _timed(fn)
            log(f"first {label} through OpenVINO (conversion if not cached + compile + call): CPU {cpu:.1f} s, wall {wall:.1f} s")
        rss_compiled = measure.rss_bytes()
        ref_u = unet_call(2, "pytorch")()
        ref_d = decode("pytorch")()
        du = (first["U-Net batch 2"] - ref_u).abs().max().item()
        to8 = lambda img: ((img.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731  (the pipeline's 0-255 mapping)
        dd = (to8(first["VAE decode"]) - to8(ref_d)).abs().max().item()
        log(f"max abs diff U-Net output {du:.2e}; VAE decode {dd:.0f}/255 (rounded pixels)")

        other = {"text encoding": lambda: pipe.text_encoder(torch.ones(2, 77, dtype=torch.long))}
        res = {} if args.repeats < 1 else _alternate({"U-Net guided (batch 2)": {"pytorch": unet_call(2, "pytorch"), "openvino": unet_call(2, "openvino")},
                          "U-Net unguided (batch 1)": {"pytorch": unet_call(1, "pytorch"), "openvino": unet_call(1, "openvino")},
                          "VAE decode": {"pytorch": decode("pytorch"), "openvino": decode("openvino")}}, args.repeats, log)
        text_cpu = min(_timed(other["text encoding"])[0] for _ in range(3))

    conv = {m.spec.name: m.convert_seconds for m in (unet.forward, decoder.forward)}
    comp = {m.spec.name: {str(k[0]): round(v, 1) for k, v in m.compile_seconds.items()} for m in (unet.forward, decoder.forward)}
    out = [f"**OpenVINO vs PyTorch, parts, SD-1.5-shaped ({args.shape} width) {args.size} px**", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average at end: {measure.load_average()}", f"- run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{args.repeats} alternating repeats", f"- openvino {__import__('openvino').get_version()}"]
    if args.note:
        out.append(f"- note: {args.note}")
    out += [f"- conversion on first use (s, None = read from the cache): {conv}", f"- compile per shape (s): {comp}",
            f"- RSS: {rss0 / 1e9:.2f} GB before loading, {rss_loaded / 1e9:.2f} GB loaded, {rss_compiled / 1e9:.2f} GB with the "
            f"compiled models (+{(rss_compiled - rss_loaded) / 1e9:.2f} GB)",
            f"- output: U-Net max abs diff {du:.2e}; VAE decode max {dd:.0f}/255", "",
            "| part | PyTorch CPU s (best / median) | OpenVINO CPU s (best / median) | ratio OV/PT CPU best | median | wall best |",
            "|---|---|---|---|---|---|"]
    best = {}
    for part, sides in res.items():
        pt, ov = sides["pytorch"], sides["openvino"]
        bc = (min(c for c, _ in pt), min(c for c, _ in ov))
        mc = (statistics.median(c for c, _ in pt), statistics.median(c for c, _ in ov))
        bw = (min(w for _, w in pt), min(w for _, w in ov))
        best[part] = bc
        out.append(f"| {part} | {bc[0]:.2f} / {mc[0]:.2f} | {bc[1]:.2f} / {mc[1]:.2f} | {bc[1] / bc[0]:.3f} | {mc[1] / mc[0]:.3f} | {bw[1] / bw[0]:.3f} |")
    e2e = [float("nan"), float("nan")]
    if res:
        g2, dec = best["U-Net guided (batch 2)"], best["VAE decode"]
        e2e = [args.steps * g2[i] + dec[i] + text_cpu for i in (0, 1)]
        out += ["", f"Computed {args.steps}-step end to end (best CPU times; {args.steps} guided U-Net calls + VAE decode + text "
                f"encoding {text_cpu:.2f} s; sampler and PIL not counted): PyTorch {e2e[0]:.1f} s, OpenVINO {e2e[1]:.1f} s, "
                f"speed-up {e2e[0] / e2e[1]:.3f}x (U-Net only: {g2[0] / g2[1]:.3f}x)."]
    if args.e2e:
        out += ["", *_end_to_end(pipe, args, e2e[0], log)]
    text = "\n".join(out) + "\n"
    log(text)
    (args.out / f"openvino-parts-{args.shape}-{args.size}{'-e2e' if args.e2e else ''}.md").write_text(text)
    return 0


class _PyTorchOnly:
    """Route the pipeline's U-Net and VAE decoder back to their own forward for a while."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        self.saved = [m.forward for m in self.modules]
        for m, f in zip(self.modules, self.saved):
            m.forward = f.eager

    def __exit__(self, *exc):
        for m, f in zip(self.modules, self.saved):
            m.forward = f


def _end_to_end(pipe, args, pytorch_parts: float, log) -> list[str]:
    """Real generations (prompt to PIL image) at the parts' size; pixel differences between them."""
    import torch

    from ldm.extensions import FastPreset, TokenMerging
    from ldm.images import tensor_to_pil
    from ldm.latents import decode
    from ldm.tasks import generate

    from .models import taesd_decoder_file
    from .report import image_diff
    from .runners import Settings

    s = Settings(width=args.size, height=args.size, steps=args.steps)
    approx = pipe.with_approx_decode(taesd_decoder_file(args.out / "VAE-approx" / "taesd_decoder.safetensors"))
    kw = dict(negative_prompt=s.negative_prompt, width=s.width, height=s.height, steps=s.steps, sampler=s.sampler,
              guidance_scale=s.guidance_scale, seed=s.seed)
    runs = {"openvino": lambda: generate.txt2img(pipe, s.prompt, **kw),
            "goal3": lambda: generate.txt2img(approx, s.prompt, extensions=(FastPreset(), TokenMerging(0.5)), **kw)}
    images, rows = {}, []
    for name in args.e2e.split(","):
        with torch.inference_mode():
            if name == "pytorch":
                with _PyTorchOnly(pipe.unet, pipe.vae.decoder):
                    cpu, wall, result = _timed(lambda: generate.txt2img(pipe, s.prompt, **kw))
            else:
                cpu, wall, result = _timed(runs[name])
            images[name] = result.images[0]
            if name == "goal3":  # the same latents through the real VAE: the cost of fast + ToMe apart from the decoder
                with _PyTorchOnly(pipe.vae.decoder):
                    images["goal3, real VAE"] = tensor_to_pil(decode(pipe.vae, result.latents))[0]
        rows.append(f"| {name} | {wall:.1f} | {cpu:.1f} | {pytorch_parts / cpu:.3f} |")
        log(f"e2e {name}: wall {wall:.1f} s, CPU {cpu:.1f} s")
    out = [f"Real {args.steps}-step generations, {s.sampler}, CFG {s.guidance_scale}, one run each:", "",
           "| run | wall s | CPU s | PyTorch (computed from parts, CPU) / this |", "|---|---|---|---|", *rows]
    base = "pytorch" if "pytorch" in images else "openvino" if "openvino" in images else None
    if base:
        out += ["", "| image difference (0-255) | max | mean | PSNR dB |", "|---|---|---|---|"]
        for name, img in images.items():
            if name != base:
                d = image_diff(img, images[base])
                out.append(f"| {name} vs {base} | {d['max']:.0f} | {d['mean']:.2f} | {d['psnr']:.1f} |")
    for name, img in images.items():
        img.save(args.out / f"openvino-e2e-{args.size}-{name.replace(', ', '-').replace(' ', '_')}.png")
    return out


if __name__ == "__main__":
    sys.exit(main())
