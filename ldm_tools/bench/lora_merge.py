"""`python -m ldm_tools.bench.lora_merge`: time and memory of applying + restoring a rank-32 LoRA on
SD-1.5-shaped random weights (ldm.lora.Networks), against one U-Net step (CFG batch of 2) at 256 px.

The LoRA targets what kohya's trainer targets by default: every U-Net transformer block (attention q/k/v/out,
feed-forward, proj_in/proj_out) and every text-encoder attention projection and MLP; with --convs also
every 3x3 resnet convolution (LoCon).
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch
from safetensors.torch import save_file

from ldm.library import Library
from ldm.lora import Networks
from ldm.prompt_tags import LoraTag
from ldm_tools.bench.models import text_encoder, unet

UNET_TARGETS = ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "proj_out")
TE_TARGETS = ("self_attn.", "mlp.fc")


def make_lora(components, rank: int, convs: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for prefix, model, targets in (("lora_unet_", components.unet, UNET_TARGETS),
                                   ("lora_te_text_model_", components.text_encoder, TE_TARGETS)):
        for name, m in model.named_modules():
            conv3 = convs and isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and "resnets" in name
            if not (isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(t in name for t in targets)) and not conv3:
                continue
            w = m.weight
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.01
            out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.01
            out[f"{key}.alpha"] = torch.tensor(float(rank // 2))
    return out


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--convs", action="store_true", help="also LoCon 3x3 resnet convolutions")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    print(f"CPU: {psutil.cpu_count()} logical cores; SIMD flags: {' '.join(simd)}; "
          f"torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    components = SimpleNamespace(unet=unet(0).requires_grad_(False), text_encoder=text_encoder(0).requires_grad_(False))
    with tempfile.TemporaryDirectory() as tmp:
        lib = Library(Path(tmp) / "models")
        tensors = make_lora(components, args.rank, args.convs)
        save_file(tensors, str(lib.root / "Lora" / "bench.safetensors"))
        size = (lib.root / "Lora" / "bench.safetensors").stat().st_size / 2**20
        print(f"LoRA: rank {args.rank}, {len(tensors) // 3} layers, {size:.0f} MiB file")
        del tensors
        gc.collect()
        nets = Networks(components, lib)
        tags = [LoraTag("bench", 0.8, 0.8)]
        base_rss = rss_mb()
        for i in range(args.repeats):
            nets.clear_cache()
            gc.collect()
            t0 = time.perf_counter()
            with nets.applied(tags):
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            print(f"  uncached: apply {t1 - t0:.2f} s (read + merge + swap), restore {(t2 - t1) * 1e3:.2f} ms")
        peak_rss = rss_mb()
        for i in range(args.repeats):
            t0 = time.perf_counter()
            with nets.applied(tags):
                pass
            print(f"  cached (same LoRA set again): apply + restore {(time.perf_counter() - t0) * 1e3:.2f} ms")
        print(f"RSS: {base_rss:.0f} MiB before, {peak_rss:.0f} MiB with the merged set cached "
              f"(+{peak_rss - base_rss:.0f} MiB; the cache holds a copy of every changed weight)")
        nets.clear_cache()
        latents, t = torch.randn(2, 4, 32, 32), torch.tensor(500)
        cond = torch.randn(2, 77, 768)
        with torch.inference_mode():
            components.unet(latents, t, cond)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                components.unet(latents, t, cond)
                times.append(time.perf_counter() - t0)
        print(f"one U-Net step at 256x256 (CFG batch 2): {min(times):.2f} s")


if __name__ == "__main__":
    main()
