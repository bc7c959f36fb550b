"""Fine-tune the demo VAE's decoder against the stray blob ("speck", issue 21 item 1).

    python -m ldm_tools.train vae-decoder [--out weights/demo/vae] [--steps N] [--minutes M] [--resume]

Only the decoder (and post_quant_conv) train; the encoder is frozen, so the latent space, and with it the
demo U-Net and every add-on trained on its latents (LoRA, ControlNet, inpainting, x4), stays valid.

Why a penalty and not just more reconstruction: the shipped decoder already reconstructs renders well on
average (L1 + MSE), yet paints a small blob of a third colour on about half of them, and more on the
U-Net's latents, which lie a little off the encoder's. Every world image holds only the background's and
the object's colours and blends of the two (anti-aliased edges), so any pixel far from the segment between
those two palette colours is a speck by definition. The loss adds that distance for
(a) world renders through the frozen encoder (plus latent noise), where the two colours are the scene's, and
(b) latents the demo U-Net generated for training-combination prompts (no held-out combination, seeds apart
from the evaluation's), where the two colours are the ones `world.classify` reads on the shipped decoder's
output, so the decoder learns to stay in the image's own colours, not to repaint it towards the prompt.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

from . import finetune as F
from . import world as W

PALETTE = torch.tensor([W.PALETTE[c] for c in W.COLOURS], dtype=torch.float32) / 127.5 - 1  # (8, 3) in [-1, 1]


@dataclass(frozen=True)
class DecoderConfig:
    seed: int = 0
    n_images: int = 8000  # world renders (training combinations)
    n_generated: int = 384  # U-Net latents for training prompts (the last `n_monitor` only monitor progress)
    n_monitor: int = 64
    steps: int = 1500
    minutes: float = 0.0
    batch: int = 32
    gen_batch: int = 16  # generated latents per step, next to the renders
    lr: float = 5e-4
    latent_noise: float = 0.1  # scaled-latent units: robustness to latents a little off the encoder's
    # A speck is a few pixels of 4096: averaged plainly, their distance is lost next to the reconstruction
    # loss (a first run with weight 1 and no margin left the speck rate unchanged after 250 steps), so only
    # the excess over `margin` counts (blur off the segment is not a speck) and it is weighted up.
    margin: float = 0.15  # [-1, 1] units (19/255); the speck counter's threshold is 60/255
    palette_weight: float = 50.0
    generated_weight: float = 50.0
    gen_seed: int = 100_000  # the speck evaluation uses seeds 0..199


def segment_distance(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel distance of images x (N, 3, H, W) in [-1, 1] from the colour segment a-b ((N, 3) each)."""
    a, b = a[:, :, None, None], b[:, :, None, None]
    d = b - a
    t = ((x - a) * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True).clamp_min(1e-6)
    return (x - (a + t.clamp(0, 1) * d)).norm(dim=1)


