"""SDXL LoRAs in kohya's layout (original U-Net block names, lora_te1_/lora_te2_) against diffusers + peft."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

import ldm
import tiny_sdxl
from ldm import samplers
from ldm.lora import LoraError, _original_name, original_unet_names

pytest.importorskip("peft")

TOL = 2
VISIBLE = 10
UNET_MODULES = [  # attention in the deeper block (2 transformer layers), feed-forward, proj, a resnet 3x3 conv
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "up_blocks.0.attentions.2.proj_out",
    "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_q",
]
TE_MODULES = [f"encoder.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in ("q", "k", "v", "out")]


def kohya_sdxl_lora(pipe, seed, rank=4, scale=0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    table = original_unet_names(pipe.unet.config)
    out = {}
    targets = [("lora_unet_" + _original_name(m, table).replace(".", "_"), pipe.unet.get_submodule(m).weight)
               for m in UNET_MODULES]
    for prefix, te in (("lora_te1_text_model_", pipe.components.text_encoder),
                       ("lora_te2_text_model_", pipe.components.text_encoder_2.text_model)):
        targets += [(prefix + m.replace(".", "_"), te.get_submodule(m).weight) for m in TE_MODULES]
    for key, w in targets:
        out[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * scale
        out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * scale
        out[f"{key}.alpha"] = torch.tensor(2.0)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-lora")
    folder = tiny_sdxl.save_model(tmp / "xl")
    pipe = ldm.load(folder, models_dir=tmp / "models", device="cpu", dtype="float32")
    save_file(kohya_sdxl_lora(pipe, seed=1), str(tmp / "models" / "Lora" / "xl-style.safetensors"))
    return folder, tmp / "models", pipe


KW = dict(negative_prompt="blurry", width=32, height=32, steps=4, guidance_scale=7.5, seed=3, sampler="Euler")


@pytest.mark.parametrize("w", [0.6, 1.0])
def test_sdxl_kohya_lora_matches_diffusers(env, w):
    folder, root, pipe = env
    base = pipe.txt2img("a red cube", **KW).images[0]
    ours = pipe.txt2img(f"a red cube <lora:xl-style:{w}>", **KW)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(ref.scheduler.config), seeds=ours.seeds)
    ref.load_lora_weights(str(root / "Lora" / "xl-style.safetensors"), adapter_name="s")
    ref.set_adapters(["s"], [w])
    theirs = ref("a red cube ", negative_prompt="blurry", width=32, height=32, num_inference_steps=4, guidance_scale=7.5,
                 generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    d = lambda a, b: int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())  # noqa: E731
    assert d(ours.images[0], base) > VISIBLE
    assert d(ours.images[0], theirs) <= TOL
    after = pipe.txt2img("a red cube", **KW).images[0]
    assert np.array_equal(np.asarray(after), np.asarray(base))


def test_sd1_lora_on_sdxl_is_refused(env, base_pipe):
    _, root, pipe = env
    from test_lora import kohya_lora

    save_file(kohya_lora(base_pipe.unet, base_pipe.text_encoder, seed=1), str(root / "Lora" / "sd1.safetensors"))
    with pytest.raises(LoraError, match="nothing was applied|made for another model"):
        pipe.txt2img("a <lora:sd1:1>", **KW)
