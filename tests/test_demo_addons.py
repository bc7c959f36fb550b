"""The demo add-ons shipped beside the demo model (weights/demo-models: A1111 layout) load in ours and do
their job on at least one case; the style detectors they are measured with; the size limit of weights/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldm_tools.train import world as W

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
ADDONS = WEIGHTS / "demo-models"
LORA = ADDONS / "Lora" / "outline.safetensors"


def read(image) -> tuple:
    k = W.classify(image)
    return k.bg, k.obj, k.shape


def test_weights_folder_stays_under_80_mb():
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size < 80e6, f"weights/ is {size / 1e6:.1f} MB"


def test_hollow_detector_reads_renders():
    rng = np.random.default_rng(3)
    for combo in W.all_combos()[::7]:
        scene = W.random_scene(rng, combo)
        plain, styled = W.render(scene), W.render(scene, outline=W.rim_width)
        assert W.hollow_fraction(plain) == 0 and not W.is_hollow(plain)
        assert W.is_hollow(styled), (scene, W.hollow_fraction(styled))
        assert read(W.solid(styled)) == read(plain) == (combo[2], combo[0], combo[1])


def test_small_triangles_get_a_thinner_rim_that_leaves_them_a_hole():
    rng = np.random.default_rng(0)
    small = [s for s in (W.random_scene(rng, ("red", "triangle", "blue")) for _ in range(300)) if s.size <= 24]
    assert len(small) >= 3 and all(W.rim_width(s) == 3 for s in small)
    # a 5-pixel rim leaves most of them a sliver of hole (2-3% of the shape); 3 pixels leave a fifth or more
    assert np.median([W.hollow_fraction(W.render(s, outline=W.OUTLINE_WIDTH)) for s in small]) < W.HOLLOW_THRESHOLD
    assert all(W.hollow_fraction(W.render(s, outline=W.rim_width)) >= 0.2 for s in small)
    assert W.rim_width(W.Scene("red", "triangle", "blue", 40, 10, 10)) == W.OUTLINE_WIDTH
    assert W.rim_width(W.Scene("red", "circle", "blue", 23, 10, 10)) == W.OUTLINE_WIDTH


def test_lora_file_loads_back_into_its_layers(tmp_path):
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from ldm_tools.train import lora as L

    def layers():
        return {"lin": L.LoraLayer(nn.Linear(4, 6), 2, 2.0), "conv": L.LoraLayer(nn.Conv2d(3, 5, 3, padding=1), 2, 2.0)}

    a, b = layers(), layers()
    for layer in a.values():
        nn.init.normal_(layer.up.weight)
    save_file(L.kohya_state(a, 2.0), str(tmp_path / "x.safetensors"))
    L.load_kohya(b, tmp_path / "x.safetensors")
    for k in a:
        assert torch.equal(a[k].down.weight, b[k].down.weight) and torch.equal(a[k].up.weight, b[k].up.weight)


def test_holes_are_regions_cut_off_from_the_background():
    ring = np.zeros((12, 12), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert W.holes(ring)[3:6, 3:6].all() and W.holes(ring).sum() == 9
    ring[4, 2] = False  # opened to the outside
    assert not W.holes(ring).any()
    edge = np.zeros((12, 12), bool)
    edge[0:5, 2:7] = True
    edge[0:4, 3:6] = False  # a rim cut by the top border of the image: still a hole
    assert W.holes(edge).sum() == 12


def test_shipped_lora_is_kohya_format():
    from safetensors import safe_open

    with safe_open(str(LORA), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    parts: dict[str, set] = {}
    for k in keys:
        prefix, _, part = k.partition(".")
        parts.setdefault(prefix, set()).add(part)
    assert all(p == {"lora_down.weight", "lora_up.weight", "alpha"} for p in parts.values())
    assert meta["ss_network_module"] == "networks.lora"


@pytest.fixture(scope="module")
def pipe_with_addons(tmp_path_factory):
    import ldm

    models = tmp_path_factory.mktemp("models")
    (models / "Lora").mkdir()
    (models / "Lora" / "outline.safetensors").symlink_to(LORA)
    return ldm.load(str(WEIGHTS / "demo"), models_dir=models, dtype="float32")


def test_shipped_lora_draws_its_style(pipe_with_addons):
    # the second case of `python -m ldm_tools.eval lora` (docs/images/demo-lora.png, columns 3-4)
    kw = dict(negative_prompt="", width=64, height=64, steps=20, guidance_scale=7.5, sampler="Euler", seed=2)
    prompt = "a orange circle on a blue background"
    plain = pipe_with_addons.txt2img(prompt, **kw).images[0]
    styled = pipe_with_addons.txt2img(f"<lora:outline:1> {prompt}", **kw).images[0]
    assert not W.is_hollow(plain) and W.is_hollow(styled)
    assert read(W.solid(styled)) == ("blue", "orange", "circle")
    again = pipe_with_addons.txt2img(prompt, **kw).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(plain))  # the base weights came back exactly


def test_app_links_the_addons_into_the_default_models_folder(tmp_path, monkeypatch):
    import app
    import ldm

    monkeypatch.chdir(tmp_path)  # the default models folder is ./models
    args = app.parse_args([])
    app.check_models_dir(args)
    library = ldm.Library(tmp_path / "models")
    assert "outline" in [e.name for e in library.loras]
    assert (tmp_path / "models" / "Lora" / "outline.safetensors").resolve() == LORA.resolve()
    mine = tmp_path / "mine"
    app.check_models_dir(app.parse_args(["--models-dir", str(mine)]))  # a user's own folder is left alone
    assert not ldm.Library(mine).loras


CONTROLNET = ADDONS / "ControlNet" / "demo-canny"


def test_shipped_controlnet_puts_the_object_where_the_edges_are(pipe_with_addons):
    # cases 1 and 2 of `python -m ldm_tools.eval controlnet` (docs/images/demo-controlnet.png, columns 2-3):
    # the control scene is drawn in other colours, so only its edges can move the object
    import ldm
    from PIL import Image

    from ldm_tools.eval import controlnet as E

    net = ldm.load_controlnet(str(CONTROLNET), base=pipe_with_addons)
    kw = dict(negative_prompt="", width=64, height=64, steps=20, guidance_scale=7.5, sampler="Euler")
    for i, (combo, scene) in list(enumerate(E.cases(3)))[1:]:
        target = W.shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
        unit = ldm.ControlUnit(net, Image.fromarray(W.render(scene)), preprocessor="canny")
        guided = pipe_with_addons.txt2img(W.caption(*combo), seed=i, control=[unit], **kw).images[0]
        plain = pipe_with_addons.txt2img(W.caption(*combo), seed=i, **kw).images[0]
        assert E.iou(E.object_mask(guided), target) >= 0.7 > E.iou(E.object_mask(plain), target) + 0.3
        assert W.classify(guided).obj == combo[0] and W.classify(guided).bg == combo[2]  # the prompt's colours


def test_app_lists_the_shipped_controlnet(tmp_path, monkeypatch):
    import app
    import ldm

    monkeypatch.chdir(tmp_path)
    app.check_models_dir(app.parse_args([]))
    assert "demo-canny" in [e.name for e in ldm.Library(tmp_path / "models").controlnets]


def test_an_addon_fine_tune_starts_from_the_trained_addon(tmp_path):
    """`--init` (finetune.start_from): a retrain onto a new base model starts at the shipped add-on's weights."""
    import torch
    from diffusers import ControlNetModel

    from ldm_tools.train import finetune as F

    def net(seed: int) -> ControlNetModel:
        torch.manual_seed(seed)
        return ControlNetModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                               layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                               conditioning_embedding_out_channels=(4, 8))

    trained, fresh = net(0), net(1)
    trained.save_pretrained(tmp_path / "addon")
    assert not torch.equal(fresh.conv_in.weight, trained.conv_in.weight)
    F.start_from(fresh, tmp_path / "addon")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
