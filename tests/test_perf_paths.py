"""Performance paths: no extra work in the loop, throttled previews, dtype selection, the GPU-only
options (selection logic with torch.cuda / xformers / accelerate mocked), NaN retry, the fast preset."""
import statistics
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

import ldm
from ldm import accel, latents
from ldm import devices as loading
from ldm.extensions import fast as fastpath

CPUINFO_BF16 = "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n"
CPUINFO_PLAIN = "processor : 0\nflags : fpu sse avx2 avx512f\n"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def small(pipe, **kw):
    args = dict(width=32, height=32, steps=4, seed=5, sampler="DPM++ 2M", guidance_scale=7.0)
    return pipe.txt2img("a red circle", **{**args, **kw})


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in result.images])


# ---- the loop does diffusers' work and nothing more ---------------------------------------------


def test_loop_calls_unet_once_per_step_with_doubled_batch(base_pipe):
    batches = []
    hook = base_pipe.unet.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    try:
        small(base_pipe, steps=5, batch_size=2)
    finally:
        hook.remove()
    assert batches == [4] * 5  # steps x one forward of [uncond, cond] for B=2


def test_ui_callback_previews_every_n_steps_only(base_pipe, monkeypatch):
    streaming = pytest.importorskip("ui.streaming")
    calls = []
    real = streaming.latent_preview
    monkeypatch.setattr(streaming, "latent_preview", lambda *a: calls.append(1) or real(*a))
    for every, expected in ((5, 2), (0, 0)):  # 12 steps: previews after steps 5 and 10, none on the last
        calls.clear()
        gen = streaming.stream_call(lambda cb: small(base_pipe, steps=12, callback=cb), threading.Event(), every)
        steps = [s for s in gen if isinstance(s, streaming.Step)]
        assert len(calls) == expected
        assert steps and steps[-1].step <= 12


def test_preview_costs_far_less_than_a_step():
    """SD latents at 512 px are 64x64; a CPU U-Net step there takes seconds, so 20 ms is < 2 %."""
    x = torch.randn(1, 4, 64, 64)
    latents.preview(x)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        latents.preview(x)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.02


# ---- dtypes -------------------------------------------------------------------------------------


def test_native_bf16_detection_from_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert loading.cpu_has_native_bf16(CPUINFO_BF16)
    assert loading.cpu_has_native_bf16(CPUINFO_BF16.replace("avx512_bf16", "amx_bf16"))
    assert not loading.cpu_has_native_bf16(CPUINFO_PLAIN)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # torch would not use the flags
    assert not loading.cpu_has_native_bf16(CPUINFO_BF16)


def test_auto_dtype_selection():
    bf16_cpu = loading.resolve_dtypes("auto", CPU, native_bf16=True)
    assert (bf16_cpu.unet, bf16_cpu.text_encoder, bf16_cpu.vae) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert loading.resolve_dtypes("auto", CPU, native_bf16=False) == loading.ComponentDtypes.same(torch.float32)
    assert loading.resolve_dtypes("auto", CUDA) == loading.ComponentDtypes.same(torch.float16)
    assert loading.resolve_dtypes(None, CPU, native_bf16=True) == bf16_cpu  # auto is the default
    assert loading.resolve_dtypes(None, CPU, native_bf16=False) == loading.ComponentDtypes.same(torch.float32)
    assert loading.resolve_dtypes(None, CUDA) == loading.ComponentDtypes.same(torch.float16)
    assert loading.resolve_dtypes("bf16", CPU) == loading.ComponentDtypes.same(torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        loading.resolve_dtypes("int4", CPU)


def test_default_path_on_a_cpu_without_bf16_is_diffusers_image_exactly(base_model, monkeypatch):
    """Issue 22's regression guard: speed work must not change what `ldm.load(model)` with no options draws.
    On a CPU without native bf16 (most AVX2 machines) that is diffusers' own image, to the pixel."""
    from diffusers import StableDiffusionPipeline

    from ldm import samplers

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    pipe = ldm.load(base_model, device="cpu")
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float32
    assert (pipe.accel.channels_last, pipe.accel.compiled, pipe.accel.offload) == (False, False, "none")
    ours = small(pipe, batch_size=2)
    ref = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = samplers.make_scheduler("DPM++ 2M", "Automatic", dict(ref.scheduler.config), seeds=ours.seeds)
    theirs = ref("a red circle", width=32, height=32, num_inference_steps=4, guidance_scale=7.0,
                 num_images_per_prompt=2, generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds]).images
    assert np.array_equal(pixels(ours), np.stack([np.asarray(im, np.int16) for im in theirs]))


