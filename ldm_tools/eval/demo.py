"""Evaluation of the bundled demo model on the shapes world.

Generates template-caption images for every seen and held-out
(object colour, shape, background colour) combination with several seeds and
reads them back with the deterministic pixel classifier of
``ldm_tools.train.world``.  Also evaluates inpainting when the pipeline offers it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..train import world as W

DEFAULT_MODEL = "weights/demo"
STEPS = 20
GUIDANCE = 7.5


# ----------------------------------------------------------------------------
# generation backends


def load_pipeline(model: str | Path = DEFAULT_MODEL):
    """``ldm.load`` when the package provides it, else diffusers' StableDiffusionPipeline (offline)."""
    import ldm

    if hasattr(ldm, "load"):
        return ldm.load(str(model))
    return load_diffusers(model)


def load_diffusers(model: str | Path = DEFAULT_MODEL):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backend_name(pipe) -> str:
    return "ldm.load" if hasattr(pipe, "txt2img") else f"diffusers {type(pipe).__name__}"


def generate(pipe, prompt: str, seed: int, n: int, steps: int = STEPS, guidance: float = GUIDANCE) -> list:
    """``n`` 64x64 images for ``prompt`` with seeds seed..seed+n-1 (Euler sampler)."""
    if hasattr(pipe, "txt2img"):
        kw = dict(negative_prompt="", width=64, height=64, steps=steps, guidance_scale=guidance, seed=seed,
                  batch_size=n)
        try:
            out = pipe.txt2img(prompt, sampler="Euler", **kw)
        except (ValueError, KeyError):
            out = pipe.txt2img(prompt, **kw)
        return list(out.images)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = pipe(prompt, num_images_per_prompt=n, generator=gens, num_inference_steps=steps,
               guidance_scale=guidance, height=64, width=64)
    return list(out.images)


# ----------------------------------------------------------------------------
# text-to-image evaluation


@dataclass
class Scores:
    n: int = 0
    bg: int = 0
    obj: int = 0
    shape: int = 0
    all: int = 0

    def add(self, combo, k: W.Classification) -> None:
        obj, shape, bg = combo
        self.n += 1
        self.bg += k.bg == bg
        self.obj += k.obj == obj
        self.shape += k.shape == shape
        self.all += (k.bg, k.obj, k.shape) == (bg, obj, shape)

    def pct(self) -> dict:
        d = max(1, self.n)
        return {"n": self.n, "bg": 100 * self.bg / d, "obj": 100 * self.obj / d, "shape": 100 * self.shape / d,
                "all": 100 * self.all / d}


def evaluate_txt2img(pipe, combos, seeds: int, seed0: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
                     progress: bool = False) -> tuple[Scores, float, list]:
    """Returns (scores, seconds per image, per-prompt failures)."""
    scores = Scores()
    failures = []
    t0 = time.perf_counter()
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="txt2img", leave=False)
    for combo in it:
        for img in generate(pipe, W.caption(*combo), seed0, seeds, steps, guidance):
            k = W.classify(img)
            scores.add(combo, k)
            if (k.obj, k.shape, k.bg) != combo:
                failures.append((combo, (k.obj, k.shape, k.bg)))
    per_img = (time.perf_counter() - t0) / max(1, scores.n)
    return scores, per_img, failures


# ----------------------------------------------------------------------------
# inpainting evaluation


