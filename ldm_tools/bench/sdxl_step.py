"""SDXL U-Net steps, ours vs diffusers, on the same single file, each side in its own process.

ours: the U-Net as `ldm.load` builds it (ldm.loading.load_components + ldm.accel.configure: weights read
into private memory, attention chosen), stepped by ldm.denoise's loop with SDXL's added conditioning.
diffusers: `UNet2DConditionModel.from_single_file` on the same file with the bundled config, stepped by
`StableDiffusionXLPipeline` given the same embeddings (output_type="latent": no text encoders, no VAE).
Both: guided batch of 2, Euler, the same latents and conditioning, fp32 U-Net. Text encoders and the VAE
are loaded by ours (fp16, to save memory) and dropped before stepping, so both processes hold one U-Net.
Each process reports its step times (from the step callbacks), its peak RSS while stepping and the
latents' checksum (the two sides must agree).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .measure import side_in_fresh_process, status_kb


def inputs(unet_config, size: int, seed: int = 0) -> dict:
    """Latents, [negative, positive] embeddings and pooled vectors, time ids, all float32."""
    g = torch.Generator().manual_seed(seed)
    pooled = int(unet_config.projection_class_embeddings_input_dim) - 6 * int(unet_config.addition_time_embed_dim)
    return {"latents": torch.randn(1, 4, size // 8, size // 8, generator=g),
            "embeds": torch.randn(2, 77, int(unet_config.cross_attention_dim), generator=g),
            "pooled": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}


def scheduler():
    from diffusers import EulerDiscreteScheduler

    from ldm.single_file import SDXL_CONFIG

    return EulerDiscreteScheduler.from_pretrained(SDXL_CONFIG / "scheduler")


def load_ours(file: Path, config: Path | None = None):
    """The U-Net exactly as ldm.load configures it on a CPU (fp32), its text encoders and VAE dropped."""
    from ldm.accel import configure
    from ldm.devices import ComponentDtypes
    from ldm.loading import load_components

    dtypes = ComponentDtypes(text_encoder=torch.float16, unet=torch.float32, vae=torch.float32)
    components = load_components(file, device=torch.device("cpu"), dtype=dtypes, config=config)
    configure(components, device=torch.device("cpu"))
    return components.unet


def load_diffusers(file: Path, config: Path | None = None):
    from diffusers import UNet2DConditionModel

    from ldm.single_file import SDXL_CONFIG

    return UNet2DConditionModel.from_single_file(str(file), config=str(config or SDXL_CONFIG), subfolder="unet",
                                                 torch_dtype=torch.float32, local_files_only=True).eval()


def step_ours(unet, x: dict, steps: int, guidance: float, tick) -> torch.Tensor:
    from ldm.denoise import DenoiseInputs, denoise
    from ldm.family_sdxl import AddedConditioning

    s = scheduler()
    s.set_timesteps(steps)
    added = AddedConditioning(x["pooled"][1:], x["time_ids"], x["pooled"][:1], x["time_ids"])
    inp = DenoiseInputs(latents=x["latents"] * s.init_noise_sigma, timesteps=s.timesteps, scheduler=s,
                        cond=x["embeds"][1:], uncond=x["embeds"][:1], guidance_scale=guidance,
                        generators=[torch.Generator().manual_seed(0)], extensions=(added,))
    with torch.inference_mode():
        return denoise(unet, inp, lambda *a: tick())


def step_diffusers(unet, x: dict, steps: int, guidance: float, tick) -> torch.Tensor:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=scheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    size = x["latents"].shape[-1] * 8

    def on_step_end(_pipe, i, t, kwargs):
        tick()
        return kwargs

    with torch.inference_mode():
        return pipe(prompt_embeds=x["embeds"][1:], negative_prompt_embeds=x["embeds"][:1], pooled_prompt_embeds=x["pooled"][1:],
                    negative_pooled_prompt_embeds=x["pooled"][:1], height=size, width=size, num_inference_steps=steps,
                    guidance_scale=guidance, latents=x["latents"], output_type="latent",
                    generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end).images


def measure_side(side: str, file: Path, size: int, steps: int, config: Path | None = None, guidance: float = 5.0) -> dict:
    """In this process: load one side's U-Net, run `steps` guided steps, report times and memory."""
    import gc

    t = time.perf_counter()
    unet = (load_ours if side == "ours" else load_diffusers)(file, config)
    gc.collect()
    load_seconds, load_peak, after_load = time.perf_counter() - t, status_kb("VmHWM"), status_kb("VmRSS")
    x = inputs(unet.config, size)
    Path("/proc/self/clear_refs").write_text("5")  # the stepping's own peak from here
    marks = [(time.perf_counter(), time.process_time())]  # wall and this process's CPU time (robust to other jobs at 1 thread)
    out = (step_ours if side == "ours" else step_diffusers)(unet, x, steps, guidance,
                                                            lambda: marks.append((time.perf_counter(), time.process_time())))
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {"side": side, "load_seconds": load_seconds, "load_peak": load_peak * 1024, "after_load": after_load * 1024,
            "step_seconds": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
            "step_cpu_seconds": [b[1] - a[1] for a, b in zip(marks, marks[1:])], "peak": status_kb("VmHWM") * 1024, "weights": weights,
            "checksum": float(out.double().abs().sum()), "threads": torch.get_num_threads(), "attention":
            type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}


