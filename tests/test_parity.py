"""Our pipeline against diffusers' own pipelines: same weights, same seeds, same scheduler."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

import ldm
from ldm import samplers

TOL = 2  # per-pixel, out of 255


def diffusers_pipe(cls, folder, sampler, schedule, seeds):
    pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, schedule, dict(pipe.scheduler.config), seeds=seeds)
    return pipe


def max_diff(ours, theirs) -> int:
    assert len(ours) == len(theirs)
    return max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(ours, theirs))


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("sampler", samplers.sampler_names())
def test_txt2img_matches_diffusers_for_every_sampler(base_model, base_pipe, sampler):
    schedule = "Karras" if "Karras" in samplers.schedule_names(sampler) else "Automatic"
    kw = dict(negative_prompt="blurry, low quality", width=32, height=24, steps=4, guidance_scale=7.5, seed=42, batch_size=2)
    ours = base_pipe.txt2img("a photo of an astronaut", sampler=sampler, schedule=schedule, **kw)
    ref = diffusers_pipe(StableDiffusionPipeline, base_model, sampler, schedule, ours.seeds)
    theirs = ref("a photo of an astronaut", negative_prompt=kw["negative_prompt"], width=32, height=24,
                 num_inference_steps=4, guidance_scale=7.5, num_images_per_prompt=2, generator=gens(42, 2)).images
    assert ours.seeds == [42, 43]
    assert max_diff(ours.images, theirs) <= TOL


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DDIM"])
def test_txt2img_matches_diffusers_automatic_schedule(base_model, base_pipe, sampler):
    ours = base_pipe.txt2img("a cat", sampler=sampler, schedule="Automatic", width=24, height=40, steps=5, seed=7)
    ref = diffusers_pipe(StableDiffusionPipeline, base_model, sampler, "Automatic", ours.seeds)
    theirs = ref("a cat", width=24, height=40, num_inference_steps=5, guidance_scale=7.0, generator=gens(7, 1)).images
    assert max_diff(ours.images, theirs) <= TOL


def test_guidance_one_skips_uncond_and_matches(base_model, base_pipe):
    calls = []
    hook = base_pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ours = base_pipe.txt2img("a dog", guidance_scale=1.0, width=32, height=32, steps=3, seed=3, batch_size=2, sampler="Euler")
    finally:
        hook.remove()
    assert calls == [2, 2, 2]  # one pass per step, batch not doubled
    ref = diffusers_pipe(StableDiffusionPipeline, base_model, "Euler", "Automatic", ours.seeds)
    theirs = ref("a dog", width=32, height=32, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, generator=gens(3, 2)).images
    assert max_diff(ours.images, theirs) <= TOL


def test_vprediction_model_matches(vpred_model):
    pipe = ldm.load(vpred_model, device="cpu", dtype="float32")
    ours = pipe.txt2img("a tree", sampler="DPM++ 2M", schedule="Karras", width=32, height=32, steps=4, seed=5, guidance_scale=5)
    ref = diffusers_pipe(StableDiffusionPipeline, vpred_model, "DPM++ 2M", "Karras", ours.seeds)
    theirs = ref("a tree", width=32, height=32, num_inference_steps=4, guidance_scale=5, generator=gens(5, 1)).images
    assert max_diff(ours.images, theirs) <= TOL


def test_clip_skip_2_matches_diffusers(base_model, base_pipe):
    """A1111 clip skip 2 = diffusers clip_skip=1. diffusers skips layers only for the positive prompt
    (its negative path ignores clip_skip), A1111 and we skip for both: so the reference gets both
    embeddings from diffusers' own encode_prompt with clip_skip."""
    ours = base_pipe.txt2img("a castle", negative_prompt="fog", clip_skip=2, width=32, height=32, steps=3, seed=11,
                             sampler="Euler a", schedule="Automatic")
    ref = diffusers_pipe(StableDiffusionPipeline, base_model, "Euler a", "Automatic", ours.seeds)
    te = ref.text_encoder
    if not hasattr(te, "text_model"):  # transformers 5 flattened CLIPTextModel; diffusers still looks here
        object.__setattr__(te, "text_model", te)
    pos, _ = ref.encode_prompt("a castle", "cpu", 1, False, clip_skip=1)
    neg, _ = ref.encode_prompt("fog", "cpu", 1, False, clip_skip=1)
    theirs = ref(prompt_embeds=pos, negative_prompt_embeds=neg, width=32, height=32, num_inference_steps=3,
                 guidance_scale=7.0, generator=gens(11, 1)).images
    assert max_diff(ours.images, theirs) <= TOL
    plain = base_pipe.txt2img("a castle", negative_prompt="fog", width=32, height=32, steps=3, seed=11, sampler="Euler a", schedule="Automatic")
    assert max_diff(ours.images, plain.images) > 0  # clip skip changes the picture


@pytest.mark.parametrize("sampler,strength", [("DPM++ 2M", 0.6), ("Euler a", 0.75), ("DDIM", 1.0), ("DPM++ SDE", 0.5)])
def test_img2img_matches_diffusers(base_model, base_pipe, sampler, strength):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8))
    ours = base_pipe.img2img(image, "a watercolor", negative_prompt="ugly", strength=strength, steps=6, seed=9,
                             batch_size=2, sampler=sampler, schedule="Automatic", guidance_scale=6)
    assert ours.images[0].size == (32, 40)
    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, base_model, sampler, "Automatic", ours.seeds)
    theirs = ref("a watercolor", image=image, negative_prompt="ugly", strength=strength, num_inference_steps=6,
                 guidance_scale=6, num_images_per_prompt=2, generator=gens(9, 2)).images
    assert max_diff(ours.images, theirs) <= TOL
    assert "Denoising strength: " + f"{strength:g}" in ours.infotexts[0]


def test_long_weighted_prompt_runs_and_differs(base_pipe):
    long = ", ".join(["a (very:1.3) detailed [castle] on a hill"] * 12)
    a = base_pipe.txt2img(long, width=32, height=32, steps=2, seed=1)
    b = base_pipe.txt2img(long.replace("(very:1.3)", "very"), width=32, height=32, steps=2, seed=1)
    assert max_diff(a.images, b.images) > 0