def inpaint_cases(n: int, seed: int = 0):
    """``n`` (image, mask, prompt, target_combo, mask_array) cases: recolour the object."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    combos = W.all_combos()
    cases = []
    for i in range(n):
        combo = combos[int(rng.integers(len(combos)))]
        sc = W.random_scene(rng, combo)
        img = W.render(sc)
        new_obj = [c for c in W.COLOURS if c not in (sc.obj, sc.bg)][int(rng.integers(len(W.COLOURS) - 2))]
        mask = np.zeros((W.IMAGE_SIZE, W.IMAGE_SIZE), dtype=bool)
        m = 2  # margin around the bounding box
        mask[max(0, sc.y0 - m) : sc.y0 + sc.size + m, max(0, sc.x0 - m) : sc.x0 + sc.size + m] = True
        prompt = W.caption(new_obj, sc.shape, sc.bg)
        cases.append((Image.fromarray(img), Image.fromarray(mask.astype(np.uint8) * 255), prompt,
                      (new_obj, sc.shape, sc.bg), mask, img))
    return cases


def inpaint_one(pipe, image, mask, prompt, seed: int, steps: int = STEPS, guidance: float = GUIDANCE):
    try:
        out = pipe.inpaint(image, mask, prompt, strength=1.0, steps=steps, guidance_scale=guidance, seed=seed)
    except TypeError:
        out = pipe.inpaint(image, mask, prompt)
    return out.images[0]


def judge_inpaint(result, orig: np.ndarray, mask: np.ndarray, target) -> tuple[bool, bool]:
    """(masked region has the requested object colour, unmasked pixels unchanged)."""
    from scipy.ndimage import binary_dilation

    res = np.asarray(result.convert("RGB").resize((orig.shape[1], orig.shape[0])), dtype=np.int16)
    bg_idx = W.COLOURS.index(target[2])
    labels = W._nearest_palette(res)
    inside = labels[mask]
    non_bg = inside[inside != bg_idx]
    colour_ok = len(non_bg) >= 0.2 * mask.sum() and np.bincount(non_bg, minlength=8).argmax() == W.COLOURS.index(target[0])
    # unmasked pixels: ignore a band (mask blur) around the mask
    keep = ~binary_dilation(mask, iterations=6)
    diff = np.abs(res - orig.astype(np.int16)).max(-1)[keep]
    unchanged_ok = bool(keep.sum() == 0 or (diff <= 12).mean() >= 0.99)
    return bool(colour_ok), unchanged_ok


def evaluate_inpaint(pipe, n: int = 48, seed: int = 0) -> dict | None:
    if not hasattr(pipe, "inpaint"):
        return None
    res = {"n": 0, "colour": 0, "unchanged": 0, "both": 0}
    for i, (img, mask_img, prompt, target, mask, orig) in enumerate(inpaint_cases(n, seed)):
        try:
            out = inpaint_one(pipe, img, mask_img, prompt, seed=seed + i)
        except (ImportError, NotImplementedError) as e:  # the method exists but its backend is not there yet
            if i == 0:
                return {"error": f"{type(e).__name__}: {e}"}
            raise
        c, u = judge_inpaint(out, orig, mask, target)
        res["n"] += 1
        res["colour"] += c
        res["unchanged"] += u
        res["both"] += c and u
    return {k: (v if k == "n" else 100 * v / max(1, res["n"])) for k, v in res.items()}


# ----------------------------------------------------------------------------
# VAE round trip (the ceiling the diffusion model can reach through this decoder)


@torch.no_grad()
def vae_roundtrip(pipe, n: int = 240, seed: int = 7) -> dict | None:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    imgs, scenes = W.generate_dataset(n, seed=seed, combos=W.all_combos())
    p = next(vae.parameters())
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(p.dtype).div(127.5).sub(1.0)
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 60]).latent_dist.mean).sample for i in range(0, n, 60)])
    u8 = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    s = Scores()
    for im, sc in zip(u8, scenes):
        s.add(sc.combo, W.classify(im))
    return s.pct()


# ----------------------------------------------------------------------------
# report


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def timing_20_steps(pipe, repeats: int = 5) -> float:
    """Median seconds for one 64x64 image, 20 steps, guidance 7.5 (after a warm-up)."""
    generate(pipe, W.caption("red", "circle", "blue"), 0, 1)
    ts = []
    for i in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, W.caption("red", "circle", "blue"), i, 1)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def run(model: str | Path = DEFAULT_MODEL, seeds: int = 4, doc: str | Path | None = "docs/demo-model.md",
        inpaint_n: int = 48) -> dict:
    # One thread: these models are tiny, and 2-thread torch collapses when the 2 cores are shared.
    torch.set_num_threads(1)
    model = Path(model)
    pipe = load_pipeline(model)
    backend = backend_name(pipe)
    held = W.holdout_combos()
    seen = W.train_combos()
    t0 = time.time()
    s_seen, per_img, f_seen = evaluate_txt2img(pipe, seen, seeds, progress=True)
    s_held, _, f_held = evaluate_txt2img(pipe, held, seeds, progress=True)
    gen_time = timing_20_steps(pipe)
    vae_rt = vae_roundtrip(pipe)
    if hasattr(pipe, "inpaint"):
        inp = evaluate_inpaint(pipe, inpaint_n)
        inp_note = None
        if inp and "error" in inp:
            inp_note = f"skipped: `pipe.inpaint` is not usable yet ({inp['error']})"
            inp = None
            print(f"inpainting evaluation {inp_note}")
    else:
        inp = None
        inp_note = "skipped: the pipeline has no `inpaint` method yet"
        print(f"inpainting evaluation {inp_note}")
    result = {
        "model": str(model),
        "backend": backend,
        "seeds": seeds,
        "seen": s_seen.pct(),
        "held": s_held.pct(),
        "inpaint": inp,
        "inpaint_note": inp_note,
        "sec_per_image_batched": per_img,
        "sec_one_image_20_steps": gen_time,
        "size_mb": _dir_size_mb(model),
        "eval_minutes": (time.time() - t0) / 60,
        "held_failures": f_held,
        "vae_roundtrip": vae_rt,
    }
    table = format_table(result)
    print(table)
    if doc:
        Path(doc).parent.mkdir(parents=True, exist_ok=True)
        Path(doc).write_text(format_doc(result, model, table))
        print(f"wrote {doc}")
    return result


TARGETS = {"seen": (95, 90, 80), "held": (90, 75, 70)}


def format_table(r: dict) -> str:
    lines = [
        "| split | combos x seeds | images | background | object colour | shape | all three | targets (bg/obj/shape) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n_combos = {"seen": len(W.train_combos()), "held": len(W.holdout_combos())}
    for key, name in (("seen", "seen"), ("held", "held-out")):
        s = r[key]
        t = TARGETS[key]
        lines.append(
            f"| {name} | {n_combos[key]} x {r['seeds']} | {s['n']} | {s['bg']:.1f}% | {s['obj']:.1f}% | "
            f"{s['shape']:.1f}% | {s['all']:.1f}% | >= {t[0]}% / {t[1]}% / {t[2]}% |"
        )
    if r.get("vae_roundtrip"):
        v = r["vae_roundtrip"]
        lines.append(
            f"| (ceiling) renders through the VAE only | - | {v['n']} | {v['bg']:.1f}% | {v['obj']:.1f}% | "
            f"{v['shape']:.1f}% | {v['all']:.1f}% | |"
        )
    if r.get("inpaint"):
        i = r["inpaint"]
        lines += [
            "",
            "| inpainting (recolour the object; bbox mask) | cases | requested colour in mask | unmasked unchanged | both (target >= 80%) |",
            "|---|---|---|---|---|",
            f"| | {i['n']} | {i['colour']:.1f}% | {i['unchanged']:.1f}% | {i['both']:.1f}% |",
        ]
    else:
        lines += ["", f"Inpainting: {r.get('inpaint_note')}."]
    return "\n".join(lines)


def format_doc(r: dict, model: Path, table: str) -> str:
    info = {}
    tj = model / "training.json"
    if tj.exists():
        info = json.loads(tj.read_text())
    cfg = info.get("config", {})
    params = info.get("params", {})
    held = W.holdout_combos()
    held_list = "\n".join(f"- {W.caption(*c)}" for c in held)
    hist = info.get("history", [])
    hist_lines = "\n".join(
        f"| {h['step']} | {h['minutes']} | {h['seen'][0]:.2f} / {h['seen'][1]:.2f} / {h['seen'][2]:.2f} | "
        f"{h['held'][0]:.2f} / {h['held'][1]:.2f} / {h['held'][2]:.2f} |"
        for h in hist
    )
    fails = r.get("held_failures", [])
    fail_lines = "\n".join(f"- asked `{W.caption(*c)}`, classified as {g[0]} / {g[1]} / {g[2]}" for c, g in fails[:20])

    def p(k):
        return f"{params[k] / 1e6:.2f}M" if k in params else "?"

    total_min = (info.get("vae_minutes") or 0) + (info.get("unet_text_minutes") or 0)
    return f"""# Bundled demo model (`weights/demo`)

