"""The SDXL refiner (`txt2img(..., refiner=, refiner_switch_at=)`): one sampler run that switches U-Net and
conditioning, exact against diffusers' base (`denoising_end`) then refiner (`denoising_start`) hand-off under
Euler and Euler a (where the two agree), and the errors raised before any model work."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

import ldm
import tiny_sdxl
from ldm import ModelKind, samplers

TOL = 2
W, H = 32, 24


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return tiny_sdxl.save_model(tmp_path_factory.mktemp("xl-base"))


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return tiny_sdxl.save_refiner(tmp_path_factory.mktemp("xl-refiner") / "tiny-refiner")


@pytest.fixture(scope="module")
def xl(base_folder):
    return ldm.load(base_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def refiner(refiner_folder):
    return ldm.load(refiner_folder, device="cpu", dtype="float32")


def px(image):
    return np.asarray(image, np.int16)


def max_diff(ours, theirs) -> int:
    return max(int(np.abs(px(a) - px(b)).max()) for a, b in zip(ours, theirs))


def diffusers_pipe(cls, folder, sampler, seeds):
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config), seeds=seeds)
    return pipe


def test_refiner_folder_loads_as_a_refiner(refiner):
    assert refiner.kind is ModelKind.REFINER and refiner.family.name == "sdxl" and refiner.family.is_refiner
    assert refiner.components.text_encoder is None and refiner.components.tokenizer is None
    assert refiner.family.time_ids(24, 32, 6.0).tolist() == [[24, 32, 0, 0, 6.0]]  # aesthetic score, not the target size


@pytest.mark.parametrize("sampler,switch_at", [("Euler", 0.8), ("Euler a", 0.8), ("Euler", 0.5)])
def test_refiner_switch_matches_diffusers_hand_off(xl, refiner, base_folder, refiner_folder, sampler, switch_at):
    kw = dict(negative_prompt="fog", width=W, height=H, guidance_scale=7.0)
    ours = xl.txt2img("a castle on a hill", steps=10, seed=3, sampler=sampler, batch_size=2, refiner=refiner,
                      refiner_switch_at=switch_at, **kw)
    gens = [torch.Generator("cpu").manual_seed(3 + i) for i in range(2)]  # one generator list through both calls
    base = diffusers_pipe(StableDiffusionXLPipeline, base_folder, sampler, ours.seeds)
    latents = base("a castle on a hill", num_inference_steps=10, denoising_end=switch_at, output_type="latent",
                   num_images_per_prompt=2, generator=gens, **kw).images
    ref = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, refiner_folder, sampler, ours.seeds)
    theirs = ref("a castle on a hill", image=latents, num_inference_steps=10, denoising_start=switch_at,
                 num_images_per_prompt=2, generator=gens, negative_prompt="fog", guidance_scale=7.0).images
    diff = max_diff(ours.images, theirs)
    print(f"sdxl refiner {sampler} switch at {switch_at}: max pixel diff {diff}")
    assert diff <= TOL
    if switch_at == 0.5:  # the refiner really ran
        plain = xl.txt2img("a castle on a hill", steps=10, seed=3, sampler=sampler, batch_size=2, **kw)
        assert max_diff(ours.images, plain.images) > TOL
    assert f"Refiner: tiny-refiner [{refiner.model_hash}], Refiner switch at: {switch_at:g}" in ours.infotexts[0]


def test_refiner_errors_come_before_any_model_work(xl, refiner, base_pipe):
    calls = []
    modules = [xl.unet, xl.vae, xl.text_encoder, refiner.unet, refiner.components.text_encoder_2, base_pipe.unet]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in modules]
    try:
        with pytest.raises(ValueError, match="a refiner needs SDXL models.*the 'sd' family"):
            xl.txt2img("x", width=W, height=H, refiner=base_pipe)  # an SD 1.x model as the refiner
        with pytest.raises(ValueError, match="refiner_switch_at must be"):
            xl.txt2img("x", width=W, height=H, refiner=refiner, refiner_switch_at=1.5)
        with pytest.raises(ValueError, match="txt2img needs a base model.*refiner model"):
            refiner.txt2img("x", width=W, height=H)  # a refiner used as a base
        with pytest.raises(ValueError, match="not supported yet"):
            xl.txt2img("x", width=W, height=H, refiner=refiner, hires_scale=1.5)
        with pytest.raises(ValueError, match="steps must be"):
            xl.txt2img("x", width=W, height=H, refiner=refiner, steps=0)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_cli_txt2img_with_a_refiner(base_folder, refiner_folder, tmp_path):
    from ldm.__main__ import main
    from ldm.metadata import parse_infotext, read_infotext
    from PIL import Image

    out = tmp_path / "xl.png"
    args = ["txt2img", "--model", str(base_folder), "a castle", "--seed", "3", "--steps", "4", "--sampler", "Euler",
            "--dtype", "float32", "--out", str(out)]
    assert main([*args, "--refiner", str(refiner_folder), "--refiner-switch-at", "0.5"]) == 0
    info = parse_infotext(read_infotext(Image.open(out)))
    assert Image.open(out).size == (32, 32)  # the SDXL model's default size
    assert info["Refiner"].startswith("tiny-refiner [") and info["Refiner switch at"] == "0.5"
    assert main([*args, "--refiner", str(base_folder), "--refiner-switch-at", "2"]) == 2  # error, exit status 2
