"""What the demo add-on trainers (LoRA, ControlNet, inpainting) share: the frozen demo model's parts,
world renders encoded to latents, the training noise schedule, captions, and a resumable step loop.

Every trainer fine-tunes on top of `weights/demo` with the noise schedule and loss weighting the demo
U-Net was trained with (epsilon prediction, scaled-linear betas, min-SNR-5, offset noise 0.15), so its
add-on sees the same task the base model learnt.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import world as W
from .threads import ThreadGovernor

MIN_SNR_GAMMA = 5.0
OFFSET_NOISE = 0.15
CAPTION_DROPOUT = 0.1


@dataclass
class DemoParts:
    vae: object
    text_encoder: object
    tokenizer: object
    unet: object
    scheduler_config: dict


def load_demo(model_dir: str | Path = "weights/demo") -> DemoParts:
    """The demo model's components, frozen, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = Path(model_dir)
    parts = DemoParts(AutoencoderKL.from_pretrained(d / "vae"), CLIPTextModel.from_pretrained(d / "text_encoder"),
                      CLIPTokenizer.from_pretrained(d / "tokenizer"), UNet2DConditionModel.from_pretrained(d / "unet"),
                      dict(__import__("json").loads((d / "scheduler" / "scheduler_config.json").read_text())))
    for m in (parts.vae, parts.text_encoder, parts.unet):
        m.requires_grad_(False)
        m.eval()
    return parts


def to_unit(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    t = torch.as_tensor(images_u8)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode(vae, images_u8) -> torch.Tensor:
    """Scaled latent means (what the U-Net was trained on), float16 to keep the data set small."""
    out = [vae.encode(to_unit(images_u8[i:i + 256])).latent_dist.mean for i in range(0, len(images_u8), 256)]
    return (torch.cat(out) * vae.config.scaling_factor).half()


class Noise:
    """The demo model's training noise schedule and min-SNR loss weights."""

    def __init__(self, cfg: dict):
        from diffusers import DDPMScheduler

        s = DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                          beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"])
        self.alphas = s.alphas_cumprod.float()
        snr = self.alphas / (1 - self.alphas)
        self.weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
        self.n = len(self.alphas)

    def sample(self, x0: torch.Tensor, gen: torch.Generator):
        """(noisy latents, noise, timesteps) for clean latents x0."""
        noise = torch.randn(x0.shape, generator=gen)
        noise = noise + OFFSET_NOISE * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, self.n, (x0.shape[0],), generator=gen)
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t

    def loss(self, pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * self.weight[t]).mean()


class Captions:
    """Token ids of the world's caption variants per combo; `dropout` of them become "" (for CFG)."""

    def __init__(self, tokenizer, combos: list[tuple[str, str, str]]):
        self.variants = [W.caption_variants(*c) for c in combos]
        flat = sorted({v for vs in self.variants for v in vs} | {""})
        ids = tokenizer(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        self.ids = {s: ids[i] for i, s in enumerate(flat)}

    def batch(self, combo_idx: torch.Tensor, gen: torch.Generator, dropout: float = CAPTION_DROPOUT) -> torch.Tensor:
        r = torch.rand(len(combo_idx), generator=gen).tolist()
        v = torch.randint(0, 1 << 30, (len(combo_idx),), generator=gen).tolist()
        return torch.stack([self.ids[""] if ri < dropout else self.ids[vs[vi % len(vs)]]
                            for ri, vi, vs in zip(r, v, (self.variants[i] for i in combo_idx.tolist()))])


def start_from(module, folder: str | Path) -> None:
    """Load a trained add-on's weights (a diffusers model folder) into `module`: the start of a fine-tune onto
    a new base model (e.g. the demo model with a new VAE), shorter than training the add-on again."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(Path(folder) / "diffusion_pytorch_model.safetensors"))


def start_work(work_dir: str | Path, resume: bool, seed: int, model: str | Path) -> tuple[Path, DemoParts]:
    """The run's work folder (refusing to overwrite another run's checkpoints unless resuming), torch seeded,
    and the frozen demo model."""
    work = Path(work_dir)
    if work.exists() and any(work.glob("*_ckpt.pt")) and not resume:
        raise FileExistsError(f"{work} already holds checkpoints; pass --resume to continue or remove it")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return work, load_demo(model)


def render_set(n: int, seed: int, **render_kw) -> tuple[np.ndarray, np.ndarray]:
    """n world renders ([n, H, W, 3] uint8) cycling through the training combinations, and each one's
    combination index; `render_kw` goes to `world.render` (e.g. outline=)."""
    combos = W.train_combos()
    rng = np.random.default_rng(seed)
    images = np.empty((n, W.IMAGE_SIZE, W.IMAGE_SIZE, 3), dtype=np.uint8)
    idx = np.empty(n, dtype=np.int64)
    for i in range(n):
        idx[i] = i % len(combos)
        images[i] = W.render(W.random_scene(rng, combos[idx[i]]), **render_kw)
    return images, idx


def log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cached(path: Path, make: Callable[[], dict]) -> dict:
    """torch.load(path), or make() and save it there (renders and latents survive a restart)."""
    if path.exists():
        return torch.load(path)
    d = make()
    save_atomic(d, path)
    return d


def train_steps(work: Path, name: str, steps: int, minutes: float, modules: dict, opt, gen: torch.Generator,
                step_fn: Callable[[int], torch.Tensor], ckpt_every: int = 100, log_every: int = 25,
                after_step: Callable[[int], None] | None = None) -> dict:
    """Run `step_fn(step) -> loss` (forward + backward; this does the optimiser step) until `steps`, or
    `minutes` of training time (0 = no limit), checkpointing `modules`' state, the optimiser and the
    generator every `ckpt_every` steps to `work/<name>_ckpt.pt`; resumes from there. `after_step(step)`
    runs after each optimiser step (e.g. an EMA update; an EMA module belongs in `modules`). Returns
    {"steps", "minutes"}."""
    path = work / f"{name}_ckpt.pt"
    step, elapsed = 0, 0.0
    if path.exists():
        ck = torch.load(path, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed = ck["step"], ck["elapsed"]
        log(work, f"{name}: resumed at step {step} ({elapsed / 60:.1f} min)")
    gov = ThreadGovernor(2)
    t0 = time.time() - elapsed
    run_loss = None
    params = [p for g in opt.param_groups for p in g["params"]]

    def time_up() -> bool:
        return minutes > 0 and (time.time() - t0) / 60 >= minutes

    while step < steps and not time_up():
        gov.update()
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if after_step is not None:
            after_step(step)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if step % log_every == 0:
            log(work, f"{name} step {step}/{steps} loss {run_loss:.4f} ({(time.time() - t0) / 60:.1f} min, "
                      f"threads {gov.threads}, others {gov.others:.2f})")
        if step % ckpt_every == 0 or step == steps or time_up():
            save_atomic({**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                         "gen": gen.get_state(), "step": step, "elapsed": time.time() - t0}, path)
    log(work, f"{name}: stopped at step {step} after {(time.time() - t0) / 60:.1f} min")
    return {"steps": step, "minutes": round((time.time() - t0) / 60, 1)}
