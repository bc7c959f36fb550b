"""ldm.Library: the A1111/ComfyUI models folder, its listing, short hashes and their cache; ldm.load by name."""
import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.library import CACHE_FILE, FOLDERS, Library


def _st(path, **tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()} or {"x": torch.zeros(2)}, str(path), metadata={"a": "b"})
    return path


def test_missing_folder_is_created_with_the_a1111_layout(tmp_path, caplog):
    root = tmp_path / "models"
    with caplog.at_level(logging.WARNING, logger="ldm.library"):
        lib = Library(root)
    assert sorted(p.name for p in root.iterdir()) == sorted(f[0] for f in FOLDERS.values())
    assert "did not exist" in caplog.text and str(root) in caplog.text
    assert lib.loras == [] and lib.checkpoints == []


def test_listing_a1111_and_comfyui_names_subfolders_and_refused_pickles(tmp_path):
    _st(tmp_path / "Lora" / "style" / "ink.safetensors")
    _st(tmp_path / "loras" / "detail.safetensors")
    (tmp_path / "Lora" / "old.pt").write_bytes(b"\x80\x02pickle")
    (tmp_path / "Lora" / "ink.png").write_bytes(b"preview")
    _st(tmp_path / "checkpoints" / "tiny.safetensors", w=torch.ones(3))
    _st(tmp_path / "VAE" / "kl.safetensors")
    _st(tmp_path / "embeddings" / "bad-hands.safetensors")
    lib = Library(tmp_path)
    assert [e.name for e in lib.loras] == ["detail", "style/ink"]
    assert [(p.name, "pickle" in why) for p, why in lib.refused("loras")] == [("old.pt", True)]
    e = lib.find("loras", "ink")  # a unique stem finds the file in its subfolder
    assert e.name == "style/ink" and e.size == (tmp_path / "Lora" / "style" / "ink.safetensors").stat().st_size
    assert lib.find("checkpoints", "tiny.safetensors [0123456789]").filename == "tiny.safetensors"
    assert [e.name for e in lib.vaes] == ["kl"] and [e.name for e in lib.embeddings] == ["bad-hands"]
    listing = lib.listing()
    assert set(listing) == set(FOLDERS) and listing["loras"][0]["hash"] is None  # listing never hashes


def test_short_hashes_follow_a1111_and_are_cached(tmp_path):
    ckpt = _st(tmp_path / "Stable-diffusion" / "m.safetensors", w=torch.arange(6.0))
    lora = _st(tmp_path / "Lora" / "l.safetensors", w=torch.arange(4.0))
    lib = Library(tmp_path)
    full = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert lib.short_hash(lib.find("checkpoints", "m")) == full[:10]
    data = lora.read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()  # kohya's hash: the tensor data only
    assert lib.short_hash(lib.find("loras", "l")) == addnet[:12]
    cache = json.loads((tmp_path / CACHE_FILE).read_text())
    assert {v["sha256"] for v in cache.values()} == {full, addnet}
    again = Library(tmp_path)  # a fresh library reads the cache without reading the files
    assert again.cached_short_hash(again.find("loras", "l")) == addnet[:12]
    _st(lora, w=torch.arange(5.0))  # changed file -> stale cache entry ignored
    assert again.cached_short_hash(again.find("loras", "l")) is None


def test_unknown_and_ambiguous_names(tmp_path):
    _st(tmp_path / "Lora" / "a" / "x.safetensors")
    _st(tmp_path / "Lora" / "b" / "x.safetensors")
    _st(tmp_path / "Lora" / "watercolor.safetensors")
    lib = Library(tmp_path)
    with pytest.raises(ldm.UnknownModelName, match="close names: watercolor"):
        lib.find("loras", "watercolour")
    with pytest.raises(ldm.UnknownModelName, match="ambiguous.*a/x, b/x"):
        lib.find("loras", "x")
    assert lib.find("loras", "b/x").path.parent.name == "b"
    with pytest.raises(ValueError, match="unknown model kind"):
        lib.list("hypernetworks")


def test_load_a_checkpoint_by_name(tmp_path, base_model):
    shutil.copytree(base_model, tmp_path / "models" / "Stable-diffusion" / "tiny-sd")
    pipe = ldm.load("tiny-sd", models_dir=tmp_path / "models", device="cpu", dtype="float32")
    assert pipe.name == "tiny-sd" and isinstance(pipe.library, Library)
    assert pipe.with_options(vae_tiling=True).library is pipe.library
    assert [e.name for e in pipe.library.checkpoints] == ["tiny-sd"]
    assert pipe.library.short_hash(pipe.library.checkpoints[0]) == pipe.model_hash
    with pytest.raises(ldm.UnknownModelName, match="close names: tiny-sd"):
        ldm.load("tiny-ds", models_dir=tmp_path / "models", device="cpu", dtype="float32")
