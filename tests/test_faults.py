"""Failures that must not break the server: out of memory, NaN decodes, concurrent pipelines."""
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ldm
import tiny
from ldm.faults import OutOfMemoryGuard, guard_out_of_memory, is_out_of_memory
from ldm.latents import decode

GEN = dict(width=32, height=32, steps=2, seed=3, sampler="Euler")


def pixels_of(result) -> np.ndarray:
    return np.asarray(result.images[0])


# ---- out of memory ------------------------------------------------------------------------------


def test_oom_in_the_unet_becomes_out_of_memory_and_the_next_request_works(base_pipe):
    expected = pixels_of(base_pipe.txt2img("a lighthouse", **GEN))
    seen = {}

    def explode(module, args):
        ballast = torch.ones(1 << 20)  # held by this frame when the error is raised
        seen["ballast"], seen["latents"] = weakref.ref(ballast), weakref.ref(args[0])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = base_pipe.unet.register_forward_pre_hook(explode)
    try:
        with pytest.raises(ldm.OutOfMemory) as info:
            base_pipe.txt2img("a lighthouse", **{**GEN, "batch_size": 2})
    finally:
        hook.remove()
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError) and "out of memory" in msg and "32x32, batch 2" in msg
    for hint in ("smaller width/height or batch size", "VAE tiling", "offload"):
        assert hint in msg
    assert "Tried to allocate 20.00 GiB" in msg  # the original reason is kept, as text
    # Even while the caller still holds the exception, the failed call's tensors are gone.
    assert seen["ballast"]() is None and seen["latents"]() is None
    assert np.array_equal(pixels_of(base_pipe.txt2img("a lighthouse", **GEN)), expected)


def test_cpu_allocator_failure_is_recognised_and_other_errors_pass_through():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))

    @guard_out_of_memory
    def fails(exc):
        raise exc

    with pytest.raises(ldm.OutOfMemory, match="out of memory during generation"):
        fails(MemoryError())
    with pytest.raises(ValueError, match="not memory"):
        fails(ValueError("not memory"))
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        fails(RuntimeError("shape mismatch"))
    assert not isinstance(info.value, ldm.OutOfMemory)
    with OutOfMemoryGuard():  # no error: nothing happens
        pass


def test_cancel_is_not_mistaken_for_oom(base_pipe):
    with pytest.raises(ldm.Cancelled):
        base_pipe.txt2img("x", **GEN, callback=lambda i, n, lat: True)


# ---- NaN decode ---------------------------------------------------------------------------------


class FakeVAE:
    """Decodes to NaN in the dtypes listed in `nan_in`, to a constant grey otherwise; records the dtypes used."""

    def __init__(self, dtype: torch.dtype, nan_in: set):
        self.dtype, self.nan_in, self.calls = dtype, nan_in, []
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(scaling_factor=0.18215, block_out_channels=[32, 64])

    def to(self, dtype):
        self.dtype = dtype
        return self

    def decode(self, latents, return_dict=False):
        assert latents.dtype == self.dtype
        self.calls.append(self.dtype)
        n, _, h, w = latents.shape
        fill = float("nan") if self.dtype in self.nan_in else 0.25
        return (torch.full((n, 3, h * 2, w * 2), fill, dtype=self.dtype),)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_nan_in_half_precision_is_retried_once_in_float32(low):
    vae = FakeVAE(low, nan_in={low})
    pixels = decode(vae, torch.zeros(1, 4, 4, 4))
    assert vae.calls == [low, torch.float32] and vae.dtype is low  # retried, then put back
    assert pixels.dtype is torch.float32 and torch.all(pixels == 0.25)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nan_that_survives_float32_is_an_error_not_a_black_image(dtype):
    vae = FakeVAE(dtype, nan_in={torch.float16, torch.bfloat16, torch.float32})
    with pytest.raises(ldm.DecodeError, match="NaN"):
        decode(vae, torch.zeros(1, 4, 4, 4))
    assert vae.calls == ([dtype] if dtype is torch.float32 else [dtype, torch.float32]) and vae.dtype is dtype


def test_pipeline_reports_nan_decode_as_decode_error(base_pipe):
    hook = base_pipe.vae.decoder.register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        with pytest.raises(ldm.DecodeError):
            base_pipe.txt2img("x", **GEN)
    finally:
        hook.remove()
    assert base_pipe.txt2img("x", **GEN).images[0].size == (32, 32)


def test_bf16_vae_nan_recovers_through_the_pipeline(base_model):
    pipe = ldm.load(base_model, device="cpu", dtype="bfloat16")
    ref = pixels_of(ldm.load(base_model, device="cpu", dtype="bfloat16").txt2img("x", **GEN))
    hook = pipe.vae.decoder.register_forward_hook(
        lambda m, i, out: out * float("nan") if out.dtype == torch.bfloat16 else out)
    try:
        img = pixels_of(pipe.txt2img("x", **GEN))
    finally:
        hook.remove()
    assert pipe.vae.dtype is torch.bfloat16
    assert img.std() > 0 and np.abs(img.astype(int) - ref.astype(int)).max() <= 8  # fp32 decode of the same latents


# ---- concurrency --------------------------------------------------------------------------------


def test_two_models_in_two_threads_each_get_their_own_result(base_model, tmp_path):
    other = tiny.save_model(tmp_path / "other", unet_model=tiny.unet(seed=11), vae_model=tiny.vae(seed=12),
                            text_model=tiny.text_encoder(seed=13))
    pipes = {"a": ldm.load(base_model, device="cpu", dtype="float32"), "b": ldm.load(other, device="cpu", dtype="float32")}
    prompts = {"a": "a castle", "b": "a boat"}
    sequential = {k: pixels_of(p.txt2img(prompts[k], **GEN)) for k, p in pipes.items()}
    assert not np.array_equal(sequential["a"], sequential["b"])

    start = threading.Barrier(2)
    results, errors = {k: [] for k in pipes}, []

    def worker(k):
        try:
            start.wait(timeout=30)
            for _ in range(3):
                results[k].append(pixels_of(pipes[k].txt2img(prompts[k], **GEN)))
        except Exception as exc:  # reported below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in pipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(len(r) == 3 for r in results.values())
    for k in pipes:
        assert all(np.array_equal(img, sequential[k]) for img in results[k]), k
