"""Evaluate the demo canny ControlNet (``python -m ldm_tools.eval controlnet``).

Each case: a template prompt for a random combination, and a control picture of an independent random
scene (its own shape, size and position, drawn in other colours), given to a ControlNet unit with the
"canny" preprocessor, as a user would in the app. The generated object's mask (pixels whose nearest
palette colour is not the background's) is compared with the control scene's shape mask by IoU; the
same prompts and seeds without ControlNet give the baseline. Target: mean IoU >= 0.7 over 50 cases.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..train import world as W

STEPS, GUIDANCE = 20, 7.5


def cases(n: int, seed: int = 0):
    """n (prompt combo, control scene) pairs; the control scene's colours differ from the prompt's."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    out = []
    for combo in rnd.choices(W.all_combos(), k=n):
        shape = rnd.choice(W.SHAPES)
        obj, bg = rnd.sample([c for c in W.COLOURS if c not in (combo[0], combo[2])], 2)
        out.append((combo, W.random_scene(rng, (obj, shape, bg))))
    return out


def object_mask(image) -> np.ndarray:
    """Pixels whose nearest palette colour is not the background's."""
    arr = np.asarray(image.convert("RGB"))
    return W.palette_labels(arr) != W.COLOURS.index(W.classify(arr).bg)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def run(model: str = "weights/demo", controlnet: str = "weights/demo-models/ControlNet/demo-canny", n: int = 50,
        grid: str | None = "docs/images/demo-controlnet.png") -> dict:
    import ldm

    t0 = time.time()
    torch.set_num_threads(1)  # as the demo evaluation: 2-thread torch collapses when the 2 cores are shared
    pipe = ldm.load(model)
    net = ldm.load_controlnet(controlnet, base=pipe)
    kw = dict(negative_prompt="", width=64, height=64, steps=STEPS, guidance_scale=GUIDANCE, sampler="Euler")
    rows, ious, base_ious, colour = [], [], [], 0
    for i, (combo, scene) in enumerate(cases(n)):
        control = Image.fromarray(W.render(scene))
        target = W.shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
        unit = ldm.ControlUnit(net, control, preprocessor="canny")
        img = pipe.txt2img(W.caption(*combo), seed=i, control=[unit], **kw).images[0]
        plain = pipe.txt2img(W.caption(*combo), seed=i, **kw).images[0]
        ious.append(iou(object_mask(img), target))
        base_ious.append(iou(object_mask(plain), target))
        colour += W.classify(img).obj == combo[0]
        if len(rows) < 8:
            rows.append((unit.validate().control_map(64, 64), img, plain))
    res = {"n": n, "iou": float(np.mean(ious)), "iou_ge_0.7": float(np.mean(np.array(ious) >= 0.7)),
           "baseline_iou": float(np.mean(base_ious)), "colour": colour / n, "minutes": (time.time() - t0) / 60}
    print(f"ControlNet {controlnet}: {n} cases, mean IoU {res['iou']:.3f} (target >= 0.7), cases with IoU >= 0.7 "
          f"{res['iou_ge_0.7']:.0%}; without ControlNet mean IoU {res['baseline_iou']:.3f}; object colour as "
          f"prompted {res['colour']:.0%}; {res['minutes']:.1f} min")
    if grid:
        save_grid(rows, Path(grid))
    return res


def save_grid(rows, path: Path, scale: int = 2) -> None:
    """Columns = cases; rows = control map, with ControlNet, without."""
    img = Image.fromarray(np.concatenate([np.concatenate([np.asarray(r[j].convert("RGB")) for r in rows], 1)
                                          for j in range(3)], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