def test_auto_on_bf16_cpu_loads_mixed_dtypes_and_stays_close_to_fp32(base_model, base_pipe, monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    pipe = ldm.load(base_model, device="cpu", dtype="auto")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    assert pipe.dtype == torch.float32  # latents and sampler state stay fp32 under a bf16 U-Net
    assert pipe.accel.attention == "chunked"
    r = small(pipe)
    assert r.latents.dtype == torch.float32
    diff = np.abs(pixels(r) - pixels(small(base_pipe)))
    assert diff.mean() < 8  # bf16 rounding, not a different picture


# ---- attention / channels_last / compile / offload ----------------------------------------------


def test_attention_selection():
    assert accel.select_attention("auto", CPU, probe=lambda d: pytest.fail("no probe on CPU")) == "sdpa"
    assert accel.select_attention("auto", CPU, unet_dtype=torch.bfloat16) == "chunked"
    assert accel.select_attention("sdpa", CPU, unet_dtype=torch.bfloat16) == "sdpa"
    assert accel.select_attention("sdpa", CUDA, probe=lambda d: pytest.fail("no probe for sdpa")) == "sdpa"
    assert accel.select_attention("auto", CUDA, probe=lambda d: True) == "xformers"
    assert accel.select_attention("auto", CUDA, probe=lambda d: False) == "sdpa"
    assert accel.select_attention("xformers", CUDA, probe=lambda d: True) == "xformers"
    with pytest.raises(ValueError, match="not installed or does not work"):
        accel.select_attention("xformers", CUDA, probe=lambda d: False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        accel.select_attention("xformers", CPU)


def _fake_xformers(monkeypatch, attention):
    ops = types.SimpleNamespace(memory_efficient_attention=attention)
    module = types.ModuleType("xformers")
    module.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", module)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_probe_needs_import_and_a_working_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    assert not accel.xformers_works(CPU)
    _fake_xformers(monkeypatch, lambda q, k, v: q)
    assert accel.xformers_works(CPU)

    def broken(q, k, v):
        raise RuntimeError("no kernel image is available for execution on the device")

    _fake_xformers(monkeypatch, broken)
    assert not accel.xformers_works(CPU)


def test_load_records_choices_and_rejects_unknown_options(base_model):
    pipe = ldm.load(base_model, device="cpu", dtype="float32", channels_last=True)
    assert pipe.accel == accel.Accel(device=CPU, attention="sdpa", channels_last=True, compiled=False, offload="none")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert small(pipe).images[0].size == (32, 32)
    with pytest.raises(ValueError, match="attention must be one of"):
        ldm.load(base_model, device="cpu", attention="flash")
    with pytest.raises(ValueError, match="offload must be one of"):
        ldm.load(base_model, device="cpu", offload="disk")
    assert accel.use_channels_last(None, CUDA) and not accel.use_channels_last(None, CPU)


def test_compile_is_applied_once_and_warmup_runs_a_generation(base_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(accel, "compile_unet", compiled.append)
    pipe = ldm.load(base_model, device="cpu", dtype="float32", compile=True)
    assert compiled == [pipe.unet] and pipe.accel.compiled
    sizes = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape)))
    pipe.warmup(48, 32)
    hook.remove()
    assert sizes and all(s == (2, 4, 16, 24) for s in sizes)  # the guided batch at the requested size


def test_offload_is_a_noop_on_cpu(base_pipe, caplog):
    with caplog.at_level("WARNING"):
        assert accel.apply_offload(base_pipe.components, "model", CPU) == "none"
    assert "does nothing on cpu" in caplog.text
    assert accel.weights_device(CUDA, "model") == CPU
    assert accel.weights_device(CUDA, "none") == CUDA
    assert accel.weights_device(CPU, "sequential") == CPU


def test_offload_on_cuda_hooks_components_in_use_order(base_pipe, monkeypatch):
    calls = []

    def with_hook(module, device, prev_module_hook=None):
        calls.append(("model", module, device, prev_module_hook))
        return module, f"hook{len(calls)}"

    fake = types.ModuleType("accelerate")
    fake.cpu_offload_with_hook = with_hook
    fake.cpu_offload = lambda module, execution_device: calls.append(("sequential", module, execution_device, None))
    monkeypatch.setitem(sys.modules, "accelerate", fake)
    c = base_pipe.components
    assert accel.apply_offload(c, "model", CUDA) == "model"
    assert [m for _, m, _, _ in calls] == [c.text_encoder, c.unet, c.vae]
    assert [h for *_, h in calls] == [None, "hook1", "hook2"]  # each hook evicts the previous component
    calls.clear()
    assert accel.apply_offload(c, "sequential", CUDA) == "sequential"
    assert [(kind, m) for kind, m, _, _ in calls] == [("sequential", c.text_encoder), ("sequential", c.unet), ("sequential", c.vae)]


