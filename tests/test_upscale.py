"""x4 upscaler (parity with diffusers, tiling, memory), hires fix, classic resamplers, VAE tiling."""
import contextlib
import ctypes
import gc
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

import ldm
import tiny
from ldm import samplers, tiling
from ldm.tasks import upscale_x4 as up
from ldm.latents import decode, encode, generators
from ldm.params import AUTO_TILE_OVERLAP
from ldm import ModelLoadError

TOL = 2  # per-pixel, out of 255


@pytest.fixture(scope="module")
def upscaler_model(tmp_path_factory) -> Path:
    return tiny.save_upscaler(tmp_path_factory.mktemp("tiny-x4"))


@pytest.fixture(scope="module")
def up_pipe(upscaler_model):
    return ldm.load(upscaler_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def local_pipe(tmp_path_factory):
    """An upscaler whose output pixels depend only on a bounded neighbourhood of the input: no
    attention and no GroupNorm (both look at the whole tile). Isolates what tiling itself does."""
    pipe = ldm.load(tiny.save_upscaler(tmp_path_factory.mktemp("tiny-x4-local"), attention=False), device="cpu", dtype="float32")
    for model in (pipe.unet, pipe.vae):
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(module, name, torch.nn.Identity())
    return pipe


def noise_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth_image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 9), 128 + 90 * np.sin((x + y) / 11)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def arr(im) -> np.ndarray:
    return np.asarray(im, np.float32)


def max_diff(a, b) -> int:
    return max(int(np.abs(arr(x) - arr(y)).max()) for x, y in zip(a, b))


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def reference(folder, sampler, seeds):
    ref = StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = samplers.make_scheduler(sampler, "Automatic", dict(ref.scheduler.config), seeds=seeds)
    return ref


# ---- loading -----------------------------------------------------------------------------------

def test_upscaler_folder_loads_with_its_low_res_scheduler(up_pipe, upscaler_model, tmp_path):
    assert up_pipe.kind == ldm.ModelKind.UPSCALE
    assert up_pipe.vae_scale_factor == 4  # from the VAE config: three blocks
    assert up_pipe.components.max_noise_level == 350
    assert up_pipe.components.low_res_scheduler_config["_class_name"] == "DDPMScheduler"
    broken = tiny.save_upscaler(tmp_path / "broken")
    (broken / "low_res_scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match="low_res_scheduler"):
        ldm.load(broken, device="cpu")


# ---- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M"])
def test_upscale_matches_diffusers(upscaler_model, up_pipe, sampler):
    image = noise_image(24, 32)
    ours = up_pipe.upscale(image, "a cat", negative_prompt="blurry", steps=3, seed=5, sampler=sampler, noise_level=30)
    assert ours.images[0].size == (128, 96)
    theirs = reference(upscaler_model, sampler, ours.seeds)(
        "a cat", image=image, negative_prompt="blurry", num_inference_steps=3, guidance_scale=9.0, noise_level=30,
        generator=gens(5, 1)).images
    assert max_diff(ours.images, theirs) <= TOL
    assert "Noise level: 30" in ours.infotexts[0] and "Size: 128x96" in ours.infotexts[0]


def test_upscale_batch_image_i_is_seed_plus_i(upscaler_model, up_pipe):
    """diffusers draws the low-res image's noise once, from the first generator; we draw it per image
    so image i equals a single run with seed + i. Image 0 is therefore identical to diffusers'."""
    image = noise_image(16, 16, seed=1)
    kw = dict(steps=2, sampler="DDIM", guidance_scale=9.0)
    batch = up_pipe.upscale(image, "a dog", seed=7, batch_size=2, **kw)
    theirs = reference(upscaler_model, "DDIM", batch.seeds)(
        "a dog", image=image, num_inference_steps=2, num_images_per_prompt=2, generator=gens(7, 2)).images
    assert max_diff(batch.images[:1], theirs[:1]) <= TOL
    single = up_pipe.upscale(image, "a dog", seed=8, **kw)
    assert max_diff(batch.images[1:], single.images) <= 1  # batched convolutions round differently
    assert max_diff(batch.images[1:], batch.images[:1]) > 10


def test_noise_level_is_the_class_label(up_pipe):
    image = noise_image(16, 16)
    labels = []
    hook = up_pipe.unet.register_forward_pre_hook(lambda m, a, kw: labels.append(kw["class_labels"].tolist()), with_kwargs=True)
    try:
        up_pipe.upscale(image, steps=1, seed=1, noise_level=77, guidance_scale=9.0)
    finally:
        hook.remove()
    assert labels == [[77, 77]]  # [uncond, cond]


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_upscale_input_is_refused_before_model_work(up_pipe, base_pipe):
    calls = []
    hook = up_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"32x24 x4 gives 128x96; the largest side allowed is 100"):
            up_pipe.with_options(max_upscale_size=100).upscale(noise_image(24, 32))
        with pytest.raises(ValueError, match="cannot load an image from int"):
            up_pipe.upscale(42)
        with pytest.raises(ValueError, match="not an image file"):
            up_pipe.upscale(b"definitely not a png")
        with pytest.raises(ValueError, match="noise_level must be a whole number from 0 to 350"):
            up_pipe.upscale(noise_image(16, 16), noise_level=351)
        with pytest.raises(ValueError, match="does not take width"):
            up_pipe.upscale(noise_image(16, 16), width=64)
        with pytest.raises(ValueError, match="tile_overlap must be"):
            up_pipe.upscale(noise_image(16, 16), tile_size=16, tile_overlap=12)
        with pytest.raises(ValueError, match=r"tile_size must be a whole number, 8 or more"):
            up_pipe.upscale(noise_image(16, 16), tile_size=4)
        with pytest.raises(ValueError, match=r"tile_overlap must be a whole number, 0 or more \(input pixels\), "
                                             r"got -1"):
            up_pipe.upscale(noise_image(16, 16), tile_overlap=-1)
        with pytest.raises(ValueError, match="too small"):
            up_pipe.upscale(noise_image(3, 16))
    finally:
        hook.remove()
    assert calls == []
    with pytest.raises(ValueError, match="upscale needs a upscale model"):
        base_pipe.upscale(noise_image(16, 16))
    with pytest.raises(ValueError, match="hires fix needs a base model"):
        up_pipe.hires_fix(noise_image(16, 16))


