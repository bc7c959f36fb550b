"""Trainer for the bundled demo model (a tiny Stable-Diffusion-style LDM on the shapes world).

Stages (each one checkpointed under ``work_dir`` so an interrupted run resumes):

1. render the training images once into a uint8 tensor (training combos only);
2. train a small ``AutoencoderKL`` (factor 4: 64x64x3 -> 16x16x4), set its
   ``scaling_factor`` to 1/std of the latents, encode every image once;
3. train a small ``UNet2DConditionModel`` together with a ``CLIPTextModel``
   trained from scratch (epsilon prediction, min-SNR-5 weighting, EMA, 10%
   caption dropout for classifier-free guidance), checking prompt-following on
   a handful of prompts every few hundred steps;
4. export a diffusers ``StableDiffusionPipeline`` folder.

Everything is a function of ``DemoConfig``; nothing runs at import time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world as W
from .threads import ThreadGovernor

REPO_ROOT = Path(__file__).resolve().parents[2]  # ldm_tools/train/demo.py -> repo root
TOKENIZER_DIR = REPO_ROOT / "ldm" / "configs" / "clip-tokenizer"


@dataclass
class DemoConfig:
    seed: int = 0
    n_images: int = 40_000
    # VAE
    vae_channels: tuple = (16, 32, 64)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # Latent channels. 4 (SD's) leaves a border cell 4 numbers for 16 pixels showing two colours and an edge:
    # the shipped 4-channel VAE paints a stray third colour at some edges (the "speck", issue 21).
    vae_latent_channels: int = 4
    # GroupNorm groups in the VAE. 16 on 16 channels is a per-channel norm, which maps any flat colour to the
    # same zero: the shipped VAE (16) keeps colours by painting a small bright spot into its features, whose
    # statistics the flat areas are normalised against, and that spot shows as the speck (StyleGAN2's
    # "droplet"). Fewer groups let a flat colour survive as a pattern across the channels of a group.
    vae_norm_groups: int = 16
    decoder_steps: int = 1000  # decoder-only fine-tuning on the frozen encoder's latents (sharper edges)
    decoder_lr: float = 5e-4
    decoder_latent_noise: float = 0.1  # in scaled-latent units, for robustness to generated latents
    # text encoder
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 256
    # U-Net
    unet_channels: tuple = (32, 64, 128)
    unet_heads: int = 4
    unet_steps: int = 5500
    unet_minutes: float = 0.0  # > 0: also stop the U-Net stage after this many minutes (shared CPU)
    batch: int = 32
    unet_lr: float = 6e-4
    text_lr: float = 1.5e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # Offset noise: add s * N(0, 1) per (sample, channel) to the training noise.  On a 16x16 latent the
    # spatial mean of pure noise is tiny (std 1/16), so without it the noisy latent leaks the background
    # colour even at t=999 and the model ignores the prompt for it.  Enabled from ``offset_noise_start``
    # (the shipped run switched it on at step 1250, after its 1000-step check showed the problem).
    offset_noise: float = 0.15
    offset_noise_start: int = 1250
    caption_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # bookkeeping
    check_every: int = 500
    ckpt_every: int = 250
    threads: int = 2
    fp16_export: bool = False
    # A new VAE for an existing demo model: `init_vae` (a diffusers AutoencoderKL folder) replaces stages 2's
    # training (its scaling_factor is kept, so latents near the old VAE's stay near the old scale), and
    # `init_model` starts the U-Net, the text encoder and their EMA from that model instead of from scratch,
    # so the U-Net only has to learn what the new latents change.
    init_vae: str = ""
    init_model: str = ""


# ----------------------------------------------------------------------------
# model builders


def build_vae(cfg: DemoConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.vae_latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=W.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(cfg: DemoConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    tcfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_ffn,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(tcfg)


def build_unet(cfg: DemoConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.vae_latent_channels,
        out_channels=cfg.vae_latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=ch,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=16,
    )


def build_scheduler_config(cfg: DemoConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def load_tokenizer(path=TOKENIZER_DIR):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def make_pipeline(vae, text_encoder, tokenizer, unet, cfg: DemoConfig):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    sched = EulerDiscreteScheduler.from_config(build_scheduler_config(cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------
# helpers


def _log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _warmup_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


CHECK_PROMPTS_N = 24


def check_prompts(seed: int = 0, n: int = CHECK_PROMPTS_N):
    """A fixed handful of (combo, held_out) pairs for progress checks: 2/3 seen, 1/3 held out."""
    rng = random.Random(seed)
    held = W.holdout_combos()
    seen = W.train_combos()
    n_h = n // 3
    return [(c, False) for c in rng.sample(seen, n - n_h)] + [(c, True) for c in rng.sample(held, n_h)]


@torch.no_grad()
def quick_check(pipe, prompts, seed: int = 0, steps: int = 20, guidance: float = 7.5) -> dict:
    caps = [W.caption(*c) for c, _ in prompts]
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(caps))]
    out = pipe(caps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=64, width=64)
    res = {"seen": [0, 0, 0, 0], "held": [0, 0, 0, 0]}
    for img, (c, h) in zip(out.images, prompts):
        k = W.classify(img)
        r = res["held" if h else "seen"]
        r[0] += k.bg == c[2]
        r[1] += k.obj == c[0]
        r[2] += k.shape == c[1]
        r[3] += 1
    return {k: tuple(round(x / max(1, v[3]), 2) for x in v[:3]) for k, v in res.items()}, out.images


def _save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


# ----------------------------------------------------------------------------
# stages


def stage_data(cfg: DemoConfig, work: Path) -> dict:
    path = work / "data.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.time()
    combos = W.train_combos()
    images, scenes = W.generate_dataset(cfg.n_images, seed=cfg.seed, combos=combos)
    index = {c: i for i, c in enumerate(W.all_combos())}
    data = {
        "images": torch.from_numpy(images),
        "combo": torch.tensor([index[s.combo] for s in scenes], dtype=torch.int16),
    }
    _save_atomic(data, path)
    _log(work, f"data: rendered {cfg.n_images} images over {len(combos)} training combos in {time.time() - t0:.0f}s")
    return data


def stage_vae(cfg: DemoConfig, work: Path, images: torch.Tensor):
    from tqdm.auto import tqdm

    if cfg.init_vae:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(cfg.init_vae)
    done = work / "vae_done.pt"
    vae = build_vae(cfg)
    if done.exists():
        vae.load_state_dict(torch.load(done)["vae"])
        return vae
    ckpt_path = work / "vae_ckpt.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed = ck["step"], ck["elapsed"]
        _log(work, f"vae: resumed at step {step}")
    vae.train()
    t0 = time.time() - elapsed
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", dynamic_ncols=True)
    gov = ThreadGovernor(cfg.threads)
    while step < cfg.vae_steps:
        gov.update()
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = _to_unit(images[idx])
        lr = cfg.vae_lr * _warmup_factor(step, 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.vae_kl_weight * kl * z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{rec_loss.item():.4f}", thr=gov.threads)
        if step % 100 == 0:
            _log(work, f"vae step {step} rec {rec_loss.item():.5f} kl/dim {kl.item():.3f} "
                       f"({(time.time() - t0) / 60:.1f} min, threads {gov.threads}, others {gov.others:.2f})")
        if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
            _save_atomic(
                {"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                 "elapsed": time.time() - t0},
                ckpt_path,
            )
    bar.close()
    _save_atomic({"vae": vae.state_dict(), "elapsed": time.time() - t0}, done)
    _log(work, f"vae: done in {time.time() - t0:.0f}s")
    return vae


@torch.no_grad()
def stage_latents(cfg: DemoConfig, work: Path, vae, images: torch.Tensor) -> torch.Tensor:
    path = work / "latents.pt"
    if path.exists():
        d = torch.load(path)
        vae.register_to_config(scaling_factor=d["scaling_factor"])
        return d["latents"]
    t0 = time.time()
    vae.eval()
    out = []
    for i in range(0, len(images), 256):
        out.append(vae.encode(_to_unit(images[i : i + 256])).latent_dist.mean)
    lat = torch.cat(out)
    std = lat.std().item()
    scaling = vae.config.scaling_factor if cfg.init_vae else 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    # reconstruction check with the classifier
    rec = vae.decode(lat[:256]).sample
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    all_c = W.all_combos()
    combos = [all_c[int(c)] for c in torch.load(work / "data.pt")["combo"][:256]]
    ok = [0, 0, 0]
    for im, c in zip(rec_u8, combos):
        k = W.classify(im)
        ok[0] += k.bg == c[2]
        ok[1] += k.obj == c[0]
        ok[2] += k.shape == c[1]
    _save_atomic({"latents": (lat * scaling).half(), "scaling_factor": scaling}, path)
    _log(work, f"latents: {tuple(lat.shape)} mean {lat.mean().item():.3f} std {std:.3f} -> scaling_factor "
               f"{scaling:.4f}; VAE recon classifier acc bg/obj/shape {[round(x / 256, 3) for x in ok]} "
               f"({time.time() - t0:.0f}s)")
    return (lat * scaling).half()


def stage_decoder(cfg: DemoConfig, work: Path, vae, images: torch.Tensor, latents: torch.Tensor):
    """Fine-tune only the decoder (and post_quant_conv) on the fixed latents.

    The encoder and hence the latents the U-Net learns are unchanged, so this stage
    is independent of the U-Net stage.
    """
    from tqdm.auto import tqdm

    done = work / "decoder_done.pt"
    if done.exists():
        vae.load_state_dict(torch.load(done)["vae"])
        return vae
    if cfg.decoder_steps <= 0 or cfg.init_vae:
        return vae
    ckpt_path = work / "decoder_ckpt.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed = ck["step"], ck["elapsed"]
        _log(work, f"decoder: resumed at step {step}")
    scaling = vae.config.scaling_factor
    vae.decoder.train()
    t0 = time.time() - elapsed
    gov = ThreadGovernor(cfg.threads)
    bar = tqdm(total=cfg.decoder_steps, initial=step, desc="decoder", dynamic_ncols=True)
    while step < cfg.decoder_steps:
        gov.update()
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = _to_unit(images[idx])
        z = latents[idx].float()
        z = z + cfg.decoder_latent_noise * torch.randn(z.shape, generator=gen)
        lr = cfg.decoder_lr * _warmup_factor(step, 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        rec = vae.decode(z / scaling).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", thr=gov.threads)
        if step % 100 == 0:
            _log(work, f"decoder step {step} loss {loss.item():.5f} ({(time.time() - t0) / 60:.1f} min, "
                       f"threads {gov.threads}, others {gov.others:.2f})")
        if step % cfg.ckpt_every == 0 or step == cfg.decoder_steps:
            _save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                          "elapsed": time.time() - t0}, ckpt_path)
    bar.close()
    vae.eval().requires_grad_(False)
    _save_atomic({"vae": vae.state_dict(), "elapsed": time.time() - t0}, done)
    _log(work, f"decoder: done in {time.time() - t0:.0f}s")
    return vae


class _Captions:
    """Pre-tokenised caption variants per combo (+ the empty prompt)."""

    def __init__(self, tokenizer):
        self.combos = W.all_combos()
        self.variants = [W.caption_variants(*c) for c in self.combos]
        flat = sorted({v for vs in self.variants for v in vs} | {""})
        ids = tokenizer(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        self.ids = {s: ids[i] for i, s in enumerate(flat)}

    def batch(self, combo_idx: torch.Tensor, gen: torch.Generator, dropout: float) -> torch.Tensor:
        rows = []
        r = torch.rand(len(combo_idx), generator=gen).tolist()
        v = torch.randint(0, 1 << 30, (len(combo_idx),), generator=gen).tolist()
        for ci, ri, vi in zip(combo_idx.tolist(), r, v):
            if ri < dropout:
                rows.append(self.ids[""])
            else:
                vs = self.variants[ci]
                rows.append(self.ids[vs[vi % len(vs)]])
        return torch.stack(rows)


def stage_unet(cfg: DemoConfig, work: Path, vae, latents: torch.Tensor, combo_idx: torch.Tensor, tokenizer):
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    latent_size = latents.shape[-1]
    unet = build_unet(cfg, latent_size)
    te = build_text_encoder(cfg)
    if cfg.init_model:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(cfg.init_model, subfolder="unet").state_dict())
        te.load_state_dict(CLIPTextModel.from_pretrained(cfg.init_model, subfolder="text_encoder").state_dict())
    ema_unet = build_unet(cfg, latent_size)
    ema_te = build_text_encoder(cfg)
    ema_unet.load_state_dict(unet.state_dict())
    ema_te.load_state_dict(te.state_dict())
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "base_lr": cfg.unet_lr},
            {"params": list(te.parameters()), "lr": cfg.text_lr, "base_lr": cfg.text_lr},
        ],
        betas=(0.9, 0.99),
        weight_decay=cfg.weight_decay,
    )
    noise_sched = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
    )
    alphas_cumprod = noise_sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_w = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR weighting for epsilon prediction
    caps = _Captions(tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    step, elapsed, history = 0, 0.0, []
    ckpt_path = work / "unet_ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck.get("history", [])
        _log(work, f"unet: resumed at step {step}")
    n_unet = sum(p.numel() for p in unet.parameters())
    n_te = sum(p.numel() for p in te.parameters())
    _log(work, f"unet: {n_unet / 1e6:.2f}M params, text encoder {n_te / 1e6:.2f}M params, latents {tuple(latents.shape)}")
    params = [p for p in list(unet.parameters()) + list(te.parameters())]
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    prompts = check_prompts(cfg.seed)
    unet.train()
    te.train()
    t0 = time.time() - elapsed
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet", dynamic_ncols=True)
    run_loss = None
    gov = ThreadGovernor(cfg.threads)
    def time_up() -> bool:
        return cfg.unet_minutes > 0 and (time.time() - t0) / 60 >= cfg.unet_minutes

    while step < cfg.unet_steps and not time_up():
        gov.update()
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx].float()
        ids = caps.batch(combo_idx[idx].long(), gen, cfg.caption_dropout)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.offset_noise > 0 and step >= cfg.offset_noise_start:
            noise = noise + cfg.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _warmup_factor(step, cfg.warmup)
        h = te(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=h).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * loss_w[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - d)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss:.4f}", thr=gov.threads)
        if step % 50 == 0:
            _log(work, f"unet step {step} loss {run_loss:.4f} ({(time.time() - t0) / 60:.1f} min, "
                       f"threads {gov.threads}, others {gov.others:.2f})")
        last = step == cfg.unet_steps or time_up()
        if step % cfg.check_every == 0 or last:
            ema_unet.eval()
            ema_te.eval()
            pipe = make_pipeline(vae, ema_te, tokenizer, ema_unet, cfg)
            acc, imgs = quick_check(pipe, prompts, seed=cfg.seed)
            _save_grid(imgs, work / f"check_{step:06d}.png")
            history.append({"step": step, "minutes": round((time.time() - t0) / 60, 1), **acc})
            _log(work, f"CHECK step {step}: seen bg/obj/shape {acc['seen']}  held-out {acc['held']}")
        if step % cfg.ckpt_every == 0 or last:
            _save_atomic(
                {"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                 "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "step": step, "elapsed": time.time() - t0, "history": history},
                ckpt_path,
            )
    bar.close()
    _log(work, f"unet: done, {step} steps in {(time.time() - t0) / 60:.1f} min")
    return ema_unet, ema_te, {"steps": step, "minutes": (time.time() - t0) / 60, "history": history}


# ----------------------------------------------------------------------------
# export


def canonical_text_encoder_keys(file: Path) -> None:
    """Rewrite a CLIP text encoder saved by transformers 5 (flattened keys: `embeddings.…`,
    `encoder.layers.…`) in the layout real SD checkpoints use (`text_model.…`), which every
    transformers release loads; older ones load the flattened keys as nothing, silently."""
    from safetensors.torch import load_file, save_file

    weights = load_file(file)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in weights.items()},
              file, metadata={"format": "pt"})


def export(out: Path, vae, text_encoder, tokenizer_dir: Path, unet, cfg: DemoConfig, meta: dict) -> None:
    from diffusers import EulerDiscreteScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if cfg.fp16_export else torch.float32
    for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        model.to(dtype).save_pretrained(str(d), safe_serialization=True)
        model.to(torch.float32)
    canonical_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    tok = out / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, tok / f.name)
    EulerDiscreteScheduler.from_config(build_scheduler_config(cfg)).save_pretrained(str(out / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), **meta}, indent=2, default=str) + "\n")


def train_demo(out: str | Path = "weights/demo", work_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None,
               resume: bool = False) -> Path:
    cfg = cfg or DemoConfig()
    work = Path(work_dir)
    if work.exists() and not resume and any(work.glob("*.pt")):
        raise FileExistsError(f"{work} already holds checkpoints; pass --resume to continue or remove it")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = stage_data(cfg, work)
    vae = stage_vae(cfg, work, data["images"])
    vae.eval().requires_grad_(False)
    latents = stage_latents(cfg, work, vae, data["images"])
    vae = stage_decoder(cfg, work, vae, data["images"], latents)
    vae.eval().requires_grad_(False)
    tokenizer = load_tokenizer()
    unet, te, meta = stage_unet(cfg, work, vae, latents, data["combo"], tokenizer)
    vae_minutes = torch.load(work / "vae_done.pt")["elapsed"] / 60 if (work / "vae_done.pt").exists() else 0.0
    if (work / "decoder_done.pt").exists():
        vae_minutes += torch.load(work / "decoder_done.pt")["elapsed"] / 60
    meta = {
        "vae_minutes": round(vae_minutes, 1),
        "unet_text_minutes": round(meta["minutes"], 1),
        "unet_steps": meta["steps"],
        "history": meta["history"],
        "scaling_factor": vae.config.scaling_factor,
        "params": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in te.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
        },
        "holdout_seed": W.HOLDOUT_SEED,
        "holdout": [list(c) for c in W.holdout_combos()],
    }
    export(Path(out), vae, te, TOKENIZER_DIR, unet, cfg, meta)
    _log(work, f"exported to {out} (this invocation {(time.time() - t0) / 60:.1f} min)")
    return Path(out)


def export_checkpoint(out: str | Path = "weights/demo", work_dir: str | Path = "runs/demo") -> Path:
    """Export the EMA weights of the latest U-Net checkpoint (for a run stopped early)."""
    work = Path(work_dir)
    cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in json.loads((work / "config.json").read_text()).items()})
    torch.set_num_threads(cfg.threads)
    vae = stage_vae(cfg, work, torch.empty(0))  # trained: loads vae_done.pt; or the init_vae
    if (work / "decoder_done.pt").exists():
        vae.load_state_dict(torch.load(work / "decoder_done.pt")["vae"])
    lat = torch.load(work / "latents.pt")
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    ck = torch.load(work / "unet_ckpt.pt", weights_only=False)
    unet = build_unet(cfg, lat["latents"].shape[-1])
    te = build_text_encoder(cfg)
    unet.load_state_dict(ck["ema_unet"])
    te.load_state_dict(ck["ema_te"])
    meta = {
        "vae_minutes": round(sum(torch.load(work / f)["elapsed"] for f in ("vae_done.pt", "decoder_done.pt")
                                 if (work / f).exists()) / 60, 1),
        "unet_text_minutes": round(ck["elapsed"] / 60, 1),
        "unet_steps": ck["step"],
        "history": ck.get("history", []),
        "scaling_factor": lat["scaling_factor"],
        "params": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in te.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
        },
        "holdout_seed": W.HOLDOUT_SEED,
        "holdout": [list(c) for c in W.holdout_combos()],
        "stopped_early": ck["step"] < cfg.unet_steps,
    }
    export(Path(out), vae, te, TOKENIZER_DIR, unet, cfg, meta)
    return Path(out)
