"""SDXL: parity with diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny random weights
(same scheduler, generators seed + i, float32), the family's prompt semantics, VAE upcasting and the
fast preset's refusal."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image

import ldm
import tiny_sdxl
from ldm import samplers
from pixels import gens, max_diff, px

TOL = 2  # per pixel, out of 255
W, H = 32, 24  # not square, to catch w/h mix-ups


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model):
    return ldm.load(sdxl_model, device="cpu", dtype="float32")


def reference(cls, folder, sampler, seeds):
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


def noise_image(w=W, h=H, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_loads_as_the_sdxl_family(sdxl_pipe):
    assert sdxl_pipe.family.name == "sdxl"
    assert sdxl_pipe.default_size == 32  # U-Net sample size 16 x VAE factor 2
    assert sdxl_pipe.components.text_encoder_2.config.projection_dim == tiny_sdxl.PROJECTION
    assert sdxl_pipe.components.tokenizer_2.pad_token_id == 0  # OpenCLIP pads with "!"
    assert sdxl_pipe.limits.max_clip_skip == 5


@pytest.mark.parametrize("negative,batch,size", [("blurry, ugly", 2, (W, H)), ("", 1, (W, H)), ("bad", 1, (24, 40))])
def test_txt2img_matches_diffusers(sdxl_model, sdxl_pipe, negative, batch, size):
    w, h = size
    ours = sdxl_pipe.txt2img("a photo of an astronaut", negative_prompt=negative, width=w, height=h, steps=4,
                             guidance_scale=7.5, seed=42, batch_size=batch, sampler="Euler a")
    ref = reference(StableDiffusionXLPipeline, sdxl_model, "Euler a", ours.seeds)
    # Our empty negative prompt is diffusers' negative_prompt=None (zero embeddings, force_zeros_for_empty_prompt).
    theirs = ref("a photo of an astronaut", negative_prompt=negative or None, width=w, height=h, num_inference_steps=4,
                 guidance_scale=7.5, num_images_per_prompt=batch, generator=gens(42, batch)).images
    diff = max_diff(ours.images, theirs)
    print(f"sdxl txt2img negative={negative!r} batch={batch} {w}x{h}: max pixel diff {diff}")
    assert ours.images[0].size == (w, h) and ours.seeds == [42 + i for i in range(batch)]
    assert diff <= TOL
    if negative == "":  # the zeroing is real: diffusers' encoded "" negative gives another picture
        encoded = ref("a photo of an astronaut", negative_prompt="", width=w, height=h, num_inference_steps=4,
                      guidance_scale=7.5, generator=gens(42, 1)).images
        assert max_diff(ours.images, encoded) > TOL


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler"])
def test_txt2img_matches_diffusers_other_samplers(sdxl_model, sdxl_pipe, sampler):
    ours = sdxl_pipe.txt2img("a red cube", negative_prompt="fog", width=W, height=H, steps=5, seed=3, sampler=sampler)
    ref = reference(StableDiffusionXLPipeline, sdxl_model, sampler, ours.seeds)
    theirs = ref("a red cube", negative_prompt="fog", width=W, height=H, num_inference_steps=5, guidance_scale=7.0,
                 generator=gens(3, 1)).images
    assert max_diff(ours.images, theirs) <= TOL


def test_guidance_one_runs_the_conditional_batch_only(sdxl_model, sdxl_pipe):
    ours = sdxl_pipe.txt2img("a dog", guidance_scale=1.0, width=W, height=H, steps=3, seed=3, batch_size=2, sampler="Euler")
    ref = reference(StableDiffusionXLPipeline, sdxl_model, "Euler", ours.seeds)
    theirs = ref("a dog", width=W, height=H, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2,
                 generator=gens(3, 2)).images
    assert max_diff(ours.images, theirs) <= TOL


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_img2img_matches_diffusers(sdxl_model, sdxl_pipe, strength):
    image = noise_image()
    ours = sdxl_pipe.img2img(image, "a watercolor", negative_prompt="ugly", strength=strength, steps=6, seed=9,
                             batch_size=2, sampler="Euler a", guidance_scale=6)
    ref = reference(StableDiffusionXLImg2ImgPipeline, sdxl_model, "Euler a", ours.seeds)
    theirs = ref("a watercolor", image=image, negative_prompt="ugly", strength=strength, num_inference_steps=6,
                 guidance_scale=6, num_images_per_prompt=2, generator=gens(9, 2)).images
    diff = max_diff(ours.images, theirs)
    print(f"sdxl img2img strength {strength}: max pixel diff {diff}")
    assert diff <= TOL


@pytest.fixture(scope="module")
def sdxl_inpaint_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-inpaint"), unet_model=tiny_sdxl.unet(seed=2, in_channels=9))


@pytest.mark.parametrize("kind,strength", [("base", 1.0), ("base", 0.75), ("inpaint", 1.0), ("inpaint", 0.75)])
def test_inpaint_matches_diffusers_inside_the_mask_and_keeps_the_rest(request, kind, strength):
    """4-channel (latent blending) and 9-channel SDXL inpainting U-Nets."""
    sdxl_model = request.getfixturevalue("sdxl_model" if kind == "base" else "sdxl_inpaint_model")
    sdxl_pipe = request.getfixturevalue("sdxl_pipe") if kind == "base" else ldm.load(sdxl_model, device="cpu", dtype="float32")
    image = noise_image(seed=1)
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 6:22] = 255
    ours = sdxl_pipe.inpaint(image, Image.fromarray(mask), "a cat", negative_prompt="ugly", strength=strength,
                             mask_blur=0, steps=4, seed=9, batch_size=2, sampler="Euler a", guidance_scale=6)
    ref = reference(StableDiffusionXLInpaintPipeline, sdxl_model, "Euler a", ours.seeds)
    theirs = []
    for s in ours.seeds:  # image i = diffusers' single image with seed + i (see tests/test_inpaint.py)
        ref.scheduler = samplers.make_scheduler("Euler a", "Automatic", dict(ref.scheduler.config), seeds=[s])
        theirs += ref("a cat", image=image, mask_image=Image.fromarray(mask), negative_prompt="ugly", strength=strength,
                      width=W, height=H, num_inference_steps=4, guidance_scale=6, generator=gens(s, 1)).images
    inside = mask >= 128
    diffs = [int(np.abs(px(a) - px(b))[inside].max()) for a, b in zip(ours.images, theirs)]
    print(f"sdxl inpaint ({kind} U-Net) strength {strength}: max pixel diff inside the mask {diffs}")
    assert max(diffs) <= TOL
    for out in ours.images:
        assert np.array_equal(px(out)[~inside], px(image)[~inside])


def test_added_conditioning_matters(sdxl_pipe):
    """Size conditioning and the pooled vector reach the U-Net (else parity could pass vacuously)."""
    kw = dict(width=W, height=H, steps=2, seed=1, sampler="Euler")
    base = sdxl_pipe.txt2img("a red cube", **kw)
    family = sdxl_pipe.family
    cond = family.encode(base.params)
    added = cond.extensions[0]
    assert added.cond["time_ids"].tolist() == [[H, W, 0, 0, H, W]]
    assert added.cond["text_embeds"].shape == (1, tiny_sdxl.PROJECTION)
    assert added.both["text_embeds"][0].abs().sum() == 0  # empty negative: zero pooled vector
    assert cond.cond.shape == (1, 77, 80) and cond.uncond.abs().sum() == 0


def test_clip_skip_reads_deeper_layers_of_both_encoders(sdxl_model, sdxl_pipe):
    """A1111 clip skip 2 = diffusers clip_skip=1 (hidden state -3, no final norm). diffusers skips for the
    prompt only, so the reference gets both embeddings from its own encode_prompt with clip_skip."""
    ours = sdxl_pipe.txt2img("a castle", negative_prompt="fog", clip_skip=2, width=W, height=H, steps=3, seed=11,
                             sampler="Euler")
    ref = reference(StableDiffusionXLPipeline, sdxl_model, "Euler", ours.seeds)
    pos, _, pooled, _ = ref.encode_prompt("a castle", device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    neg, _, neg_pooled, _ = ref.encode_prompt("fog", device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    theirs = ref(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=neg_pooled, width=W, height=H, num_inference_steps=3,
                 guidance_scale=7.0, generator=gens(11, 1)).images
    assert max_diff(ours.images, theirs) <= TOL
    plain = sdxl_pipe.txt2img("a castle", negative_prompt="fog", width=W, height=H, steps=3, seed=11, sampler="Euler")
    assert max_diff(ours.images, plain.images) > 0


def test_weighted_long_prompt_runs_and_weights_change_the_picture(sdxl_pipe):
    long = ", ".join(["a (very:1.3) detailed [castle] on a hill"] * 12)
    kw = dict(width=W, height=H, steps=2, seed=1)
    a = sdxl_pipe.txt2img(long, **kw)
    b = sdxl_pipe.txt2img(long.replace("(very:1.3)", "very"), **kw)
    assert max_diff(a.images, b.images) > 0
    assert sdxl_pipe.family.encode(a.params).cond.shape[1] == 77 * 2


def test_fp16_keeps_the_vae_in_float32(sdxl_model):
    pipe = ldm.load(sdxl_model, device="cpu", dtype="float16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32  # VAE config: force_upcast


def test_fast_preset_deep_cache_includes_the_added_embedding(sdxl_pipe):
    """The fast preset supports SDXL: its shallow/full U-Net paths add the pooled + size embedding, so a
    full step is the U-Net exactly; without added_cond_kwargs it refuses as the U-Net does."""
    from ldm.extensions import fast

    unet = sdxl_pipe.unet
    assert fast.unsupported_reason(unet) is None
    x, emb = torch.randn(2, 4, 12, 10), torch.randn(2, 77, 80)
    added = {"text_embeds": torch.randn(2, tiny_sdxl.PROJECTION), "time_ids": torch.tensor([[24.0, 20, 0, 0, 24, 20]] * 2)}
    with torch.inference_mode():
        ref = unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        wrapped = fast.DeepCacheUNet(unet, 3)
        assert torch.equal(wrapped(x, 500, emb, added_cond_kwargs=added)[0], ref)
        shallow = wrapped(x, 480, emb, added_cond_kwargs=added)[0]
        other = {**added, "time_ids": added["time_ids"] * 2}
        assert not torch.equal(wrapped(x, 480, emb, added_cond_kwargs=other)[0], shallow)  # shallow path sees them too
        with pytest.raises(ValueError, match="text_embeds"):
            fast.DeepCacheUNet(unet, 3)(x, 500, emb)
    kw = dict(width=W, height=H, steps=6, seed=4, sampler="Euler")
    plain = sdxl_pipe.txt2img("a red cube", **kw)
    quick = sdxl_pipe.txt2img("a red cube", fast=True, **kw)
    diff = np.abs(px(quick.images[0]) - px(plain.images[0]))
    assert 0 < diff.max() and diff.mean() < 12 and "Fast: True" in quick.infotexts[0]