A tiny Stable-Diffusion-style latent diffusion model trained from scratch on a procedural
"shapes world", so the app produces pictures that follow prompts on a fresh offline machine.
It loads with diffusers' own `StableDiffusionPipeline.from_pretrained("weights/demo")`.

*This file is written by `python -m ldm_tools.eval demo --model {model} --seeds {r['seeds']}`.*

## The world

64x64 RGB images, one shape (circle, axis-aligned square, upright triangle; size 35-65% of
the side, anywhere fully inside the image) of one of 8 palette colours (red, green, blue,
yellow, purple, orange, white, black) on a plain background of a different palette colour:
8 x 3 x 7 = 168 combinations. Captions: `a {{colour}} {{shape}} on a {{colour}} background`
(training also uses partial captions and paraphrases, e.g. `a red circle`,
`blue background with a red circle`; 10% of captions are dropped to `""` for classifier-free
guidance). Generator and classifier: `ldm_tools/train/world.py`.

### Held-out combinations

{len(held)} combinations (15% of 168, drawn with `random.Random({info.get('holdout_seed', W.HOLDOUT_SEED)})`,
rejecting draws that would leave an (object, shape), (object, background) or (shape, background)
pair unseen) are never shown in training (not to the VAE either):

{held_list}

## Recipe (`python -m ldm_tools.train demo --out weights/demo`, seed {cfg.get('seed', '?')})

