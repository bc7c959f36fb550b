"""Tiny random Stable-Diffusion-shaped components (as diffusers' own tests build them), saved as
diffusers folders with the real CLIP tokenizer from ldm/configs/clip-tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "ldm" / "configs" / "clip-tokenizer"

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def text_encoder(seed: int = 0, layers: int = 5) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=layers,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5,
    )
    return CLIPTextModel(cfg).eval()


def unet(seed: int = 0, in_channels: int = 4, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    cfg = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval()


def vae(seed: int = 0, scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=32, scaling_factor=scaling_factor,
    ).eval()


def save_model(folder: Path, *, unet_model=None, scheduler: dict | None = None, pipeline_class: str = "StableDiffusionPipeline",
               vae_model=None, text_model=None) -> Path:
    """Write a diffusers folder (safetensors) that `ldm.load` and diffusers' from_pretrained both read."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TOKENIZER, folder / "tokenizer", dirs_exist_ok=True)
    (text_model or text_encoder()).save_pretrained(folder / "text_encoder", safe_serialization=True)
    (unet_model or unet()).save_pretrained(folder / "unet", safe_serialization=True)
    (vae_model or vae()).save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or SD15_SCHEDULER))
    index = {
        "_class_name": pipeline_class, "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", (scheduler or SD15_SCHEDULER)["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# The x4 upscaler's schedulers (stabilityai/stable-diffusion-x4-upscaler): v-prediction DDIM for sampling,
# DDPM for noising the low-res conditioning image.
X4_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False,
}
X4_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "variance_type": "fixed_small",
}


def upscaler_unet(seed: int = 0, attention: bool = True) -> UNet2DConditionModel:
    """7 input channels (4 latent + 3 low-res image), noise level as a class label (1000 classes, as the real model).
    attention=False: convolutions only, so every output pixel depends on a bounded neighbourhood."""
    blocks = {} if attention else {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    return unet(seed, in_channels=7, num_class_embeds=1000, class_embed_type=None, **blocks)


def upscaler_vae(seed: int = 0, attention: bool = True) -> AutoencoderKL:
    """Three blocks -> latents at 1/4 of the output, the x4 upscaler's VAE shape and scaling factor."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4, norm_num_groups=32, scaling_factor=0.08333, mid_block_add_attention=attention,
    ).eval()


def save_upscaler(folder: Path, *, max_noise_level: int = 350, seed: int = 0, attention: bool = True) -> Path:
    """A diffusers StableDiffusionUpscalePipeline folder: save_model plus low_res_scheduler/ and max_noise_level."""
    save_model(folder, unet_model=upscaler_unet(seed, attention), vae_model=upscaler_vae(seed, attention), scheduler=X4_SCHEDULER,
               pipeline_class="StableDiffusionUpscalePipeline")
    (folder / "low_res_scheduler").mkdir(exist_ok=True)
    (folder / "low_res_scheduler" / "scheduler_config.json").write_text(json.dumps(X4_LOW_RES_SCHEDULER))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], watermarker=[None, None], max_noise_level=max_noise_level)
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
