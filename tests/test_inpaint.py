"""Inpainting and outpainting: parity with diffusers' StableDiffusionInpaintPipeline (inpainting and
regular models), exact paste-back, the mask formats, only-masked crops, masked content, outpainting,
and the errors raised before any model work."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

import ldm
import tiny
from ldm import ModelKind, Pipeline, samplers
from ldm.masks import blur_mask

TOL = 2  # per pixel, out of 255
W, H = 32, 40  # (w, h): not square, to catch w/h mix-ups
FAST = dict(steps=2, seed=5, sampler="Euler", schedule="Automatic")


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    return tiny.save_model(tmp_path_factory.mktemp("tiny-inpaint"), unet_model=tiny.unet(seed=1, in_channels=9),
                           pipeline_class="StableDiffusionInpaintPipeline")


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_model):
    return ldm.load(inpaint_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def models(base_model, base_pipe, inpaint_model, inpaint_pipe):
    return {"base": (base_model, base_pipe), "inpaint": (inpaint_model, inpaint_pipe)}


def photo(w=W, h=H, seed=0) -> Image.Image:
    """A smooth colour image (noise would hide paste-back mistakes in the noise)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y + seed * 7) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask(w=W, h=H, box=(6, 8, 22, 30)) -> np.ndarray:
    """uint8 HxW, 255 inside box = (x0, y0, x1, y1)."""
    m = np.zeros((h, w), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return m


def px(image) -> np.ndarray:
    return np.asarray(image, np.int16)


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


# ---- parity with diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("kind,sampler,strength", [
    ("inpaint", "Euler a", 1.0), ("inpaint", "DPM++ 2M", 1.0), ("inpaint", "DDIM", 0.75),
    ("base", "Euler a", 1.0), ("base", "DDIM", 0.75), ("base", "Euler a", 0.75), ("base", "DPM++ 2M SDE", 0.6),
])
def test_masked_region_matches_diffusers(models, kind, sampler, strength):
    folder, pipe = models[kind]
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = box_mask()
    ours = pipe.inpaint(image, Image.fromarray(mask), "a cat", negative_prompt="ugly", strength=strength, mask_blur=0,
                        steps=4, seed=9, batch_size=2, sampler=sampler, schedule="Automatic", guidance_scale=6)
    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # Image i of our batch must equal diffusers' single image with seed + i (A1111's seed convention;
    # diffusers' own batches encode the input with the first generator only, so they do not have it).
    theirs = []
    for s in ours.seeds:
        ref.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(ref.scheduler.config), seeds=[s])
        theirs += ref("a cat", image=image, mask_image=Image.fromarray(mask), negative_prompt="ugly", strength=strength,
                      width=W, height=H, num_inference_steps=4, guidance_scale=6, generator=gens(s, 1)).images
    inside = mask >= 128  # diffusers binarises at 0.5 and does not paste back: compare the repainted area
    diffs = [int(np.abs(px(a) - px(b))[inside].max()) for a, b in zip(ours.images, theirs)]
    print(f"parity {kind} {sampler} strength {strength}: max pixel diff {diffs}")
    assert max(diffs) <= TOL
    for out in ours.images:  # and ours keeps the rest exactly
        assert np.array_equal(px(out)[~inside], px(image)[~inside])
    assert "Denoising strength: " + f"{strength:g}" in ours.infotexts[0] and "Mask blur: 0" in ours.infotexts[0]


# ---- paste-back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("area", ["whole", "masked"])
@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_exact_outside_blurred_mask(models, kind, area):
    _, pipe = models[kind]
    image, mask = photo(48, 40), Image.fromarray(box_mask(48, 40, (20, 14, 30, 26)))
    out = pipe.inpaint(image, mask, "a hat", mask_blur=4, inpaint_area=area, padding=8, **FAST).images[0]
    blurred = np.asarray(blur_mask(mask, 4))
    assert out.size == image.size
    assert (blurred > 0).sum() > (np.asarray(mask) > 0).sum()  # the blur really widened the mask
    assert np.array_equal(px(out)[blurred == 0], px(image)[blurred == 0])
    assert np.abs(px(out) - px(image))[np.asarray(mask) == 255].max() > 10  # something was painted