1. Render {cfg.get('n_images', '?')} training images once into a uint8 tensor.
2. VAE: `AutoencoderKL`, blocks {cfg.get('vae_channels')}, 1 layer per block, no attention,
   factor 4 (64x64x3 -> 16x16x4), {p('vae')} params; {cfg.get('vae_steps')} steps, batch
   {cfg.get('vae_batch')}, AdamW lr {cfg.get('vae_lr')} (cosine), loss MSE + 0.5 L1 + {cfg.get('vae_kl_weight')} KL;
   `scaling_factor` = 1/std of the latent means = {info.get('scaling_factor', 0):.4f}. All images encoded once
   (the latent means). Then the decoder alone is fine-tuned {cfg.get('decoder_steps')} steps on those fixed latents
   (+{cfg.get('decoder_latent_noise')} latent noise, MSE + L1) for sharper edges; the latents do not change.
3. Text encoder: `CLIPTextModel` from scratch (hidden {cfg.get('text_hidden')}, {cfg.get('text_layers')} layers,
   {cfg.get('text_heads')} heads, 77 positions, real CLIP BPE tokenizer), {p('text_encoder')} params
   (3.16M of them the 49,408-token embedding table).
4. U-Net: `UNet2DConditionModel`, blocks {cfg.get('unet_channels')} (DownBlock2D at 16x16, cross-attention blocks
   at 8x8 and 4x4 and in the middle), 1 layer per block, {cfg.get('unet_heads')} heads, cross-attention dim
   {cfg.get('text_hidden')}, {p('unet')} params.
5. U-Net and text encoder trained jointly: {info.get('unet_steps', '?')} steps, batch {cfg.get('batch')},
   AdamW (lr {cfg.get('unet_lr')} U-Net / {cfg.get('text_lr')} text encoder, {cfg.get('warmup')} warm-up steps, then constant),
   epsilon prediction, "scaled_linear" betas {cfg.get('beta_start')}-{cfg.get('beta_end')} over 1000 steps,
   min-SNR-{cfg.get('min_snr_gamma')} loss weighting, EMA {cfg.get('ema_decay')} (the EMA weights are shipped),
   {int(100 * cfg.get('caption_dropout', 0.1))}% caption dropout, offset noise {cfg.get('offset_noise')} from step
   {cfg.get('offset_noise_start')}. Offset noise matters here: on a 16x16 latent the spatial mean of the noise has
   std 1/16, so without it the noisy latent still reveals the background colour at t=999 and the model learns to
   read it from there instead of from the prompt (the step-1000 check below: background at chance). Switched on
   at step 1250, background accuracy went to 100% by step 2500.
