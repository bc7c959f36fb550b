"""A VAE from the models folder's VAE/ in place of the checkpoint's own (A1111's "SD VAE" setting).

Accepted: a `.safetensors` file in the original (A1111/LDM) layout, with or without the
`first_stage_model.` prefix, or in diffusers' layout; or a diffusers AutoencoderKL folder. The VAE is
built with the architecture (config) of the model's own VAE, so a file for another architecture is a
clear ModelLoadError, never a half-loaded VAE.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .components import ModelLoadError, check_safetensors, require_regular_files

_DIFFUSERS_KEY = "encoder.down_blocks."


def load_vae(path: Path, like: torch.nn.Module) -> torch.nn.Module:
    """The VAE at `path` with `like`'s config, dtype and device."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        require_regular_files(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no .safetensors weights in the VAE folder {path}")
        state = {}
        for f in files:
            check_safetensors(f)
            state.update(load_file(str(f)))
    else:
        check_safetensors(path)  # refuses pickles named .safetensors, truncated and malformed files
        state = load_file(str(path))
    if not any(k.startswith(_DIFFUSERS_KEY) for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        if not any(k.startswith(("encoder.down.", "first_stage_model.encoder.down.")) for k in state):
            raise ModelLoadError(f"{path} is not a VAE (no encoder weights in the original or diffusers layout)")
        try:
            state = convert_ldm_vae_checkpoint(state, dict(like.config))
        except (KeyError, ValueError, RuntimeError, IndexError) as exc:
            raise ModelLoadError(f"{path}: not a VAE of this model's architecture ({type(exc).__name__}: {exc})") from None
    vae = AutoencoderKL.from_config(like.config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: the VAE weights do not fit this model's VAE ({str(exc)[:300]})") from None
    param = next(like.parameters())
    return vae.to(param.device, param.dtype).eval().requires_grad_(False)