# ---- tiling ------------------------------------------------------------------------------------

def test_tile_plan_covers_with_overlap():
    boxes = tiling.plan(100, 64, 40, 8)
    assert tiling.starts(100, 40, 8) == [0, 30, 60] and tiling.starts(64, 40, 8) == [0, 24]
    assert all(b.height == 40 and b.width == 40 for b in boxes)
    total = sum(tiling.weights(b, boxes, 2)[None] for b in boxes[:1])  # weights of one tile: 1 inside, ramps at shared edges
    assert total[0, 0, 0] == 1 and total[0, -1, -1] < 0.01
    canvas = torch.zeros(200, 128)
    for b in boxes:
        b.scaled(2).crop(canvas[None])[0].add_(tiling.weights(b, boxes, 2))
    assert torch.allclose(canvas, torch.ones_like(canvas), atol=1e-6)  # ramps are a partition of unity


def test_tiling_changes_only_pixels_near_tile_borders(local_pipe):
    """With a model that sees a bounded neighbourhood, tiles get exactly the crops of the untiled
    inputs (image, noise, latents), so outside the overlap bands the output is the same."""
    image = noise_image(64, 64)
    kw = dict(steps=2, seed=5, sampler="DDIM", guidance_scale=9.0)
    whole = arr(local_pipe.upscale(image, "x", **kw).images[0])
    tiled = local_pipe.upscale(image, "x", tile_size=36, tile_overlap=2, **kw)
    assert "Upscale tile: 36" in tiled.infotexts[0]
    diff = np.abs(arr(tiled.images[0]) - whole).max(-1)
    band = np.zeros(64 * 4, bool)
    band[(28 - 4) * 4 : (36 + 4) * 4] = True  # the one overlap (low-res 28..36) plus a margin, in output pixels
    near = band[:, None] | band[None, :]
    assert diff[~near].max() <= 1  # rounding only
    assert diff[near].max() <= 8 and diff.mean() < 0.5