def test_chunked_attention_matches_sdpa(base_model):
    q, k, v = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 77, 8), torch.randn(2, 3, 77, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(accel.chunked_attention(q, k, v, 8**-0.5, rows=16), ref, atol=1e-5)
    plain = ldm.load(base_model, device="cpu", dtype="float32")
    chunked = ldm.load(base_model, device="cpu", dtype="float32")
    accel.apply_attention(chunked.unet, chunked.vae, "chunked")
    assert all(type(p).__name__ == "ChunkedAttention" for p in chunked.unet.attn_processors.values())
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.inference_mode():
        a = plain.unet(x, 10, encoder_hidden_states=emb, return_dict=False)[0]
        b = chunked.unet(x, 10, encoder_hidden_states=emb, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-4)


# ---- fp16 VAE NaN -> fp32 retry ------------------------------------------------------------------


class NaNInHalfVAE(torch.nn.Module):
    """Decodes to NaN while in float16 (as real fp16 VAEs do on some latents), fine in float32."""

    def __init__(self, always_nan: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
        self.config = types.SimpleNamespace(scaling_factor=0.18215, block_out_channels=[8, 8, 8, 8])
        self.always_nan = always_nan
        self.dtypes_seen = []

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def device(self):
        return self.w.device

    def decode(self, z, return_dict=False):
        self.dtypes_seen.append((self.dtype, z.dtype))
        out = torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8, dtype=self.dtype)
        if self.always_nan or self.dtype == torch.float16:
            out[:, :, 0, 0] = float("nan")
        return (out,)


def test_fp16_vae_nan_is_retried_once_in_fp32():
    vae = NaNInHalfVAE()
    out = latents.decode(vae, torch.randn(1, 4, 4, 4, dtype=torch.float16))
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert vae.dtypes_seen == [(torch.float16, torch.float16), (torch.float32, torch.float32)]
    assert vae.dtype == torch.float16  # put back for the next request


def test_vae_nan_in_fp32_too_raises():
    with pytest.raises(latents.DecodeError, match="even in float32"):
        latents.decode(NaNInHalfVAE(always_nan=True), torch.randn(1, 4, 4, 4, dtype=torch.float16))


# ---- fast preset ----------------------------------------------------------------------------------


def test_deepcache_full_step_is_the_unet_exactly(base_pipe):
    unet = base_pipe.unet
    x, emb = torch.randn(2, 4, 12, 10), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        ref = unet(x, 500, encoder_hidden_states=emb, return_dict=False)[0]
        wrapped = fastpath.DeepCacheUNet(unet, 3)
        full = wrapped(x, 500, emb)[0]
        shallow = wrapped(x, 480, emb)[0]
        cond_only = wrapped(x[1:], 460, emb[1:])[0]  # after guidance truncation: cond half of the cache
    assert torch.equal(full, ref)
    assert shallow.shape == ref.shape and cond_only.shape == (1, 4, 12, 10)
    assert wrapped.full_calls == 1 and wrapped.calls == 3


def test_fast_preset_schedule_of_full_shallow_and_unguided_steps(base_pipe):
    unet = base_pipe.unet
    conv_in, mid = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: conv_in.append(i[0].shape[0])),
             unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(i[0].shape[0]))]
    try:
        r = small(base_pipe, steps=7, fast=True)
    finally:
        for h in hooks:
            h.remove()
    # guided for ceil(0.5 * 7) = 4 steps, then the conditional batch only; full U-Net at steps 0, 2, 4, 6
    assert fastpath.FastPreset().cache_interval == 2
    assert conv_in == [2, 2, 2, 2, 1, 1, 1]
    assert mid == [2, 2, 1, 1]
    assert "Fast: True" in r.infotexts[0]
    assert "Fast" not in small(base_pipe, steps=2).infotexts[0]


def test_fast_preset_changes_the_image_only_moderately(base_pipe):
    ref = pixels(small(base_pipe, steps=8, batch_size=2))
    fast = pixels(small(base_pipe, steps=8, batch_size=2, fast=True))
    diff = np.abs(fast - ref)
    assert diff.max() > 0  # it does skip work
    assert diff.mean() < 12  # ... without changing the picture (mean |diff| in 0-255 units)


def test_fast_preset_runs_img2img_and_falls_back_on_unknown_unets(base_pipe):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    r = base_pipe.img2img(image, "a watercolor", strength=0.6, steps=5, seed=1, fast=True)
    assert r.images[0].size == (32, 32) and "Fast: True" in r.infotexts[0]
    plain = object()
    assert fastpath.FastPreset().wrap(plain) is plain
    assert fastpath.FastPreset(cache_interval=1).wrap(base_pipe.unet) is base_pipe.unet
    assert fastpath.FastPreset().guided_steps(20) == 10 and fastpath.FastPreset().guided_steps(1) == 1
