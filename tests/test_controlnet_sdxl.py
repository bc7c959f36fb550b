"""SDXL ControlNets: parity with diffusers' StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline and
multi-ControlNet on identical tiny random weights (same scheduler, generators seed + i, float32), the control
really changing the image, loading (folders, single files) and the family check both ways."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline,
                       StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline)
from PIL import Image

import ldm
import tiny
import tiny_sdxl
from ldm import samplers
from pixels import gens, max_diff, px
from test_controlnet import control_image, random_controlnet

TOL = 2  # per pixel, out of 255
VISIBLE = 10  # the control must change the image by more than this
W, H = 32, 24  # not square, to catch w/h mix-ups


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("tiny-sdxl-cn-base"))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model):
    return ldm.load(sdxl_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def xl_folders(tmp_path_factory):
    """Two SDXL ControlNets (copies of the tiny SDXL U-Net: pooled embedding + time ids) as diffusers folders."""
    out = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny-controlnet-sdxl-{seed}")
        random_controlnet(tiny_sdxl.unet(), seed).save_pretrained(folder, safe_serialization=True)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def xl_cns(xl_folders, sdxl_pipe):
    return [ldm.load_controlnet(f, base=sdxl_pipe) for f in xl_folders]


def reference(cls, model, folders, n_nets, sampler, seeds):
    nets = [ControlNetModel.from_pretrained(f) for f in folders[:n_nets]]
    pipe = cls.from_pretrained(model, controlnet=nets[0] if n_nets == 1 else nets, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


# ---- parity with diffusers ----------------------------------------------------------------------------


CASES = {  # name: (unit settings, batch, guidance, sampler)
    "weight 1": (dict(weight=1.0), 1, 7.0, "Euler a"),
    "weight 0.7 start 0.2 end 0.8": (dict(weight=0.7, start=0.2, end=0.8), 1, 7.0, "DPM++ 2M"),
    "guess mode with CFG": (dict(guess_mode=True), 1, 5.0, "Euler"),
    "batch 2": (dict(weight=1.2), 2, 7.0, "Euler a"),
    "no CFG": (dict(weight=0.8), 1, 1.0, "Euler"),
}


@pytest.mark.parametrize("case", CASES)
def test_txt2img_matches_diffusers(sdxl_model, sdxl_pipe, xl_folders, xl_cns, case):
    unit, batch, cfg, sampler = CASES[case]
    kw = dict(negative_prompt="blurry", width=W, height=H, steps=5, guidance_scale=cfg, seed=42, batch_size=batch,
              sampler=sampler, schedule="Automatic")
    ours = sdxl_pipe.txt2img("a house", control=[ldm.ControlUnit(xl_cns[0], control_image(0, W, H), **unit)], **kw)
    ref = reference(StableDiffusionXLControlNetPipeline, sdxl_model, xl_folders, 1, sampler, ours.seeds)
    theirs = ref("a house", image=control_image(0, W, H), negative_prompt="blurry", width=W, height=H,
                 num_inference_steps=5, guidance_scale=cfg, num_images_per_prompt=batch, generator=gens(42, batch),
                 controlnet_conditioning_scale=unit.get("weight", 1.0), guess_mode=unit.get("guess_mode", False),
                 control_guidance_start=unit.get("start", 0.0), control_guidance_end=unit.get("end", 1.0)).images
    plain = sdxl_pipe.txt2img("a house", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"sdxl controlnet parity txt2img {case}: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


def test_two_units_match_multi_controlnet(sdxl_model, sdxl_pipe, xl_folders, xl_cns):
    images = [control_image(0, W, H), control_image(5, W, H)]
    units = [ldm.ControlUnit(xl_cns[0], images[0], weight=0.9, start=0.0, end=0.6),
             ldm.ControlUnit(xl_cns[1], images[1], weight=0.6, start=0.2, end=1.0)]
    kw = dict(width=W, height=H, steps=5, guidance_scale=6.0, seed=3, sampler="Euler a", schedule="Automatic")
    ours = sdxl_pipe.txt2img("a tree", negative_prompt="fog", control=units, **kw)
    ref = reference(StableDiffusionXLControlNetPipeline, sdxl_model, xl_folders, 2, "Euler a", ours.seeds)
    theirs = ref("a tree", negative_prompt="fog", image=images, width=W, height=H, num_inference_steps=5,
                 guidance_scale=6.0, generator=gens(3, 1), controlnet_conditioning_scale=[0.9, 0.6],
                 control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0]).images
    single = sdxl_pipe.txt2img("a tree", negative_prompt="fog", control=units[:1], **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, single.images)
    print(f"sdxl controlnet parity two units: max pixel diff {diff}, second unit's effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE  # the second unit adds to the first
    assert "ControlNet 0: " in ours.infotexts[0] and "ControlNet 1: " in ours.infotexts[0]


def test_img2img_matches_diffusers(sdxl_model, sdxl_pipe, xl_folders, xl_cns):
    init = noise_image(0)
    unit = ldm.ControlUnit(xl_cns[0], control_image(1, W, H), weight=0.9, end=0.8)
    kw = dict(negative_prompt="ugly", strength=0.6, steps=6, seed=9, batch_size=2, sampler="Euler a",
              schedule="Automatic", guidance_scale=6.0)
    ours = sdxl_pipe.img2img(init, "a watercolor", control=[unit], **kw)
    ref = reference(StableDiffusionXLControlNetImg2ImgPipeline, sdxl_model, xl_folders, 1, "Euler a", ours.seeds)
    theirs = ref("a watercolor", negative_prompt="ugly", image=init, control_image=control_image(1, W, H), strength=0.6,
                 num_inference_steps=6, guidance_scale=6.0, num_images_per_prompt=2, generator=gens(9, 2),
                 controlnet_conditioning_scale=0.9, control_guidance_end=0.8, width=W, height=H).images
    plain = sdxl_pipe.img2img(init, "a watercolor", **kw)
    diff, effect = max_diff(ours.images, theirs), max_diff(ours.images, plain.images)
    print(f"sdxl controlnet parity img2img batch 2: max pixel diff {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE


def test_inpaint_matches_diffusers_inside_the_mask(sdxl_model, sdxl_pipe, xl_folders, xl_cns):
    image = noise_image(1)
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 6:22] = 255
    unit = ldm.ControlUnit(xl_cns[0], control_image(2, W, H), weight=1.0)
    kw = dict(negative_prompt="ugly", strength=1.0, mask_blur=0, steps=4, seed=9, sampler="Euler a",
              schedule="Automatic", guidance_scale=6)
    ours = sdxl_pipe.inpaint(image, Image.fromarray(mask), "a cat", control=[unit], **kw)
    ref = reference(StableDiffusionXLControlNetInpaintPipeline, sdxl_model, xl_folders, 1, "Euler a", ours.seeds)
    theirs = ref("a cat", negative_prompt="ugly", image=image, mask_image=Image.fromarray(mask),
                 control_image=control_image(2, W, H), strength=1.0, width=W, height=H, num_inference_steps=4,
                 guidance_scale=6, generator=gens(9, 1), controlnet_conditioning_scale=1.0).images
    plain = sdxl_pipe.inpaint(image, Image.fromarray(mask), "a cat", **kw)
    inside = mask >= 128  # diffusers does not paste back: compare the repainted area
    diff = int(np.abs(px(ours.images[0]) - px(theirs[0]))[inside].max())
    effect = int(np.abs(px(ours.images[0]) - px(plain.images[0]))[inside].max())
    print(f"sdxl controlnet parity inpaint: max pixel diff inside the mask {diff}, control effect {effect}")
    assert diff <= TOL
    assert effect > VISIBLE
