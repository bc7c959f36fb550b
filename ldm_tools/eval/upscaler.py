"""Evaluate the demo x4 upscaler (``python -m ldm_tools.eval upscaler``) against Lanczos and bicubic.

Each case: a world render at 64 px (the high-res truth), its 16 px version (4x4 block means, as the trainer
makes them), upscaled back to 64 px. Two measures against the render:

* PSNR (dB) over the whole image;
* shape IoU: the object's pixels (nearer its colour than the background's) against the true shape, so a
  sharp edge in the wrong place does not count as a good one;
* edge width (px): the pixels within 4 px of the shape's boundary whose colour is more than 48 (RGB distance)
  from both the object's and the background's palette colour (blends, halos, ringing), divided by the
  boundary's length in pixels. A hard edge scores 0; a ramp k pixels wide about k.

Also the VAE round trip of the render itself (encode + decode), the ceiling for anything that draws
through the demo VAE.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..train import world as W
from ..train.upscaler import downscale

STEPS, GUIDANCE, NOISE_LEVEL = 20, 9.0, 20  # the Upscale tab's defaults (diffusers' guidance and noise level)


def cases(n: int, seed: int = 0) -> list[W.Scene]:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    return [W.random_scene(rng, combo) for combo in rnd.choices(W.all_combos(), k=n)]


def low_res(scene: W.Scene) -> Image.Image:
    small = downscale(W.render(scene)[None])[0]
    return Image.fromarray(small.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image border does not count as outside)."""
    p = np.pad(mask, 1, mode="edge")
    return mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])


def edge_width(image, scene: W.Scene, band: int = 4, tol: float = 48.0) -> float:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = W.shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
    edge = boundary(mask)
    near = W.dilate(edge, band)
    d_obj = np.linalg.norm(a - np.array(W.PALETTE[scene.obj], np.float32), axis=-1)
    d_bg = np.linalg.norm(a - np.array(W.PALETTE[scene.bg], np.float32), axis=-1)
    return float(((d_obj > tol) & (d_bg > tol) & near).sum() / max(1, edge.sum()))


def shape_iou(image, scene: W.Scene) -> float:
    """IoU of the pixels nearer the object's colour than the background's with the true shape (placement)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    obj = np.linalg.norm(a - np.array(W.PALETTE[scene.obj], np.float32), axis=-1) < \
        np.linalg.norm(a - np.array(W.PALETTE[scene.bg], np.float32), axis=-1)
    mask = W.shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
    return float((obj & mask).sum() / max(1, (obj | mask).sum()))


@torch.no_grad()
def vae_round_trip(vae, image: np.ndarray) -> Image.Image:
    from ..train.finetune import to_unit

    x = vae.decode(vae.encode(to_unit(image[None])).latent_dist.mean).sample[0]
    return Image.fromarray(x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy())


def run(model: str = "weights/demo-upscaler", n: int = 50, grid: str | None = "docs/images/demo-upscaler.png",
        guidance: float = GUIDANCE) -> dict:
    import ldm

    t0 = time.time()
    torch.set_num_threads(1)  # as the demo evaluation: 2-thread torch collapses when the 2 cores are shared
    pipe = ldm.load(model)
    methods = {
        "Lanczos": lambda s, low: low.resize((64, 64), Image.LANCZOS),
        "bicubic": lambda s, low: low.resize((64, 64), Image.BICUBIC),
        "demo x4 upscaler": lambda s, low: pipe.upscale(low, W.caption(*s.combo), steps=STEPS, guidance_scale=guidance,
                                                        noise_level=NOISE_LEVEL, seed=0).images[0],
        "(ceiling) the 64 px render through the VAE": lambda s, low: vae_round_trip(pipe.vae, W.render(s)),
    }
    scores = {k: ([], [], []) for k in methods}
    rows = []
    for scene in cases(n):
        hi, low = W.render(scene), low_res(scene)
        row = [low.resize((64, 64), Image.NEAREST), Image.fromarray(hi)]
        for name, fn in methods.items():
            out = fn(scene, low)
            scores[name][0].append(psnr(out, hi))
            scores[name][1].append(edge_width(out, scene))
            scores[name][2].append(shape_iou(out, scene))
            row.append(out)
        if len(rows) < 8:
            rows.append(row)
    res = {k: {"psnr": float(np.mean(p)), "edge_width": float(np.mean(e)), "iou": float(np.mean(o))}
           for k, (p, e, o) in scores.items()}
    up = scores["demo x4 upscaler"]
    res["beats_lanczos"] = {"psnr": float(np.mean(np.array(up[0]) > np.array(scores["Lanczos"][0]))),
                            "edge_width": float(np.mean(np.array(up[1]) < np.array(scores["Lanczos"][1])))}
    print(f"| 16 -> 64 px, {n} cases | edge width (px) | shape IoU | PSNR vs the 64 px render (dB) |")
    print("|---|---|---|---|")
    for name in methods:
        print(f"| {name} | {res[name]['edge_width']:.2f} | {res[name]['iou']:.3f} | {res[name]['psnr']:.2f} |")
    b = res["beats_lanczos"]
    print(f"upscaler better than Lanczos: PSNR in {b['psnr']:.0%} of cases, edge width in {b['edge_width']:.0%}; "
          f"the library's default sampler, {STEPS} steps, guidance {guidance}, noise level {NOISE_LEVEL}; "
          f"{(time.time() - t0) / 60:.1f} min")
    if grid:
        save_grid(rows, Path(grid))
    return res


def save_grid(rows, path: Path, scale: int = 2) -> None:
    """Columns = cases; rows = the 16 px input (nearest), the 64 px render, then each method."""
    img = Image.fromarray(np.concatenate([np.concatenate([np.asarray(r[j].convert("RGB")) for r in rows], 1)
                                          for j in range(len(rows[0]))], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
