"""Train the demo canny ControlNet: a diffusers `ControlNetModel` made from the demo U-Net's encoder half
(`ControlNetModel.from_unet`, zero-initialised output convolutions, as the ControlNet paper), trained on
(Canny edges of a world render, its caption, its latents) with the demo U-Net frozen.

    python -m ldm_tools.train controlnet [--out weights/demo-models/ControlNet/demo-canny] [--steps N] [--resume]

The edge maps are made by the library's own canny preprocessor with its defaults (thresholds 100/200), so
a user's "canny" unit on a picture gives the map the model was trained on. A third of the captions are
dropped to "" (the ControlNet paper drops half) so the ControlNet learns to place the shape from the edges
alone; the conditioning embedding downsamples 4x (the demo VAE's factor), not SD's 8x.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import finetune as F
from . import world as W


@dataclass(frozen=True)
class ControlNetConfig:
    seed: int = 0
    n_images: int = 8000
    steps: int = 1500
    minutes: float = 0.0
    batch: int = 32
    lr: float = 5e-4
    caption_dropout: float = 0.3
    embedding_channels: tuple[int, ...] = (16, 32, 64)
    init: str = ""  # a trained add-on folder to start from (a fine-tune onto a new base model), "" = from the base


def edge_map(image_u8: np.ndarray) -> np.ndarray:
    """(H, W) uint8 canny edges, exactly as the app's "canny" preprocessor makes them."""
    from ldm.control_preprocess import get_preprocessor

    pre = get_preprocessor("canny")
    return pre.run(image_u8, **pre.resolve(None))


def make_data(cfg: ControlNetConfig, parts: F.DemoParts) -> dict:
    images, idx = F.render_set(cfg.n_images, cfg.seed + 10)
    edges = np.stack([edge_map(image) for image in images])
    return {"latents": F.encode(parts.vae, images), "edges": torch.from_numpy(edges > 127),
            "combo": torch.from_numpy(idx)}


def train_controlnet(out: str | Path, work_dir: str | Path, cfg: ControlNetConfig, model: str = "weights/demo",
                     resume: bool = False, export_only: bool = False) -> dict:
    from diffusers import ControlNetModel

    work, parts = F.start_work(work_dir, resume, cfg.seed, model)
    data = F.cached(work / "data.pt", lambda: make_data(cfg, parts))
    net = ControlNetModel.from_unet(parts.unet, conditioning_embedding_out_channels=cfg.embedding_channels)
    if cfg.init:
        F.start_from(net, cfg.init)
    net.train()
    F.log(work, f"controlnet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = F.Noise(parts.scheduler_config)
    caps = F.Captions(parts.tokenizer, W.train_combos())
    lat, edges, combo = data["latents"], data["edges"], data["combo"]

    def step(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(lat), (cfg.batch,), generator=gen)
        xt, eps, t = noise.sample(lat[idx].float(), gen)
        cond = edges[idx].float()[:, None].expand(-1, 3, -1, -1)  # [0, 1], white edges on black, RGB
        with torch.no_grad():
            h = parts.text_encoder(caps.batch(combo[idx], gen, cfg.caption_dropout))[0]
        down, mid = net(xt, t, encoder_hidden_states=h, controlnet_cond=cond, return_dict=False)
        pred = parts.unet(xt, t, encoder_hidden_states=h, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        return noise.loss(pred, eps, t)

    if export_only:  # a snapshot of a run in progress
        ck = torch.load(work / "controlnet_ckpt.pt", weights_only=False)
        net.load_state_dict(ck["controlnet"])
        res = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1)}
    else:
        res = F.train_steps(work, "controlnet", cfg.steps, cfg.minutes, {"controlnet": net}, opt, gen, step)
    out = Path(out)
    net.eval().save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), **res}, indent=2))
    F.log(work, f"controlnet: wrote {out}")
    return res
