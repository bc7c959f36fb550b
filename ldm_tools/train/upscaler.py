"""Train the demo x4 upscaler: a StableDiffusionUpscalePipeline-shaped model for the demo VAE. The U-Net
sees the latents plus the noised low-res image (3 extra input channels) and the low-res noise level as a
class label; the output is the low-res size times the VAE factor (4).

    python -m ldm_tools.train upscaler [--out weights/demo-upscaler] [--steps N] [--minutes M] [--resume]

Scale: 16 -> 64 px. The demo VAE decodes 64 px images (16x16 latents) well and nothing larger: decoding a
256 px render's own latents drifts flat areas' colours (PSNR 13-22 dB against the render, measured on four
renders), so a 64 -> 256 model would be judged through a decoder that cannot draw 256 px images. At
16 -> 64 every part works at the scale it was trained on: low-res = the 64 px render averaged over 4x4
blocks (what downscaling a picture gives), target = the render's latents.

Made from the demo U-Net (as the inpainting model is): conv_in widened by 3 zero channels and a zero class
embedding of the noise level (1000 classes as SD's x4 upscaler), so step 0 is the text-to-image model and
training teaches it to follow the low-res image. Noise augmentation as SD's upscaler: the low-res image is
noised by a DDPM schedule (linear betas 1e-4..0.02) at a random level up to 350 (half the samples up to
50, as the app's default is 20). Text encoder, VAE and tokenizer are the demo's (linked, frozen).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as TF

from . import finetune as F
from . import world as W
from .inpaint import export, widen_conv_in

MAX_NOISE_LEVEL = 350
LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                     "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}


@dataclass(frozen=True)
class UpscalerConfig:
    seed: int = 0
    n_images: int = 8000
    steps: int = 1500
    minutes: float = 0.0
    batch: int = 32
    lr: float = 3e-4
    init: str = ""  # a trained add-on folder to start from (a fine-tune onto a new base model), "" = from the base


def downscale(images_u8) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 16, 16) in [-1, 1]: 4x4 block means, rounded to 8 bits like a saved image."""
    small = TF.avg_pool2d(torch.as_tensor(images_u8).permute(0, 3, 1, 2).float(), 4).round()
    return small.div(127.5).sub(1.0)


def train_upscaler(out: str | Path, work_dir: str | Path, cfg: UpscalerConfig, model: str = "weights/demo",
                   resume: bool = False, export_only: bool = False) -> dict:
    from diffusers import DDPMScheduler

    work, parts = F.start_work(work_dir, resume, cfg.seed, model)

    def make() -> dict:
        images, idx = F.render_set(cfg.n_images, cfg.seed + 30)
        return {"latents": F.encode(parts.vae, images), "low": downscale(images).half(), "combo": torch.from_numpy(idx)}

    data = F.cached(work / "data.pt", make)
    lat, low, combo = data["latents"], data["low"], data["combo"]
    unet = widen_conv_in(parts.unet, 3, num_class_embeds=1000)
    if cfg.init:
        F.start_from(unet, Path(cfg.init) / "unet")
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = F.Noise(parts.scheduler_config)
    low_noise = DDPMScheduler.from_config(LOW_RES_SCHEDULER)
    caps = F.Captions(parts.tokenizer, W.train_combos())

    def step(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(lat), (cfg.batch,), generator=gen)
        top = torch.where(torch.rand(cfg.batch, generator=gen) < 0.5, 51, MAX_NOISE_LEVEL + 1)
        level = (torch.rand(cfg.batch, generator=gen) * top).long()
        image = low_noise.add_noise(low[idx].float(), torch.randn(low[idx].shape, generator=gen), level)
        with torch.no_grad():
            h = parts.text_encoder(caps.batch(combo[idx], gen))[0]
        xt, eps, t = noise.sample(lat[idx].float(), gen)
        pred = unet(torch.cat([xt, image], dim=1), t, encoder_hidden_states=h, class_labels=level).sample
        return noise.loss(pred, eps, t)

    if export_only:  # a snapshot of a run in progress
        ck = torch.load(work / "upscaler_ckpt.pt", weights_only=False)
        unet.load_state_dict(ck["unet"])
        res = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1)}
    else:
        res = F.train_steps(work, "upscaler", cfg.steps, cfg.minutes, {"unet": unet}, opt, gen, step)
    out = Path(out)
    export(unet, out, model, {"config": asdict(cfg), **res}, "StableDiffusionUpscalePipeline",
           max_noise_level=MAX_NOISE_LEVEL, low_res_scheduler=["diffusers", "DDPMScheduler"])
    (out / "low_res_scheduler").mkdir(exist_ok=True)
    (out / "low_res_scheduler" / "scheduler_config.json").write_text(json.dumps(LOW_RES_SCHEDULER, indent=2) + "\n")
    F.log(work, f"upscaler: wrote {out}")
    return res