def run_side(side: str, file: Path, size: int, steps: int, threads: int | None = None) -> dict:
    """measure_side in a fresh process."""
    return side_in_fresh_process("sdxl_step", side, file, size, steps, threads)


def report(results: list[dict], size: int) -> str:
    """Markdown: per side the first and later step times, memory; ours / diffusers on the later steps."""
    import statistics

    gib = 1024**3
    sides = {s: [r for r in results if r["side"] == s] for s in ("ours", "diffusers")}
    # steps after each process's first (warm); with one step per process, the first steps
    later = {s: [t for r in rs for t in (r["step_seconds"][1:] or r["step_seconds"])] for s, rs in sides.items()}
    cpu = {s: [t for r in rs for t in (r["step_cpu_seconds"][1:] or r["step_cpu_seconds"])] for s, rs in sides.items()}
    rows = ["| side | processes | first step s | later steps s (median; min; = first with 1 step) | later steps CPU s (median; min) "
            "| load s | load peak GiB | RSS after load GiB | peak RSS while stepping GiB | attention |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s, rs in sides.items():
        first, loads = _join(r["step_seconds"][0] for r in rs), _join((r["load_seconds"] for r in rs), 0)
        rows.append(f"| {s} | {len(rs)} | {first} | "
                    f"{statistics.median(later[s]):.1f}; {min(later[s]):.1f} | {statistics.median(cpu[s]):.1f}; {min(cpu[s]):.1f} | {loads} | "
                    f"{max(r['load_peak'] for r in rs) / gib:.2f} | {max(r['after_load'] for r in rs) / gib:.2f} | "
                    f"{max(r['peak'] for r in rs) / gib:.2f} | {rs[0]['attention']} |")
    median = statistics.median(later["ours"]) / statistics.median(later["diffusers"])
    best = min(later["ours"]) / min(later["diffusers"])
    cpu_median = statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"])
    cpu_best = min(cpu["ours"]) / min(cpu["diffusers"])
    sums = {r["checksum"] for r in results}
    return (f"**SDXL U-Net steps at {size}x{size}, fp32, CPU: ours vs diffusers** (random SDXL-base weights from one fp16 "
            f"single file; guided batch 2, Euler; {len(results[0]['step_seconds'])} steps per process, processes alternating "
            f"ABBA; U-Net weights {results[0]['weights'] / gib:.2f} GiB)\n\n" + "\n".join(rows) + "\n\n"
            f"- ours / diffusers, later steps, wall: median {median:.3f}, best {best:.3f}; CPU time: median {cpu_median:.3f}, "
            f"best {cpu_best:.3f} (target <= 1.02; at 1 thread on a shared machine CPU time is the fair figure)\n"
            f"- peak RSS of a step (whole process): ours {max(r['peak'] for r in sides['ours']) / gib:.2f} GiB, diffusers "
            f"{max(r['peak'] for r in sides['diffusers']) / gib:.2f} GiB (target <= 16 GB)\n"
            f"- final latents: {'identical checksums' if len(sums) == 1 else 'checksums ' + ', '.join(f'{c:.6g}' for c in sorted(sums))}\n")


def _join(values, digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)
