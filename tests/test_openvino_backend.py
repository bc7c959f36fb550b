"""The optional OpenVINO backend (ldm.openvino_backend) on a tiny random model: same pixels as the
PyTorch path within 2/255, the converted model cached on disk and reused, PyTorch for calls OpenVINO
would not run the same way, and a clear error without the package."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import ldm
from ldm import openvino_backend

openvino = pytest.importorskip("openvino")

RUN = dict(width=64, height=64, steps=4, seed=3, sampler="Euler a")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def ov_pipe(base_model, cache):
    return ldm.load(base_model, device="cpu", openvino=True, openvino_cache=str(cache))


def test_output_within_2_of_255_of_pytorch(base_pipe, ov_pipe, cache):
    ours = ov_pipe.txt2img("a red cube", **RUN)
    ref = base_pipe.txt2img("a red cube", **RUN)
    unet, decoder = ov_pipe.unet.forward, ov_pipe.vae.decoder.forward
    assert unet.runs == 4 and unet.fallbacks == 0  # one guided call per step, all through OpenVINO
    assert decoder.runs == 1
    assert np.abs(pixels(ours) - pixels(ref)).max() <= 2
    assert ov_pipe.options.openvino and ov_pipe.unet.dtype == torch.float32  # dtype auto -> float32
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.xml")) == ["unet", "vae"]


def test_a_second_load_reuses_the_cached_conversion(base_model, ov_pipe, cache, monkeypatch):
    ov_pipe.txt2img("a red cube", **RUN)  # makes sure the cache is filled whatever ran first
    files = sorted(cache.glob("*.xml"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this model")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = ldm.load(base_model, device="cpu", openvino=True, openvino_cache=str(cache))
    first = again.txt2img("a red cube", **RUN)
    assert again.unet.forward.runs == 4 and again.unet.forward.ir_path in files
    assert sorted(cache.glob("*.xml")) == files
    # A new size compiles from the same IR (static shapes per size), still without converting.
    again.txt2img("a red cube", **{**RUN, "width": 32})
    assert len(again.unet.forward.compiled) == 2
    assert np.array_equal(pixels(first), pixels(again.txt2img("a red cube", **RUN)))


def test_changed_weights_or_processors_run_in_pytorch(base_pipe, ov_pipe):
    """A LoRA merge swaps weight tensors around a run, token merging swaps attention processors: those
    calls must not use the model converted from other weights."""
    unet = ov_pipe.unet
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 32)
    param = next(unet.parameters())
    original = param.data
    try:
        param.data = original + 1.0
        before = unet.forward.fallbacks
        out = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        assert unet.forward.fallbacks == before + 1
        assert torch.equal(out, type(unet).forward(unet, x, t, encoder_hidden_states=emb, return_dict=False)[0])
    finally:
        param.data = original
    runs = unet.forward.runs
    unet(x, t, encoder_hidden_states=emb)
    assert unet.forward.runs == runs + 1  # original weights back: OpenVINO again

    from ldm.extensions import TokenMerging
    from ldm.tasks import generate

    before = unet.forward.fallbacks
    merged = generate.txt2img(ov_pipe, "a red cube", extensions=[TokenMerging(0.5, max_downsample=2)], **RUN)
    assert unet.forward.fallbacks == before + 4
    ref = generate.txt2img(base_pipe, "a red cube", extensions=[TokenMerging(0.5, max_downsample=2)], **RUN)
    assert np.abs(pixels(merged) - pixels(ref)).max() <= 2


def test_missing_openvino_is_a_clear_error_before_loading(base_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails
    with pytest.raises(openvino_backend.OpenVINONotInstalled, match="pip install openvino"):
        ldm.load(base_model, device="cpu", openvino=True)


def test_options_refuse_openvino_with_compile_or_a_gpu(base_model):
    with pytest.raises(ValueError, match="choose one"):
        ldm.Options(openvino=True, compile=True).validate()
    with pytest.raises(ValueError, match="on the CPU"):
        ldm.load(base_model, device="cuda", openvino=True)
    with pytest.raises(ValueError, match="float32"):
        ldm.load(base_model, device="cpu", dtype="bfloat16", openvino=True)


def test_app_flag_reaches_the_pipeline_and_a_missing_package_exits_with_the_message(base_model, cache, monkeypatch):
    import app

    args = app.parse_args(["--model", str(base_model), "--device", "cpu", "--models-dir", str(cache.parent / "models"),
                           "--openvino", "--openvino-cache", str(cache)])
    pipe = app.load_model(str(base_model), args)
    assert pipe.options.openvino and pipe.options.openvino_cache == str(cache)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SystemExit, match="pip install openvino"):
        app.load_model(str(base_model), args)
