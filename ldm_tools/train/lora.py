"""Train the demo LoRA `outline`: shapes drawn as a hollow rim (`world.render(..., outline=world.rim_width)`: 5
pixels, 3 on triangles under 34 pixels), on top of
the frozen demo model, saved in the kohya / A1111 format (`lora_unet_<module path with "_">.lora_down.weight`,
`.lora_up.weight`, `.alpha`), which `ldm.lora` (and A1111) read.

    python -m ldm_tools.train lora [--out weights/demo-models/Lora/outline.safetensors] [--steps N] [--resume]
        [--init an earlier outline.safetensors to continue from]

The captions are the world's ordinary ones (no trigger word): applying the LoRA is what turns the style on.
LoRA layers sit on every attention projection, the transformer blocks' proj_in/proj_out and feed-forward
layers, and (LoCon-style, 3x3) on the ResNet convolutions, because the 16x16 latent level where a 5-pixel
rim lives has no attention block in the demo U-Net. The text encoder is left alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import finetune as F
from . import world as W


@dataclass(frozen=True)
class LoraConfig:
    seed: int = 0
    rank: int = 8
    alpha: float = 8.0
    n_images: int = 8000
    steps: int = 1200
    minutes: float = 0.0
    batch: int = 32
    lr: float = 2e-3
    init: str = ""  # a kohya LoRA file of the same layers and rank to start from ("" = from zero)


TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


class LoraLayer(nn.Module):
    """base(x) + alpha/rank * up(down(x)); `up` starts at zero so training starts from the base model."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def add_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoraLayer]:
    """Wrap every target module of the U-Net in place; returns {module path: LoraLayer}."""
    found = {name: m for name, m in unet.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in TARGETS)}
    layers = {}
    for name, module in found.items():
        parent_name, _, attr = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        layer = LoraLayer(module, rank, alpha)
        if attr.isdigit():
            parent[int(attr)] = layer
        else:
            setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def kohya_state(layers: dict[str, LoraLayer], alpha: float) -> dict[str, torch.Tensor]:
    """The layers in kohya's key layout (conv down [r, in, kh, kw], up [out, r, 1, 1]; linear [r, in], [out, r])."""
    out = {}
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.down.weight.detach().contiguous().clone()
        out[f"{key}.lora_up.weight"] = layer.up.weight.detach().contiguous().clone()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def save(path: Path, layers: dict[str, LoraLayer], cfg: LoraConfig, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state(layers, cfg.alpha), str(path), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
        "ss_base_model_version": "sd_v1", "ss_output_name": path.stem,
        "ldm_training": json.dumps({"config": asdict(cfg), **meta})})


def load_kohya(layers: dict[str, LoraLayer], path: str | Path) -> None:
    """Set the layers' weights from a file `save` wrote (the inverse of `kohya_state`)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    with torch.no_grad():
        for name, layer in layers.items():
            key = "lora_unet_" + name.replace(".", "_")
            layer.down.weight.copy_(sd[f"{key}.lora_down.weight"])
            layer.up.weight.copy_(sd[f"{key}.lora_up.weight"])


def make_data(cfg: LoraConfig, parts: F.DemoParts) -> dict:
    images, idx = F.render_set(cfg.n_images, cfg.seed, outline=W.rim_width)
    return {"latents": F.encode(parts.vae, images), "combo": torch.from_numpy(idx)}


def train_lora(out: str | Path, work_dir: str | Path, cfg: LoraConfig, model: str = "weights/demo",
               resume: bool = False, export_only: bool = False) -> dict:
    work, parts = F.start_work(work_dir, resume, cfg.seed, model)
    data = F.cached(work / "data.pt", lambda: make_data(cfg, parts))
    layers = add_lora(parts.unet, cfg.rank, cfg.alpha)
    if cfg.init:
        load_kohya(layers, cfg.init)
    lora_params = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]
    for p in lora_params:
        p.requires_grad_(True)
    F.log(work, f"lora: {len(layers)} layers, rank {cfg.rank}, {sum(p.numel() for p in lora_params) / 1e6:.3f}M params")
    opt = torch.optim.AdamW(lora_params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = F.Noise(parts.scheduler_config)
    caps = F.Captions(parts.tokenizer, W.train_combos())
    lat, combo = data["latents"], data["combo"]
    holder = nn.ModuleDict({k.replace(".", "-"): nn.ModuleList([v.down, v.up]) for k, v in layers.items()})

    def step(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(lat), (cfg.batch,), generator=gen)
        xt, eps, t = noise.sample(lat[idx].float(), gen)
        with torch.no_grad():
            h = parts.text_encoder(caps.batch(combo[idx], gen))[0]
        return noise.loss(parts.unet(xt, t, encoder_hidden_states=h).sample, eps, t)

    if export_only:  # a snapshot of a run in progress: load its checkpoint, train nothing
        ck = torch.load(work / "lora_ckpt.pt", weights_only=False)
        holder.load_state_dict(ck["lora"])
        res = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1)}
    else:
        res = F.train_steps(work, "lora", cfg.steps, cfg.minutes, {"lora": holder}, opt, gen, step)
    save(Path(out), layers, cfg, res)
    F.log(work, f"lora: wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB)")
    return res
