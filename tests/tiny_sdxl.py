"""Tiny random SDXL-shaped components saved as a diffusers StableDiffusionXLPipeline folder
(the recipe in ../shared/design/round2.md): CLIP-L hidden 32 and bigG hidden 48 with projection 16
(the hidden sizes must differ or diffusers' single-file converter picks the wrong branch), a U-Net
with "text_time" added conditioning (6 time ids x 8 + 16 pooled), cross-attention 32 + 48 = 80."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import tiny
from ldm import single_file

# SDXL base 1.0's scheduler and model index, as the library bundles them for single files
SDXL_CONFIGS = single_file.BUNDLED_CONFIGS["sdxl"]
TIME_EMBED = 8
PROJECTION = 16


def _clip_config(hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5,
        hidden_act="gelu", **extra)


def text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config(32)).eval()


def text_encoder_2(seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed + 100)
    return CLIPTextModelWithProjection(_clip_config(48, projection_dim=PROJECTION)).eval()


def unet(seed: int = 0, in_channels: int = 4, time_ids: int = 6) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED + PROJECTION, cross_attention_dim=80,
        norm_num_groups=32,
    ).eval()


def save_model(folder: Path, *, unet_model=None, seed: int = 0) -> Path:
    """A diffusers SDXL folder that `ldm.load` and StableDiffusionXL*Pipeline.from_pretrained both read."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny.TOKENIZER, folder / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(tiny.TOKENIZER, folder / "tokenizer_2", dirs_exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # OpenCLIP pads with "!" (id 0)
        config = json.loads((folder / "tokenizer_2" / name).read_text())
        config["pad_token"] = "!"
        (folder / "tokenizer_2" / name).write_text(json.dumps(config))
    text_encoder(seed).save_pretrained(folder / "text_encoder", safe_serialization=True)
    text_encoder_2(seed).save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    (unet_model or unet(seed)).save_pretrained(folder / "unet", safe_serialization=True)
    tiny.vae(seed, scaling_factor=0.13025).save_pretrained(folder / "vae", safe_serialization=True)
    shutil.copytree(SDXL_CONFIGS / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    shutil.copy(SDXL_CONFIGS / "model_index.json", folder / "model_index.json")
    return folder


def refiner_unet(seed: int = 0) -> UNet2DConditionModel:
    """The refiner's shape in small: cross-attention on bigG only (48), 5 time ids (sizes + aesthetic score)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=5 * TIME_EMBED + PROJECTION, cross_attention_dim=48, norm_num_groups=32,
    ).eval()


def save_refiner(folder: Path, *, seed: int = 1) -> Path:
    """A diffusers SDXL refiner folder (StableDiffusionXLImg2ImgPipeline without the first encoder); the VAE is
    the base's (seed 0), as the real refiner shares SDXL's VAE."""
    save_model(folder, unet_model=refiner_unet(seed), seed=seed)
    tiny.vae(0, scaling_factor=0.13025).save_pretrained(folder / "vae", safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", tokenizer=[None, None], text_encoder=[None, None],
                 requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