6. Shipped as a diffusers folder with an `EulerDiscreteScheduler` config (epsilon, trailing spacing),
   safetensors ({'fp16' if cfg.get('fp16_export') else 'fp32'}), {r['size_mb']:.1f} MB on disk.

Training wall-clock on the 2-core CPU, which was shared with other engineers' jobs throughout (they
used 1-2 cores most of the time; the trainer switches torch between 2 threads and 1 thread depending on
that load, `ldm_tools/train/threads.py`): VAE {info.get('vae_minutes', '?')} min including the decoder
fine-tuning (which ran concurrently with the U-Net stage), U-Net + text encoder
{info.get('unet_text_minutes', '?')} min for {info.get('unet_steps', '?')} steps (sum about {total_min:.0f} min, plus a few
minutes for rendering and encoding).{(' Wall-clock end to end: about ' + str(info['wall_clock_minutes']) + ' min (' + info.get('wall_clock_note', '') + ').') if info.get('wall_clock_minutes') else ''}{' The U-Net stage was stopped at a checkpoint to leave time for the evaluation and its EMA weights were exported (`--export-only`); `--unet-steps ' + str(info.get('unet_steps')) + '` reproduces it.' if info.get('stopped_early') else ''}

Progress checks during training (24 fixed prompts, 1 seed, fraction right: background / object / shape;
these were decoded with the VAE before its decoder fine-tuning and read with the first, corner-heavy
version of the shape rule, which called many slightly rounded squares circles, so shape is understated):

| step | minutes | seen (16 prompts) | held-out (8 prompts) |
|---|---|---|---|
{hist_lines}

## Evaluation

Backend: {r['backend']}; Euler, {STEPS} steps, guidance {GUIDANCE}, 64x64, seeds 0..{r['seeds'] - 1} for every
combination, template captions. An image counts as right on a property when the pixel classifier
(`ldm_tools.train.world.classify`: background = nearest palette colour of the border pixels; object =
most common nearest palette colour of the other pixels; shape = nearest template of the bounding
box fill ratio and corner fill, circle ~0.785, square ~1.0, triangle ~0.5) reads it back.
The classifier is exact on rendered images; its shape rule lets the fill ratio dominate so that
slightly softened corners (as any VAE produces) still count, calibrated on renders passed through
the VAE (last row: the same classifier on 240 renders encoded and decoded by the shipped VAE,
i.e. the ceiling for the diffusion model).

{table}

Speed: one 64x64 image with 20 steps (guidance 7.5, so 40 U-Net evaluations) takes
{r['sec_one_image_20_steps']:.2f} s on this 2-core CPU; {r['sec_per_image_batched']:.3f} s per image when
generating {r['seeds']} at a time. Evaluation took {r['eval_minutes']:.1f} min.

Known weaknesses: the remaining shape errors are mostly squares drawn with rounded corners or
slightly distorted (read as circles/triangles); a few images carry a thin fringe of a third colour along
the frame or an edge (the stray-blob count, `python -m ldm_tools.eval speck`, is in `docs/demo-addons.md`;
the VAE's per-channel GroupNorm put a blob on most images until round 7). The inpainting row is this
regular (4-channel) model, which inpaints by blending the original's latents back outside the mask after every step: the repainted
object is often small or blotchy inside the box; pixels outside the mask are pasted back exactly.
Its 9-channel inpainting variant, `weights/demo-inpaint`, and its figures: `docs/demo-addons.md`.

Add-ons made for this model (the LoRA `outline`, a ControlNet trainer), their recipes and figures, and the
stray-blob ("speck") measurement: `docs/demo-addons.md`.

Held-out failures (first 20):

{fail_lines or '- none'}
"""
