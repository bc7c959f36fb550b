"""The contract every task keeps (the diffusers PipelineTesterMixin idea), run for every task:

- image i of a batch equals the single image made with seed + i;
- cancelling leaves the pipeline usable (the next call gives the same picture as before);
- running out of memory raises ldm.OutOfMemory and the next call works;
- the infotext round-trips through parse_infotext;
- bad arguments raise before any model work.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
import tiny
from ldm.metadata import parse_infotext

KW = dict(steps=3, sampler="Euler a", guidance_scale=5.0)


def picture(w=32, h=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(w=32, h=32) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[8:24, 6:22] = 255
    return Image.fromarray(m)


def _cn(pipe, cache={}) -> list:
    """One ControlNet unit (a tiny random ControlNet copied from the pipe's U-Net, weight 0.8, steps 0-70%)."""
    if id(pipe) not in cache:
        from test_controlnet import random_controlnet

        cache[id(pipe)] = random_controlnet(pipe.unet, seed=1)
    return [ldm.ControlUnit(cache[id(pipe)], picture(seed=5), weight=0.8, end=0.7)]


# name -> (pipeline fixture, call(pipe, prompt, **settings))
TASKS = {
    "txt2img": ("base_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=32, **kw)),
    "txt2img+hires": ("base_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=32, hires_scale=1.5, **kw)),
    "img2img": ("base_pipe", lambda p, prompt, **kw: p.img2img(picture(), prompt, strength=0.7, **kw)),
    "inpaint (4-channel)": ("base_pipe", lambda p, prompt, **kw: p.inpaint(picture(), mask(), prompt, mask_blur=0, **kw)),
    "inpaint (9-channel)": ("inpaint_pipe", lambda p, prompt, **kw: p.inpaint(picture(), mask(), prompt, mask_blur=0, **kw)),
    "outpaint": ("base_pipe", lambda p, prompt, **kw: p.outpaint(picture(24, 32), prompt, right=8, **kw)),
    "hires_fix": ("base_pipe", lambda p, prompt, **kw: p.hires_fix(picture(), prompt, scale=1.5, upscaler="lanczos", **kw)),
    "upscale": ("up_pipe", lambda p, prompt, **kw: p.upscale(picture(16, 16), prompt, **kw)),
    "fast txt2img": ("base_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=32, fast=True, **kw)),
    "txt2img+controlnet": ("base_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=32, control=_cn(p), **kw)),
    "img2img+controlnet": ("base_pipe", lambda p, prompt, **kw: p.img2img(picture(), prompt, strength=0.7, control=_cn(p), **kw)),
    "inpaint+controlnet": ("base_pipe", lambda p, prompt, **kw: p.inpaint(picture(), mask(), prompt, mask_blur=0, control=_cn(p),
                                                                           **kw)),
    "sdxl txt2img": ("sdxl_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=24, **kw)),
    "sdxl img2img": ("sdxl_pipe", lambda p, prompt, **kw: p.img2img(picture(), prompt, strength=0.7, **kw)),
    "sdxl inpaint": ("sdxl_pipe", lambda p, prompt, **kw: p.inpaint(picture(), mask(), prompt, mask_blur=0, **kw)),
    "sdxl fast txt2img": ("sdxl_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=24, fast=True, **kw)),
    "sdxl txt2img+hires": ("sdxl_pipe", lambda p, prompt, **kw: p.txt2img(prompt, width=32, height=24, hires_scale=1.5, **kw)),
    "sdxl outpaint": ("sdxl_pipe", lambda p, prompt, **kw: p.outpaint(picture(24, 32), prompt, right=8, **kw)),
}


@pytest.fixture(scope="module")
def inpaint_pipe(tmp_path_factory):
    folder = tiny.save_model(tmp_path_factory.mktemp("contract-inpaint"), unet_model=tiny.unet(seed=1, in_channels=9),
                             pipeline_class="StableDiffusionInpaintPipeline")
    return ldm.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    import tiny_sdxl

    return ldm.load(tiny_sdxl.save_model(tmp_path_factory.mktemp("contract-sdxl")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def up_pipe(tmp_path_factory):
    return ldm.load(tiny.save_upscaler(tmp_path_factory.mktemp("contract-x4")), device="cpu", dtype="float32")


@pytest.fixture(params=list(TASKS))
def task(request):
    fixture, call = TASKS[request.param]
    pipe = request.getfixturevalue(fixture)
    return lambda prompt="a red cube", **kw: call(pipe, prompt, **{**KW, **kw}), pipe


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_image_i_of_a_batch_is_the_single_image_with_seed_plus_i(task):
    run, _ = task
    batch = run(seed=11, batch_size=2)
    assert batch.seeds == [11, 12]
    for i in range(2):
        single = run(seed=11 + i)
        assert np.abs(px(batch.images[i]) - px(single.images[0])).max() <= 1  # float rounding across batch sizes


def test_cancelling_leaves_the_pipeline_usable(task):
    run, _ = task
    before = run(seed=3)
    with pytest.raises(ldm.Cancelled):
        run(seed=3, callback=lambda step, total, latents: step == 1)
    after = run(seed=3)
    assert np.array_equal(px(before.images[0]), px(after.images[0]))


def test_out_of_memory_raises_and_the_next_call_works(task):
    run, pipe = task

    def explode(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    hook = pipe.unet.conv_in.register_forward_pre_hook(explode)  # the fast preset calls the U-Net's parts
    try:
        with pytest.raises(ldm.OutOfMemory, match="out of memory"):
            run(seed=4)
    finally:
        hook.remove()
    assert run(seed=4).images[0].size == run(seed=5).images[0].size


def test_infotext_round_trips(task):
    run, _ = task
    r = run("a (red:1.2) cube, on grass", negative_prompt="blurry", seed=21)
    info = parse_infotext(r.infotexts[0])
    assert info["Prompt"] == "a (red:1.2) cube, on grass" and info["Negative prompt"] == "blurry"
    assert info["Seed"] == "21" and info["Sampler"] == "Euler a" and info["CFG scale"] == "5"
    assert info["Steps"] == "3" and info["Model"] == r.infotexts[0].split("Model: ")[1].split(",")[0]
    w, h = map(int, info["Size"].split("x"))
    assert w > 0 and h > 0


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps must be a whole number"),
    ({"sampler": "Euler z"}, "Euler z"),
    ({"seed": "7"}, "seed must be"),
    ({"clip_skip": 6}, "this model's text encoder has 5 layers"),
    ({"negative_prompt": "cat " * 1500}, "negative_prompt is 1,500 tokens long; the limit is 1,200"),
    ({"no_such_setting": 1}, "unknown setting"),
])
def test_bad_arguments_raise_before_model_work(task, bad, match):
    run, pipe = task
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            run(**{"seed": 1, **bad})
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