def test_tiled_upscale_shows_no_seam(up_pipe):
    """The full tiny model (attention, GroupNorm: every pixel sees the whole tile) differs a little
    everywhere when tiled, but the ramps leave no seam: the pixel-to-pixel gradient across the
    overlaps is the same as elsewhere."""
    image = smooth_image(48, 48)
    kw = dict(steps=2, seed=5, sampler="DDIM", guidance_scale=9.0)
    whole = arr(up_pipe.upscale(image, "x", **kw).images[0])
    tiled = arr(up_pipe.upscale(image, "x", tile_size=32, tile_overlap=16, **kw).images[0])
    other_seed = arr(up_pipe.upscale(image, "x", **{**kw, "seed": 6}).images[0])
    tiling_diff = np.abs(tiled - whole).mean()
    assert tiling_diff < 0.5 * np.abs(other_seed - whole).mean()  # much less than a change of seed
    grad_tiled = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2))  # per column boundary
    grad_whole = np.abs(np.diff(whole, axis=1)).mean(axis=(0, 2))
    assert np.abs(grad_tiled - grad_whole).max() < 0.15 * grad_whole.mean()


def test_auto_tiles_fit_the_memory_budget(local_pipe):
    pipe = local_pipe
    assert up.choose_tile(pipe, 64, 64, 1, False, budget=10**12) is None  # fits: one piece, exact path
    budget_mb = 64
    tile = up.choose_tile(pipe, 96, 96, 1, False, budget=budget_mb * 2**20)
    assert tile is not None and tile < 96
    assert up.tile_bytes(pipe, tile, tile, 1, False) <= budget_mb * 2**20 < up.tile_bytes(pipe, tile + 2, tile + 2, 1, False)
    assert up.tile_bytes(pipe, 96, 96, 1, False) > 3 * budget_mb * 2**20  # untiled would need far more

    kw = dict(steps=1, seed=1, guidance_scale=1.0)
    pipe.upscale(noise_image(16, 16), "x", **kw)  # warm up: lazy imports and kernel caches are not per-tile memory
    with _freed_memory_leaves_rss():
        gc.collect()
        before = _rss()
        _reset_peak_rss()
        result = pipe.upscale(noise_image(96, 96), "x", memory_budget_mb=budget_mb, **kw)
        growth_mb = (_peak_rss() - before) / 2**20
    assert f"Upscale tile: {tile}, Upscale tile overlap: {tile // 4}" in result.infotexts[0]
    assert result.images[0].size == (384, 384)
    assert growth_mb <= budget_mb, f"peak RSS grew {growth_mb:.0f} MB with a {budget_mb} MB budget"


def test_automatic_tiles_lower_a_larger_overlap_and_say_so(local_pipe, caplog):
    budget = up.tile_bytes(local_pipe, 24, 24, 1, False)  # room for a tile of about 24 of the 48 pixels
    tile = up.choose_tile(local_pipe, 48, 48, 1, False, budget=budget)
    assert tile is not None and tile < 48
    used = int(tile * AUTO_TILE_OVERLAP)
    with caplog.at_level(logging.WARNING, logger=up.__name__):
        result = local_pipe.upscale(noise_image(48, 48), steps=1, seed=1, guidance_scale=1.0, tile_overlap=100,
                                    memory_budget_mb=budget / 2**20)
    assert f"Upscale tile: {tile}, Upscale tile overlap: {used}" in result.infotexts[0]
    assert f"tile_overlap 100 is more than {AUTO_TILE_OVERLAP:.0%} of the automatic {tile}-pixel tile: using {used}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=up.__name__):  # one that fits is used as given, without a word
        result = local_pipe.upscale(noise_image(48, 48), steps=1, seed=1, guidance_scale=1.0, tile_overlap=2,
                                    memory_budget_mb=budget / 2**20)
    assert f"Upscale tile: {tile}, Upscale tile overlap: 2" in result.infotexts[0] and "tile_overlap" not in caplog.text


