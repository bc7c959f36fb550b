"""Random SD-1.5-shaped components, built once (seeded) and cached as a diffusers folder.

`width` scales every channel count: 1.0 is SD 1.5's topology; 0.5 ("half width") keeps the same
blocks, depths, attention placement and 8x VAE, with half the channels (a quick stand-in whose fixed
per-run costs weigh more, which is what the overhead comparison needs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ldm.single_file import SDXL_CONFIG

# SD 1.5's scheduler config (v1-inference.yaml), as diffusers ships it.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def _ch(channels: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(int(c * width) for c in channels)


def unet(seed: int, width: float = 1.0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=_ch((320, 640, 1280, 1280), width), cross_attention_dim=int(768 * width), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def vae(seed: int, width: float = 1.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=_ch((128, 256, 512, 512), width), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    ).eval()


def text_encoder(seed: int, width: float = 1.0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    hidden = int(768 * width)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
        num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(cfg).eval()


def ensure_sd15_folder(folder: Path, tokenizer: Path, seed: int = 0, width: float = 1.0) -> Path:
    """The cached folder, built on first use (~4 GB, a minute or two). A marker file written last
    means a half-written folder from an interrupted build is rebuilt, not loaded."""
    done = folder / ".complete"
    if done.exists():
        return folder
    if not (tokenizer / "vocab.json").exists():
        raise FileNotFoundError(f"CLIP tokenizer not found at {tokenizer}; see tools/build_clip_tokenizer.py")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(tokenizer, folder / "tokenizer")
    for name, build in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        build(seed, width).save_pretrained(folder / name, safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    done.write_text(f"seed {seed} width {width}\n")
    return folder


def taesd_decoder_file(path: Path, seed: int = 0) -> Path:
    """A random TAESD decoder (diffusers' AutoencoderTiny default shape) saved in the original
    taesd_decoder.safetensors layout, as a user would drop it into VAE-approx/ (no real weights here)."""
    if path.exists():
        return path
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    tiny = AutoencoderTiny().eval()
    state = {}
    for key, t in tiny.decoder.state_dict().items():
        _, index, rest = key.split(".", 2)  # layers.<i>.<rest> -> <i + 1>.<rest> (item 0 is the clamp)
        state[f"{int(index) + 1}.{rest}"] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# ---- SDXL shapes (the library's bundled SDXL-base configs, ldm/configs/sdxl; random weights) -----------

def sdxl_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG / "unet")).eval()


def ensure_sdxl_folder(folder: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random SDXL-base-shaped diffusers folder (~10 GB in fp32), built once (for the GPU suite)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(tokenizer, folder / "tokenizer")
    shutil.copytree(tokenizer, folder / "tokenizer_2")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # OpenCLIP pads with "!" (id 0)
        path = folder / "tokenizer_2" / name
        if path.exists():
            config = json.loads(path.read_text())
            config["pad_token"] = "!"
            path.write_text(json.dumps(config))
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                 hidden_act="quick_gelu", pad_token_id=49407, **common)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                               num_hidden_layers=32, hidden_act="gelu", projection_dim=1280, pad_token_id=0,
                                               **common)).save_pretrained(folder / "text_encoder_2")
    sdxl_unet(seed).save_pretrained(folder / "unet")
    v = vae(seed)
    v.register_to_config(scaling_factor=0.13025, force_upcast=True)
    v.save_pretrained(folder / "vae")
    shutil.copytree(SDXL_CONFIG / "scheduler", folder / "scheduler")  # the library's bundled SDXL configs
    shutil.copy(SDXL_CONFIG / "model_index.json", folder / "model_index.json")
    done.write_text(f"seed {seed}\n")
    return folder
