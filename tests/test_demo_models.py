"""The demo model's own inpainting and x4 upscaler models (weights/demo-inpaint, weights/demo-upscaler) load in
ours, do their job on a few evaluation cases, share the demo's parts instead of copying them, and are what the
app uses by default next to the demo model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
import ldm
from ldm_tools.eval import upscaler as U
from ldm_tools.eval.demo import inpaint_cases, inpaint_one, judge_inpaint
from ldm_tools.train import world as W

ROOT = Path(__file__).resolve().parents[1]
DEMO, INPAINT, UPSCALER = ROOT / "weights" / "demo", ROOT / "weights" / "demo-inpaint", ROOT / "weights" / "demo-upscaler"


@pytest.mark.parametrize("folder", [INPAINT, UPSCALER])
def test_shipped_folders_link_the_demo_parts_they_share(folder):
    for part in ("vae", "text_encoder", "tokenizer"):
        assert (folder / part).is_symlink() and (folder / part).resolve() == (DEMO / part).resolve()
    assert not (folder / "unet").is_symlink()


def test_demo_inpaint_model_recolours_the_object_and_keeps_the_rest():
    pipe = ldm.load(str(INPAINT), device="cpu", dtype="float32")
    assert pipe.unet.config.in_channels == 9
    # cases 1, 2 and 6 of `python -m ldm_tools.eval inpaint`, same seeds (the regular demo model misses 6's colour)
    cases = inpaint_cases(7)
    for i in (1, 2, 6):
        img, mask_img, prompt, target, mask, orig = cases[i]
        out = inpaint_one(pipe, img, mask_img, prompt, seed=i)
        assert judge_inpaint(out, orig, mask, target) == (True, True), (i, prompt)
        far = ~W.dilate(mask, 10)  # beyond the reach of the mask blur (4): the original, exactly
        assert far.any()
        assert np.array_equal(np.asarray(out)[far], orig[far])


def test_demo_upscaler_is_x4_with_sharper_edges_than_lanczos():
    pipe = ldm.load(str(UPSCALER), device="cpu", dtype="float32")
    assert pipe.unet.config.in_channels == 7 and pipe.max_noise_level == 350
    for scene in U.cases(3):
        low = U.low_res(scene)
        out = pipe.upscale(low, W.caption(*scene.combo), steps=U.STEPS, guidance_scale=U.GUIDANCE,
                           noise_level=U.NOISE_LEVEL, seed=0).images[0]
        assert out.size == (4 * low.width, 4 * low.height) == (64, 64)
        lanczos = low.resize(out.size, Image.LANCZOS)
        assert U.edge_width(out, scene) < U.edge_width(lanczos, scene), scene
        # it follows the input, but less faithfully than Lanczos (0.96-0.99 here): docs/demo-addons.md
        assert U.shape_iou(out, scene) > 0.65, scene


def test_edge_width_reads_hard_and_soft_edges():
    scene = W.Scene("red", "circle", "blue", 30, 10, 12)
    hard = Image.fromarray(W.render(scene))
    soft = Image.fromarray(W.render(scene)).resize((16, 16), Image.BOX).resize((64, 64), Image.BILINEAR)
    assert U.edge_width(hard, scene) == 0 and U.shape_iou(hard, scene) == 1
    assert 1.5 < U.edge_width(soft, scene) < 6 and U.shape_iou(soft, scene) > 0.9


def test_app_uses_the_demo_upscaler_and_inpainting_model_by_default_with_the_demo_model():
    args = app.parse_args([])
    assert app.demo_companions(args) == ("upscale", "inpaint")  # chosen by the app: they serve only with the demo model
    assert (args.inpaint_model, args.upscale_model) == (str(app.DEMO_INPAINT), str(app.DEMO_UPSCALER))
    args = app.parse_args(["--inpaint-model", "", "--upscale-model", "other/x4"])
    assert app.demo_companions(args) == ()
    assert (args.inpaint_model, args.upscale_model) == ("", "other/x4")  # "" = none; an explicit model wins
    args = app.parse_args(["--model", "some/other-model"])
    assert app.demo_companions(args) == ()
    assert (args.inpaint_model, args.upscale_model) == (None, None)  # made for the demo model only
    args = app.parse_args(["--backend", "ray", "--replicas", "2"])
    app.demo_companions(args)
    assert args.upscale_model is None and args.inpaint_model is None  # each model is its own deployment there


def test_the_app_pairs_only_the_companions_it_chose_with_the_demo_model(monkeypatch):
    class Loaded:
        def __init__(self, spec):
            self.name = f"loaded {spec}"

    monkeypatch.setattr(app, "check_models_dir", lambda args: None)
    monkeypatch.setattr(app, "load_model", lambda spec, args: Loaded(spec) if spec else None)
    pipes = app.load_pipelines(app.parse_args([]))
    assert pipes.paired_with == pipes.base.name and set(pipes.paired) == {"inpaint", "upscale"}
    pipes = app.load_pipelines(app.parse_args(["--inpaint-model", "my/inpainting"]))
    assert pipes.paired == ("upscale",) and pipes.inpaint.name == "loaded my/inpainting"


def test_inpaint_training_loss_weights_the_known_area():
    """ldm_tools.train.inpaint.masked_loss: the plain min-SNR loss at weight 1; errors outside the mask count
    known_weight times, and with known_x0_cap at least min(1 / SNR, cap) at any noise level."""
    import json

    import torch

    from ldm_tools.train.finetune import Noise
    from ldm_tools.train.inpaint import masked_loss

    noise = Noise(json.loads((DEMO / "scheduler" / "scheduler_config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1  # left half repainted
    pred = eps + torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 999])
    assert torch.allclose(masked_loss(noise, pred, eps, t, mask, 1.0), noise.loss(pred, eps, t))
    off_known = eps.clone()
    off_known[..., 4:] += 1.0  # an error only outside the mask
    one = masked_loss(noise, off_known, eps, t, mask, 1.0)
    assert torch.allclose(masked_loss(noise, off_known, eps, t, mask, 3.0), 3 * one)
    off_mask = eps.clone()
    off_mask[..., :4] += 1.0  # the same error inside: unchanged by either weight
    assert torch.allclose(masked_loss(noise, off_mask, eps, t, mask, 3.0, 20.0), one)
    # at t=999 (SNR ~0.005) the known error weighs the cap, 20x; at t=10 (SNR > 5) the min-SNR weight stays
    high = masked_loss(noise, off_known, eps, torch.tensor([999, 999]), mask, 1.0, 20.0)
    assert torch.allclose(high, 20 * masked_loss(noise, off_known, eps, torch.tensor([999, 999]), mask, 1.0))
    low = torch.tensor([10, 10])
    assert torch.allclose(masked_loss(noise, off_known, eps, low, mask, 1.0, 20.0), masked_loss(noise, off_known, eps, low, mask, 1.0))
