"""A tiny A1111-style models folder for the UI's model-manager tests: two tiny checkpoints as diffusers
folders under Stable-diffusion/, a LoRA (kohya format, as tests/test_lora.py writes it), an embedding and
a VAE of other weights."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import tiny
from test_lora import kohya_lora

CHECKPOINTS = ("alpha", "beta")  # tiny.unet seeds 0 and 1


def build(root: Path) -> Path:
    sd = root / "Stable-diffusion"
    first = tiny.save_model(sd / "alpha")
    tiny.save_model(sd / "beta", unet_model=tiny.unet(seed=1), text_model=tiny.text_encoder(seed=1))
    for kind in ("Lora", "VAE", "embeddings"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(tiny.unet(seed=0), tiny.text_encoder(seed=0), seed=1), str(root / "Lora" / "style.safetensors"))
    torch.manual_seed(3)
    save_file({"emb_params": torch.randn(2, 32)}, str(root / "embeddings" / "glowy.safetensors"))
    tiny.vae(seed=5).save_pretrained(root / "VAE" / "other-vae", safe_serialization=True)
    assert first.is_dir()
    return root


def loader(root: Path):
    """What app.py gives ui.models.Models: a checkpoint name or path -> a pipeline on the models folder."""
    import ldm

    def load(spec: str):
        return ldm.load(spec, models_dir=root, device="cpu", dtype="float32")

    return load
