import time

import numpy as np
import pytest
import torch

import ldm
from ldm import ModelLoadError
from ldm.devices import resolve_dtype


def test_seed_minus_one_picks_and_reports_a_seed(base_pipe):
    r = base_pipe.txt2img("x", width=32, height=32, steps=1, seed=-1, batch_size=2)
    assert r.seeds[1] == r.seeds[0] + 1 and r.seeds[0] >= 0
    again = base_pipe.txt2img("x", width=32, height=32, steps=1, seed=r.seeds[1])
    # image i uses seed + i; a batch of 2 and a batch of 1 differ only by float rounding in the kernels
    diff = np.abs(np.asarray(again.images[0], np.int16) - np.asarray(r.images[1], np.int16))
    other = np.abs(np.asarray(again.images[0], np.int16) - np.asarray(r.images[0], np.int16))
    assert diff.max() <= 2 and other.mean() > 10
    assert f"Seed: {r.seeds[1]}," in r.infotexts[1]


def test_callback_sees_every_step_and_can_cancel(base_pipe):
    seen = []
    base_pipe.txt2img("x", width=32, height=32, steps=4, seed=1, callback=lambda i, n, lat: seen.append((i, n, lat.shape)))
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)] and seen[0][2] == (1, 4, 16, 16)

    steps = []
    with pytest.raises(ldm.Cancelled):
        base_pipe.txt2img("x", width=32, height=32, steps=10, seed=1, callback=lambda i, n, lat: steps.append(i) or i == 2)
    assert steps == [1, 2]
    # still usable, same result as before the cancel
    a = base_pipe.txt2img("x", width=32, height=32, steps=2, seed=1)
    b = base_pipe.txt2img("x", width=32, height=32, steps=2, seed=1)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_latent_factor_comes_from_vae_config(base_pipe):
    assert base_pipe.vae_scale_factor == 2  # tiny VAE has two blocks
    r = base_pipe.txt2img("x", width=48, height=32, steps=1, seed=1)
    assert r.latents.shape[-2:] == (16, 24) and r.images[0].size == (48, 32)


def test_dtype_names():
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_bfloat16_runs_on_cpu(base_model):
    pipe = ldm.load(base_model, device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype is torch.bfloat16
    assert pipe.txt2img("x", width=32, height=32, steps=2, seed=1).images[0].size == (32, 32)


def test_missing_hub_id_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.time()
    with pytest.raises(ModelLoadError, match=r"'nobody/no-such-model' not found.*huggingface-cli download nobody/no-such-model"):
        ldm.load("nobody/no-such-model", allow_download=False)
    assert time.time() - t < 10


def test_folder_without_safetensors_is_refused(base_model, tmp_path):
    import shutil
    bad = tmp_path / "m"
    shutil.copytree(base_model, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="no .safetensors weights.*pickle formats are not loaded"):
        ldm.load(bad)


def test_truncated_safetensors_is_refused(base_model, tmp_path):
    import shutil
    bad = tmp_path / "m"
    shutil.copytree(base_model, bad)
    (f,) = (bad / "vae").glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="corrupt or incomplete file"):
        ldm.load(bad)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        ldm.load(tmp_path)