def test_out_of_memory_retries_with_smaller_tiles(local_pipe, caplog):
    sizes = []

    def fail_big(module, args):
        sizes.append(args[0].shape[-1])
        if args[0].shape[-1] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = local_pipe.unet.register_forward_pre_hook(fail_big)
    try:
        with caplog.at_level(logging.WARNING, logger=up.__name__):
            result = local_pipe.upscale(noise_image(48, 48), steps=1, seed=1, guidance_scale=1.0, tile_overlap=32)
        assert sizes[0] == 48 and set(sizes[1:]) == {24}  # whole image failed, then 24-pixel tiles
        assert "Upscale tile: 24, Upscale tile overlap: 6" in result.infotexts[0]  # overlap capped at a quarter
        assert f"tile_overlap 32 is more than {AUTO_TILE_OVERLAP:.0%} of the halved 24-pixel tile: using 6" in caplog.text
        assert result.images[0].size == (192, 192)
    finally:
        hook.remove()
    hook = local_pipe.unet.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    try:
        with pytest.raises(ldm.OutOfMemory, match="out of memory even with 16-pixel tiles"):
            local_pipe.upscale(noise_image(48, 48), steps=1, seed=1, guidance_scale=1.0, tile_size=16, tile_overlap=4)
    finally:
        hook.remove()


