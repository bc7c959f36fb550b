"""A VAE from the models folder in place of the checkpoint's own: same images as a model built with it,
A1111's infotext, "Automatic" goes back, files of another architecture refused."""
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm
import tiny
from test_safety_loading import _vae_key

KW = dict(width=32, height=32, steps=3, seed=4, sampler="Euler")


def ldm_layout(vae) -> dict:
    out = {}
    for k, v in vae.state_dict().items():
        name = _vae_key(k, len(vae.config.block_out_channels))
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name):
            v = v[:, :, None, None]
        out["first_stage_model." + name] = v.contiguous()
    return out


@pytest.fixture(scope="module")
def vae_env(tmp_path_factory, base_model):
    tmp = tmp_path_factory.mktemp("vae")
    other = tiny.vae(seed=5)
    root = tmp / "models"
    pipe = ldm.load(base_model, models_dir=root, device="cpu", dtype="float32")
    save_file(ldm_layout(other), str(root / "VAE" / "kl-f8-other.safetensors"))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "VAE" / "diffusers-layout.safetensors"))
    other.save_pretrained(root / "VAE" / "folder-vae", safe_serialization=True)
    reference = ldm.load(tiny.save_model(tmp / "with-other-vae", vae_model=other), device="cpu", dtype="float32")
    return root, pipe, reference


@pytest.mark.parametrize("name", ["kl-f8-other", "diffusers-layout", "folder-vae"])
def test_vae_from_the_folder_decodes_like_a_model_built_with_it(vae_env, name):
    root, pipe, reference = vae_env
    swapped = pipe.with_vae(name)
    ours, ref = swapped.txt2img("a cube", **KW), reference.txt2img("a cube", **KW)
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(ref.images[0]))
    entry = pipe.library.find("vaes", name)
    assert f"VAE hash: {pipe.library.short_hash(entry)}, VAE: {name}," in ours.infotexts[0]
    assert swapped.unet is pipe.unet and swapped.vae is not pipe.vae  # the other weights are shared


def test_automatic_goes_back_to_the_checkpoints_own(vae_env):
    _, pipe, _ = vae_env
    base = pipe.txt2img("a cube", **KW)
    back = pipe.with_vae("kl-f8-other").with_vae("Automatic")
    assert back.vae is pipe.vae and "VAE" not in back.txt2img("a cube", **KW).infotexts[0].split("Model:")[1]
    assert np.array_equal(np.asarray(back.txt2img("a cube", **KW).images[0]), np.asarray(base.images[0]))


def test_load_with_a_vae_by_name(vae_env, base_model):
    root, _, reference = vae_env
    pipe = ldm.load(base_model, models_dir=root, vae="kl-f8-other", device="cpu", dtype="float32")
    assert torch.equal(pipe.txt2img("a", **KW).latents, reference.txt2img("a", **KW).latents)
    assert pipe.with_options(vae_tiling=True).components.vae_name == "kl-f8-other"


def test_bad_vaes(vae_env, tmp_path):
    root, pipe, _ = vae_env
    with pytest.raises(ldm.UnknownModelName, match="close names: kl-f8-other"):
        pipe.with_vae("kl-f8-othr")
    big = tiny.vae(seed=1)
    wide = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.dim() == 1 else v for k, v in big.state_dict().items()}
    save_file({k: v.contiguous() for k, v in wide.items()}, str(root / "VAE" / "wrong.safetensors"))
    with pytest.raises(ldm.ModelLoadError, match="do not fit"):
        pipe.with_vae("wrong")
    save_file({"something": torch.zeros(3)}, str(root / "VAE" / "notvae.safetensors"))
    with pytest.raises(ldm.ModelLoadError, match="not a VAE"):
        pipe.with_vae("notvae")
    shutil.copy(root / "VAE" / "kl-f8-other.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="models folder"):
        ldm.load(tiny.save_model(tmp_path / "m"), vae="x", device="cpu", dtype="float32")
