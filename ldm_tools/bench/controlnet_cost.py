"""`python -m ldm_tools.bench.controlnet_cost`: what one ControlNet unit costs per denoising step.

SD-1.5-shaped random U-Net and a ControlNet copied from it (random weights: the cost does not depend
on them), float32, CFG batch of 2, on the CPU. Runs the library's one loop (`ldm.denoise`) with
Euler for `--steps` steps in three configurations, alternating them over `--repeats` rounds:

    unet        no control
    unit        one unit active on every step
    off-range   one unit whose start/end range covers none of the steps (must cost nothing)

and prints wall time (best, median) and process CPU time (best) per step, their ratios to "unet", the
ControlNet calls counted in each, and the CPU flags and torch's CPU capability they ran on. On a busy
machine the CPU-time ratio (with --threads 1) is the one to read.

`--flops` instead counts the floating-point operations of one CFG step of the U-Net and of a ControlNet
copied from it, SD-1.5-shaped at 512 px and SDXL-shaped at 1024 px, on the meta device (no weights in
memory: a real SDXL U-Net plus ControlNet is ~15 GB in float32, too much to time on a shared CPU box).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch


def cpu_flags() -> str:
    try:
        out = subprocess.run(["grep", "-m1", "flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    flags = out.split(":", 1)[-1].split()
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return " ".join(wanted) or "unknown"


def flop_ratios() -> None:
    """U-Net and ControlNet FLOPs per CFG step (batch 2), counted by torch on meta tensors."""
    from diffusers import ControlNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_tools.bench.models import sdxl_unet, unet as sd15_unet

    shapes = {"SD-1.5-shaped, 512 px": (sd15_unet, 512, 768, None),
              "SDXL-shaped, 1024 px": (sdxl_unet, 1024, 2048, (1280, 6))}
    for label, (make, size, context, added) in shapes.items():
        with torch.device("meta"):
            unet = make(0)
            net = ControlNetModel.from_unet(unet)
            x, t = torch.randn(2, 4, size // 8, size // 8), torch.tensor([500.0, 500.0])
            kw = {"encoder_hidden_states": torch.randn(2, 77, context)}
            if added:
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, added[0]), "time_ids": torch.randn(2, added[1])}
            image = torch.randn(2, 3, size, size)
        with torch.no_grad(), FlopCounterMode(display=False) as u:
            unet(x, t, **kw)
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            net(x, t, controlnet_cond=image, **kw)
        print(f"{label}: U-Net {u.get_total_flops() / 1e12:.2f} TFLOP, ControlNet {c.get_total_flops() / 1e12:.2f} TFLOP "
              f"per CFG step: a unit adds {c.get_total_flops() / u.get_total_flops():.0%} to the U-Net's work")


def main(argv=None) -> None:
    from diffusers import ControlNetModel, EulerDiscreteScheduler

    from ldm.denoise import DenoiseInputs, denoise
    from ldm.extensions.control import ControlResiduals
    from ldm_tools.bench.models import SD15_SCHEDULER, unet as sd15_unet

    ap = argparse.ArgumentParser(prog="python -m ldm_tools.bench.controlnet_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flops", action="store_true", help="count FLOPs (SD 1.5 and SDXL shapes) instead of timing")
    args = ap.parse_args(argv)
    if args.flops:
        return flop_ratios()
    if args.threads:
        torch.set_num_threads(args.threads)

    unet = sd15_unet(0)
    net = ControlNetModel.from_unet(unet).eval()
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    image = torch.rand(1, 3, args.size, args.size, generator=g)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    configs = {
        "unet": [],
        "unit": [ControlResiduals(net, image)],
        "off-range": [ControlResiduals(net, image, start=0.0, end=0.5 / args.steps)],  # step 0 ends at 1/steps > end
    }

    def run(exts) -> tuple[float, float]:
        sched = EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
        sched.set_timesteps(args.steps)
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
        inputs = DenoiseInputs(latents, sched.timesteps, sched, cond, uncond, 7.0, [torch.Generator().manual_seed(2)], exts)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            denoise(unet, inputs)
        return (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps

    load_before = os.getloadavg()[0]
    run(configs["unit"])  # warm-up (allocator, oneDNN kernels)
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    counted: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, exts in configs.items():
            calls.clear()
            wall, used = run(exts)
            times[name].append(wall)
            cpu[name].append(used)
            counted[name] = len(calls)
    # The minimum is the least disturbed run (other processes only ever add time); the median is shown too.
    # CPU time (all threads of this process) is much less affected by other processes than wall time.
    base, cpu_base = min(times["unet"]), min(cpu["unet"])
    print(f"CPU flags: {cpu_flags()}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"SD-1.5-shaped, float32, {args.size}x{args.size}, CFG batch 2, {args.steps} Euler steps, {args.repeats} runs each "
          f"(1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    for name in configs:
        t, med = min(times[name]), statistics.median(times[name])
        med_ratio = med / statistics.median(times["unet"])
        print(f"  {name:10s} wall best {t:7.3f} s/step x{t / base:.2f}, median {med:7.3f} x{med_ratio:.2f};  "
              f"CPU best {min(cpu[name]):7.3f} s/step x{min(cpu[name]) / cpu_base:.2f};  "
              f"ControlNet calls per run: {counted[name]}")


if __name__ == "__main__":
    main()