@contextlib.contextmanager
def _freed_memory_leaves_rss():
    """glibc raises its mmap threshold after large frees, so freed tile buffers stay in the heap and
    RSS counts them again for the next tile's differently sized buffers. A fixed threshold makes
    peak RSS measure live memory; afterwards it is left at glibc's dynamic maximum (32 MB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("needs glibc")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 * 2**20)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    pytest.skip("needs Linux /proc")


def _rss() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    return _status("VmHWM")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here")


# ---- VAE tiling --------------------------------------------------------------------------------

def test_vae_tiling_decode_and_encode(base_pipe):
    vae = base_pipe.vae
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = decode(vae, latents)
        assert torch.equal(decode(vae, latents, tile=32), whole)  # fits in one tile: the plain path
        tiled = decode(vae, latents, tile=12)
        assert tiled.shape == whole.shape == (1, 3, 48, 40)
        assert (tiled - whole).abs().mean() < 0.2 * whole.std()  # random VAE: GroupNorm sees the whole tile
        pixels = whole.clamp(-1, 1)
        a = encode(vae, pixels, generators([3]))
        b = encode(vae, pixels, generators([3]), tile=12)
        assert a.shape == b.shape and (a - b).abs().mean() < 0.25 * a.std()


def test_pipeline_vae_tiling_option(base_pipe):
    kw = dict(width=48, height=48, steps=2, seed=3)
    plain = base_pipe.txt2img("x", **kw)
    tiled = base_pipe.with_options(vae_tiling=True, vae_tile_size=12).txt2img("x", **kw)
    assert torch.equal(plain.latents, tiled.latents)  # the loop is untouched, only the decode differs
    assert 0 < np.abs(arr(plain.images[0]) - arr(tiled.images[0])).mean() < 10


# ---- classic resamplers ------------------------------------------------------------------------

@pytest.mark.parametrize("method,filt", [("lanczos", Image.LANCZOS), ("bicubic", Image.BICUBIC), ("nearest", Image.NEAREST)])
def test_upscale_image_is_pil_resize(method, filt):
    image = noise_image(15, 21)
    out = ldm.upscale_image(image, 2.5, method)
    assert out.size == (52, 38)  # 21 * 2.5 = 52.5 -> 52 (round half to even), 15 * 2.5 = 37.5 -> 38
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((52, 38), filt)))


def test_upscale_image_errors():
    with pytest.raises(ValueError, match="unknown resampling method 'esrgan'; choose one of: lanczos, bicubic, nearest"):
        ldm.upscale_image(noise_image(8, 8), 2, "esrgan")
    with pytest.raises(ValueError, match="scale must be a number above 0"):
        ldm.upscale_image(noise_image(8, 8), 0)
    with pytest.raises(ValueError, match="8x8 x1000 gives 8000x8000; the largest side allowed is 4096"):
        ldm.upscale_image(noise_image(8, 8), 1000)
    with pytest.raises(ValueError, match="cannot load an image from list"):
        ldm.upscale_image([1, 2], 2)


# ---- hires fix ---------------------------------------------------------------------------------

def test_txt2img_hires_is_first_pass_plus_hires_fix(base_pipe):
    kw = dict(negative_prompt="ugly", width=32, height=24, steps=6, seed=4, batch_size=2, sampler="Euler")
    one_call = base_pipe.txt2img("a house", hires_scale=2.0, hires_strength=0.5, **kw)
    first = base_pipe.txt2img("a house", **kw)
    two_calls = base_pipe.hires_fix(first, scale=2.0, strength=0.5)  # prompt and settings come from the result
    assert one_call.images[0].size == (64, 48)
    assert max_diff(one_call.images, two_calls.images) == 0
    info = one_call.infotexts[1]
    for field in ("Size: 32x24", "Steps: 6", "Seed: 5", "Denoising strength: 0.5", "Hires upscale: 2", "Hires upscaler: Latent"):
        assert field in info
    assert "Hires steps" not in info
    assert one_call.infotexts == two_calls.infotexts


def test_hires_steps_and_strength_set_the_second_pass(base_pipe):
    seen = []
    r = base_pipe.txt2img("x", width=32, height=32, steps=4, seed=1, hires_scale=1.5, hires_steps=10, hires_strength=0.3,
                          callback=lambda i, n, lat: seen.append((n, tuple(lat.shape[-2:]))))
    assert seen[0] == (4, (16, 16)) and seen[-1] == (3, (24, 24))  # int(10 * 0.3) steps at 48x48 / 2
    assert "Hires steps: 10" in r.infotexts[0] and "Hires upscale: 1.5" in r.infotexts[0]
    plain = base_pipe.txt2img("x", width=32, height=32, steps=4, seed=1, hires_scale=1.0)
    assert plain.images[0].size == (32, 32) and "Hires" not in plain.infotexts[0]


def test_lanczos_hires_is_img2img_of_the_lanczos_image(base_pipe):
    """The pixel path is exactly img2img (itself exact against diffusers) on the Lanczos-enlarged image."""
    image = smooth_image(24, 32)
    ours = base_pipe.hires_fix(image, "a lake", scale=1.5, upscaler="lanczos", strength=0.6, steps=5, seed=2, sampler="DDIM")
    big = image.resize((48, 32), Image.LANCZOS)
    ref = base_pipe.img2img(big, "a lake", strength=0.6, steps=5, seed=2, sampler="DDIM")
    assert ours.images[0].size == (48, 32)
    assert max_diff(ours.images, ref.images) == 0
    assert "Hires upscaler: Lanczos" in ours.infotexts[0] and "Size: 32x24" in ours.infotexts[0]


def test_bad_hires_settings_fail_before_the_first_pass(base_pipe):
    calls = []
    hook = base_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"1024x1024 with hires scale 4 gives 4096x4096; the largest side allowed is 2048"):
            base_pipe.txt2img("x", width=1024, height=1024, hires_scale=4)
        with pytest.raises(ValueError, match="unknown hires upscaler 'ESRGAN'; choose one of: latent, lanczos"):
            base_pipe.txt2img("x", width=32, height=32, hires_scale=2, hires_upscaler="ESRGAN")
        with pytest.raises(ValueError, match="strength"):
            base_pipe.txt2img("x", width=32, height=32, hires_scale=2, hires_strength=0)
        with pytest.raises(ValueError, match="hires scale must be 1 or more"):
            base_pipe.txt2img("x", width=32, height=32, hires_scale=0.5)
        for steps in (0, base_pipe.limits.max_steps + 1):  # named as the second pass's, not the first's "steps"
            with pytest.raises(ValueError, match=rf"^hires steps must be a whole number from 1 to {base_pipe.limits.max_steps} "
                                                 rf"\(unset: as many as the first pass\), got {steps}$"):
                base_pipe.txt2img("x", width=32, height=32, hires_scale=2, hires_steps=steps)
    finally:
        hook.remove()
    assert calls == []
    result = base_pipe.txt2img("x", width=32, height=32, steps=1, seed=1)
    result.latents = None
    with pytest.raises(ValueError, match="no latents"):
        base_pipe.hires_fix(result)