@torch.no_grad()
def generate_latents(model: str, combos: list, n: int, seed: int) -> tuple[torch.Tensor, list]:
    """n scaled latents from the demo U-Net (Euler 20 steps, guidance 7.5, as the evaluation), 4 seeds per
    prompt, and each one's combination."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    out, used = [], []
    for i in range(0, n, 4):
        c = rng.choice(combos)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(4)]
        out.append(pipe(W.caption(*c), num_images_per_prompt=4, generator=gens, num_inference_steps=20,
                        guidance_scale=7.5, height=64, width=64, output_type="latent").images)
        used += [c] * 4
    return torch.cat(out)[:n], used[:n]


@torch.no_grad()
def decode_u8(vae, scaled: torch.Tensor) -> np.ndarray:
    out = [vae.decode(scaled[i:i + 64].float() / vae.config.scaling_factor).sample for i in range(0, len(scaled), 64)]
    return ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def make_data(cfg: DecoderConfig, parts: F.DemoParts, model: str) -> dict:
    combos = W.train_combos()
    images, idx = F.render_set(cfg.n_images, cfg.seed + 7)
    cols = {c: i for i, c in enumerate(W.COLOURS)}
    gen_lat, _ = generate_latents(model, combos, cfg.n_generated, cfg.gen_seed)
    # the two colours each generated image actually holds, read on the shipped decoder's output
    ks = [W.classify(im) for im in decode_u8(parts.vae, gen_lat)]
    return {"images": torch.from_numpy(images), "latents": F.encode(parts.vae, images),
            "pair": torch.tensor([[cols[combos[i][2]], cols[combos[i][0]]] for i in idx]),
            "gen_latents": gen_lat.half(),
            "gen_pair": torch.tensor([[cols[k.bg], cols[k.obj if k.obj is not None else k.bg]] for k in ks])}


def speck_rates(vae, data: dict, n: int) -> tuple[float, float]:
    """(renders through the VAE, monitor generated latents): fraction of images with a speck."""
    from ..eval.speck import has_speck  # the evaluator's own definition of a speck

    rt = decode_u8(vae, data["latents"][-n:])
    gen = decode_u8(vae, data["gen_latents"][-n:])
    return float(np.mean([has_speck(im) for im in rt])), float(np.mean([has_speck(im) for im in gen]))


def train_decoder(out: str | Path = "weights/demo/vae", work_dir: str | Path = "runs/vae-decoder",
                  cfg: DecoderConfig | None = None, model: str = "weights/demo", resume: bool = False,
                  export_only: bool = False) -> dict:
    cfg = cfg or DecoderConfig()
    work, parts = F.start_work(work_dir, resume, cfg.seed, model)
    data = F.cached(work / "data.pt", lambda: make_data(cfg, parts, model))
    vae = parts.vae
    scale = vae.config.scaling_factor
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    n_train = len(data["images"]) - cfg.n_monitor  # the last n_monitor renders and latents only monitor
    n_gen = len(data["gen_latents"]) - cfg.n_monitor
    if not resume:
        F.log(work, "decoder: before: specks renders-through-VAE / generated (monitor sets) %.3f / %.3f"
              % speck_rates(vae, data, cfg.n_monitor))

    def step(i: int) -> torch.Tensor:
        vae.decoder.train()
        idx = torch.randint(0, n_train, (cfg.batch,), generator=gen)
        x = F.to_unit(data["images"][idx])
        z = data["latents"][idx].float()
        z = z + cfg.latent_noise * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z / scale).sample
        pair = data["pair"][idx]
        loss = TF.mse_loss(rec, x) + TF.l1_loss(rec, x)
        off = segment_distance(rec, PALETTE[pair[:, 0]], PALETTE[pair[:, 1]])
        loss = loss + cfg.palette_weight * (off - cfg.margin).relu().mean()
        if cfg.generated_weight:
            g = torch.randint(0, n_gen, (cfg.gen_batch,), generator=gen)
            gp = data["gen_pair"][g]
            img = vae.decode(data["gen_latents"][g].float() / scale).sample
            off = segment_distance(img, PALETTE[gp[:, 0]], PALETTE[gp[:, 1]])
            loss = loss + cfg.generated_weight * (off - cfg.margin).relu().mean()
        if (i + 1) % 250 == 0:
            with torch.no_grad():
                vae.decoder.eval()
                F.log(work, "decoder step %d: specks renders-through-VAE / generated (monitor) %.3f / %.3f"
                      % ((i + 1,) + speck_rates(vae, data, cfg.n_monitor)))
        return loss

    modules = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    if export_only:
        ck = torch.load(work / "decoder_ckpt.pt", weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        res = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1)}
    else:
        res = F.train_steps(work, "decoder", cfg.steps, cfg.minutes, modules, opt, gen, step)
    vae.eval().requires_grad_(False)
    res["specks_roundtrip"], res["specks_generated"] = speck_rates(vae, data, cfg.n_monitor)
    save(Path(out), vae, cfg, res)
    F.log(work, f"decoder: wrote {out}: {json.dumps(res)}")
    return res


def save(out: Path, vae, cfg: DecoderConfig, res: dict) -> None:
    """The whole VAE (encoder unchanged) as a diffusers folder; the config is the one it was loaded with."""
    vae.save_pretrained(out, safe_serialization=True)
    conf = json.loads((out / "config.json").read_text())
    conf.pop("_name_or_path", None)  # where it was loaded from this time: not part of the model
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "decoder_training.json").write_text(json.dumps({"config": asdict(cfg), **res}, indent=1) + "\n")
