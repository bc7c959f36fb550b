"""Evaluate the demo inpainting model (``python -m ldm_tools.eval inpaint``).

The cases and the judge are the demo evaluation's (``ldm_tools.eval.demo``: recolour the object of a world
render, its bounding box plus 2 pixels masked, the prompt naming a new object colour and the same shape and
background; right when the requested colour dominates the mask's non-background pixels, and unchanged when
99% of the pixels more than 6 from the mask are within 12/255 of the original). Both models run through
``ldm.load`` with the same settings and seeds: the 9-channel model and, as the baseline, the regular demo
model (which inpaints by blending the known area after every step).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .demo import inpaint_cases, inpaint_one, judge_inpaint


def evaluate(pipe, cases) -> tuple[dict, list]:
    colour = unchanged = both = 0
    images = []
    for i, (img, mask_img, prompt, target, mask, orig) in enumerate(cases):
        out = inpaint_one(pipe, img, mask_img, prompt, seed=i)
        c, u = judge_inpaint(out, orig, mask, target)
        colour, unchanged, both = colour + c, unchanged + u, both + (c and u)
        images.append(out)
    n = max(1, len(cases))
    return {"n": len(cases), "colour": 100 * colour / n, "unchanged": 100 * unchanged / n, "both": 100 * both / n}, images


def run(model: str = "weights/demo-inpaint", base: str = "weights/demo", n: int = 48,
        grid: str | None = "docs/images/demo-inpaint.png", seed: int = 0) -> dict:
    """`seed` draws the cases: 0 is the reported set; another seed gives fresh cases (a check that a model
    picked by its seed-0 figures is not just lucky on those 48)."""
    import ldm

    t0 = time.time()
    torch.set_num_threads(1)  # as the demo evaluation: 2-thread torch collapses when the 2 cores are shared
    cases = inpaint_cases(n, seed)
    res = {}
    outputs = {}
    for name, path in (("inpaint model", model), ("regular model", base)):
        if not path:
            continue
        res[name], outputs[name] = evaluate(ldm.load(path), cases)
    print(f"| inpainting (recolour the object; bbox mask), {n} cases (case seed {seed}) | requested colour in mask "
          "| unmasked unchanged | both |")
    print("|---|---|---|---|")
    for name, r in res.items():
        path = model if name == "inpaint model" else base
        print(f"| {name} `{path}` | {r['colour']:.1f}% | {r['unchanged']:.1f}% | {r['both']:.1f}% |")
    print(f"({(time.time() - t0) / 60:.1f} min)")
    if grid:
        save_grid(cases[:8], [outputs[k][:8] for k in outputs], Path(grid))
    return res


def save_grid(cases, results: list[list], path: Path, scale: int = 2) -> None:
    """Columns = cases; rows = the original with the mask greyed, then each model's result."""
    first = []
    for img, mask_img, *_ in cases:
        a = np.asarray(img.convert("RGB")).copy()
        m = np.asarray(mask_img) > 127
        a[m] = (a[m] * 0.4 + 128 * 0.6).astype(np.uint8)
        first.append(a)
    rows = [first] + [[np.asarray(im.convert("RGB")) for im in r] for r in results]
    img = Image.fromarray(np.concatenate([np.concatenate(r, 1) for r in rows], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
