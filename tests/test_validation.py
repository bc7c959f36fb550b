"""Every bad setting is refused with a readable ValueError before any model work."""
import math

import pytest
from PIL import Image

import ldm


@pytest.fixture()
def no_model_work(base_pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model work started before validation")
    monkeypatch.setattr(base_pipe.prompts, "encode_chunks", boom)
    return base_pipe


@pytest.mark.parametrize("settings,message", [
    ({"width": 0}, "width 0 is out of range"),
    ({"height": -64}, "height -64 is out of range"),
    ({"width": 30}, "not a multiple of 8"),
    ({"width": 4096}, "out of range: use 1 to 2048"),
    ({"width": 64.0}, "whole number of pixels"),
    ({"steps": 0}, "steps must be a whole number from 1 to 1000"),
    ({"steps": 10_000}, "steps must be"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"batch_size": 1000}, "batch_size must be a whole number from 1 to 16"),
    ({"sampler": "Nope"}, "unknown sampler 'Nope'"),
    ({"schedule": "Sometimes"}, "unknown schedule type"),
    ({"seed": -5}, "seed must be -1"),
    ({"seed": 2**40}, "seed must be -1"),
    ({"clip_skip": 0}, "clip_skip"),
    ({"negative_prompt": None}, None),  # None means "default" for every setting
])
def test_txt2img_rejects_bad_settings(no_model_work, settings, message):
    if message is None:
        with pytest.raises(AssertionError, match="model work started"):
            no_model_work.txt2img("x", width=32, height=32, **settings)
        return
    with pytest.raises(ValueError, match=message):
        no_model_work.txt2img("x", **{"width": 32, "height": 32, **settings})


def test_unknown_keyword_is_a_type_error(base_pipe):
    with pytest.raises(TypeError, match="unknown setting"):
        base_pipe.txt2img("x", widht=32)


@pytest.mark.parametrize("strength", [0, 1.5, -0.1, math.inf])
def test_img2img_strength_range(no_model_work, strength):
    with pytest.raises(ValueError, match=r"strength.*\(0, 1\]"):
        no_model_work.img2img(Image.new("RGB", (32, 32)), "x", strength=strength)


def test_img2img_rejects_non_images(no_model_work, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError):
        no_model_work.img2img(bad, "x")
    with pytest.raises(ValueError):
        no_model_work.img2img(Image.new("RGB", (0, 0)), "x")


def test_empty_prompt_is_valid(base_pipe):
    r = base_pipe.txt2img("", width=32, height=32, steps=1, seed=0)
    assert r.images[0].size == (32, 32)


def test_wrong_kind_refused(tmp_path):
    import tiny
    folder = tiny.save_model(tmp_path / "inp", unet_model=tiny.unet(in_channels=9))
    pipe = ldm.load(folder, device="cpu")
    assert pipe.kind is ldm.ModelKind.INPAINT
    with pytest.raises(ValueError, match="txt2img needs a base model"):
        pipe.txt2img("x")


def test_a_huge_prompt_is_refused_before_tokenising(no_model_work, monkeypatch):
    """A 1 MB prompt once took a minute and gigabytes: it is now refused by its length, untokenised."""
    import time

    calls = []
    monkeypatch.setattr(no_model_work.family, "token_count", lambda text: calls.append(1) or 0)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"prompt is 1,000,000 characters long; the limit is 19,200 \(and 1,200 tokens\)"):
        no_model_work.txt2img("x" * 1_000_000, steps=2)
    assert time.perf_counter() - started < 1.0 and calls == []


def test_prompt_token_limit_counts_tokens_and_is_configurable(base_pipe):
    long = ", ".join(["a red cube"] * 320)  # ~1,280 tokens of CLIP text, well under the character cap
    n = base_pipe.family.token_count(long)
    assert n > 1200
    with pytest.raises(ValueError, match=f"prompt is {n:,} tokens long; the limit is 1,200 \\(16 chunks of 75 tokens\\)"):
        base_pipe.txt2img(long, steps=1)
    roomy = base_pipe.with_options(max_prompt_tokens=n)
    assert roomy.txt2img(long, steps=1, width=32, height=32).images[0].size == (32, 32)