def test_odd_sized_image_is_generated_rounded_down_and_returned_at_its_size(base_pipe):
    shapes = []
    record = lambda i, n, lat: shapes.append(tuple(lat.shape))  # noqa: E731
    res = base_pipe.inpaint(photo(45, 38), Image.fromarray(box_mask(45, 38)), callback=record, **FAST)
    assert res.images[0].size == (45, 38)
    assert shapes[-1][2:] == (32 // base_pipe.vae_scale_factor, 40 // base_pipe.vae_scale_factor)  # 40x32
    assert "Size: 40x32" in res.infotexts[0]


# ---- mask formats -------------------------------------------------------------------------------


def _mask_variants(m: np.ndarray) -> dict:
    rng = np.random.default_rng(3)
    rgba = np.dstack([rng.integers(0, 256, m.shape + (3,), dtype=np.uint8), 255 - m])  # transparent = repaint
    return {
        "1": (Image.fromarray(m).convert("1"), {}),
        "RGB": (Image.fromarray(np.dstack([m] * 3)), {}),
        "RGBA alpha": (Image.fromarray(rgba), {}),
        "half size": (Image.fromarray(m[::2, ::2]), {}),  # resized nearest back to the same mask
        "inverted": (Image.fromarray(255 - m), {"invert_mask": True}),
        "numpy bool": (m > 0, {}),
    }


def test_mask_formats_all_give_the_same_result(base_pipe):
    image, m = photo(), box_mask()
    expected = base_pipe.inpaint(image, Image.fromarray(m), **FAST).images[0]
    infos = {}
    for name, (mask, extra) in _mask_variants(m).items():
        out = base_pipe.inpaint(image, mask, **FAST, **extra)
        assert np.array_equal(px(out.images[0]), px(expected)), name
        infos[name] = out.infotexts[0]
    assert "Mask mode: Inpaint not masked" in infos["inverted"] and "Mask mode" not in infos["RGB"]


def test_all_black_mask_is_an_error(base_pipe):
    with pytest.raises(ValueError, match="selects nothing"):
        base_pipe.inpaint(photo(), Image.new("L", (W, H), 0), **FAST)
    with pytest.raises(ValueError, match="selects nothing"):
        base_pipe.inpaint(photo(), Image.new("L", (W, H), 255), invert_mask=True, **FAST)


def test_all_white_mask_is_img2img(base_pipe):
    """A full mask repaints everything: with a regular model it is exactly img2img."""
    image = photo()
    kw = dict(strength=0.75, steps=4, seed=2, sampler="DPM++ 2M", schedule="Automatic")
    ours = base_pipe.inpaint(image, Image.new("L", (W, H), 255), **kw).images[0]
    plain = base_pipe.img2img(image, **kw).images[0]
    assert np.array_equal(px(ours), px(plain))


# ---- only masked --------------------------------------------------------------------------------


def test_only_masked_generates_the_crop_at_width_height(base_pipe):
    image = photo(64, 48)
    mask = box_mask(64, 48, (40, 30, 48, 38))  # small, near a corner
    shapes = []
    res = base_pipe.inpaint(image, Image.fromarray(mask), inpaint_area="masked", padding=4, width=32, height=24,
                            mask_blur=2, callback=lambda i, n, lat: shapes.append(tuple(lat.shape)), **FAST)
    out = res.images[0]
    f = base_pipe.vae_scale_factor
    assert out.size == (64, 48) and shapes[-1] == (1, 4, 24 // f, 32 // f)
    # the crop is the mask bbox + blur + padding, grown to 4:3: everything left of x=24 or above y=16 is untouched
    assert np.array_equal(px(out)[:, :24], px(image)[:, :24]) and np.array_equal(px(out)[:16], px(image)[:16])
    assert np.abs(px(out) - px(image))[mask == 255].max() > 10
    assert "Inpaint area: Only masked" in res.infotexts[0] and "Masked area padding: 4" in res.infotexts[0]
    assert "Size: 32x24" in res.infotexts[0]


def test_only_masked_differs_from_whole_picture(base_pipe):
    image, mask = photo(64, 48), Image.fromarray(box_mask(64, 48, (24, 16, 40, 32)))
    whole = base_pipe.inpaint(image, mask, **FAST).images[0]
    crop = base_pipe.inpaint(image, mask, inpaint_area="masked", padding=0, **FAST).images[0]
    assert not np.array_equal(px(whole), px(crop))


# ---- masked content -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_masked_content_variants_run_and_differ(models, kind):
    _, pipe = models[kind]
    image, m = photo(), box_mask()
    results = {c: pipe.inpaint(image, Image.fromarray(m), strength=0.75, masked_content=c, mask_blur=0, **FAST)
               for c in ("original", "fill", "latent_noise", "latent_nothing")}
    names = list(results)
    for i, a in enumerate(names):
        assert np.array_equal(px(results[a].images[0])[m == 0], px(image)[m == 0])
        for b in names[i + 1:]:
            assert not np.array_equal(px(results[a].images[0]), px(results[b].images[0])), (a, b)
    assert "Masked content" not in results["original"].infotexts[0]
    assert "Masked content: latent noise" in results["latent_noise"].infotexts[0]


# ---- outpainting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_outpaint_extends_and_keeps_the_original_exactly(models, kind):
    _, pipe = models[kind]
    image = photo(24, 32)
    res = pipe.outpaint(image, "a landscape", left=8, right=5, top=0, bottom=4, **FAST)  # 37x36: rounded to 32x32
    out = res.images[0]
    assert out.size == (24 + 8 + 5, 32 + 4)
    assert np.array_equal(px(out)[0:32, 8:32], px(image))  # mask blur 4, yet the original is exact
    canvas_left = np.repeat(px(image)[:, :1], 8, axis=1)  # what edge extension put there
    assert np.abs(px(out)[0:32, 0:8] - canvas_left).max() > 10  # the new area was generated
    assert "Outpaint: left 8 right 5 bottom 4" in res.infotexts[0]


def test_outpaint_errors(base_pipe):
    with pytest.raises(ValueError, match="at least one side"):
        base_pipe.outpaint(photo(), **FAST)
    with pytest.raises(ValueError, match=r"left must be a whole number, 0 or more \(pixels\), got -8"):
        base_pipe.outpaint(photo(), left=-8, **FAST)


# ---- bad input: clear errors before any model work ---------------------------------------------


@pytest.fixture
def no_model_calls(base_pipe):
    calls = []
    hook = base_pipe.unet.register_forward_hook(lambda *a: calls.append("unet"))
    encode = base_pipe.vae.encode
    base_pipe.vae.encode = lambda *a, **k: calls.append("vae") or encode(*a, **k)
    yield
    del base_pipe.vae.encode
    hook.remove()
    assert not calls, "model work started before the input was refused"


@pytest.mark.parametrize("args,kwargs,match", [
    ((photo(), Image.fromarray(box_mask(80, 20))), {}, "aspect ratios differ"),
    ((photo(), 42), {}, "mask must be"),
    ((photo(), [[0, 1]]), {}, "mask must be"),
    ((Image.new("RGB", (0, 10)), Image.new("L", (1, 1), 255)), {}, "empty image"),
    ((photo(), Image.fromarray(box_mask())), {"width": 36}, "multiple of 8"),
    ((photo(), Image.fromarray(box_mask())), {"inpaint_area": "everything"}, "inpaint_area must be one of"),
    ((photo(), Image.fromarray(box_mask())), {"masked_content": "latent noise"}, "masked_content must be one of"),
    ((photo(), Image.fromarray(box_mask())), {"padding": -1}, "padding must be"),
    ((photo(), Image.fromarray(box_mask())), {"mask_blur": -2}, "mask blur radius"),
    # ldm.params.MASK_BLUR's end: PIL's blur took the process down near 1e10 (the page's track ends at 64)
    ((photo(), Image.fromarray(box_mask())), {"mask_blur": 1025},
     r"mask blur radius must be a number of pixels from 0 to 1024, got 1025"),
    ((photo(), Image.fromarray(box_mask())), {"mask_blur": 10**10}, "mask blur radius"),
    ((photo(), Image.fromarray(box_mask())), {"invert_mask": "yes"}, "invert_mask must be"),
    ((photo(), Image.fromarray(box_mask())), {"strength": 0}, "strength"),
    ((photo(), Image.fromarray(box_mask(box=(9, 9, 10, 10)))), {"mask_blur": 4}, "too small to repaint"),
    ((photo(2100, 16), Image.new("L", (2100, 16), 255)), {}, "pass width and height"),
])
def test_bad_input_is_refused_early(base_pipe, no_model_calls, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        base_pipe.inpaint(*args, **{**FAST, **kwargs})


def test_upscaler_models_are_refused(base_pipe):
    upscaler = Pipeline(dataclasses.replace(base_pipe.components, kind=ModelKind.UPSCALE), base_pipe.options, base_pipe.accel)
    with pytest.raises(ValueError, match="regular .* or inpainting"):
        upscaler.inpaint(photo(), Image.fromarray(box_mask()))
    with pytest.raises(ValueError, match="regular .* or inpainting"):
        upscaler.outpaint(photo(), left=8)

