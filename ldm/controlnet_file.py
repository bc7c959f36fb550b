"""Single-file ControlNets (A1111's models/ControlNet/*.safetensors) and the family check.

A file holds either the original layout (`input_hint_block`, `zero_convs`, ...; SD 1.x ControlNets) or
diffusers' names in one file (most SDXL ControlNets on the hub and Civitai). A ControlNet copies its
base U-Net's encoder half, so its diffusers config is derived from the base U-Net's config (never
fetched from a hub), with what the file shows on top: the conditioning-embedding channels, and for
diffusers names the attention blocks and their transformer depths (SDXL's "mid" and "small"
ControlNets are shallower than their U-Net); `global_pool_conditions` is set for shuffle models (A1111 reads that from the model's
.yaml; the only such official model is the v1.1 shuffle one). diffusers'
`ControlNetModel.from_single_file` converts the weights with that local config.
"""
from __future__ import annotations

import inspect
import json
import re
import tempfile
from pathlib import Path

import torch

from .components import ModelLoadError, check_safetensors, read_json, require_complete, require_regular

FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention width -> family
_HINT = re.compile(r"(?:control_model\.)?input_hint_block\.(\d+)\.weight")
_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
DIFFUSERS_KEY = "time_embedding.linear_1.weight"
_CONTEXT = re.compile(r"(?:control_model\.)?(?:input_blocks\.\d+\.1|middle_block\.1|down_blocks\.\d+\.attentions\.\d+|"
                      r"mid_block\.attentions\.0)\.transformer_blocks\.0\.attn2\.to_k\.weight")
# An attention block, and the transformer layer a key belongs to (none: its norm and projections; the SDXL
# "mid" ControlNets have attention blocks of 0 layers)
_DOWN_ATTENTION = re.compile(r"down_blocks\.(\d+)\.attentions\.0\.(?:transformer_blocks\.(\d+)\.)?")
_MID_ATTENTION = re.compile(r"mid_block\.attentions\.0\.(?:transformer_blocks\.(\d+)\.)?")
_LABEL_EMB = re.compile(r"(?:control_model\.)?label_emb\.0\.([02])\.(weight|bias)")
_ADDED = ("label_emb.", "add_embedding.")  # SDXL's pooled-embedding + time-id projection, original / diffusers names


def family(config: dict) -> str:
    """"SD 1.x (cross-attention 768)", "SDXL (cross-attention 2048)", ..."""
    dim = config.get("cross_attention_dim")
    name = "SDXL" if config.get("addition_embed_type") == "text_time" else FAMILIES.get(dim, "an unknown family")
    return f"{name} (cross-attention {dim})"


def check_kind(tensors: dict, name: str, class_name: str | None = None) -> None:
    """Refuse what shares models/ControlNet but is not a ControlNet this library runs (ComfyUI and Forge tell
    them apart by the same keys), before its weights are read; otherwise it would fail to load obscurely or,
    for a Union model, load as a plain ControlNet without its task inputs."""
    kind = ("a Control-LoRA" if "lora_controlnet" in tensors
            else "a ControlNet Union model" if "task_embedding" in tensors or class_name == "ControlNetUnionModel"
            else "a ControlNet-LLLite" if any("lllite" in k.lower() for k in tensors)
            else None if class_name in (None, "ControlNetModel") else f"a {class_name}")
    if kind:
        raise ModelLoadError(f"{name} is {kind}, which is not supported; use a regular ControlNet "
                             "(a diffusers ControlNetModel folder or a single .safetensors file)")


def check_family(net: dict, unet: dict, name: str) -> None:
    """Refuse a ControlNet whose residuals cannot fit the base U-Net (another family, other block widths).
    Its block types may differ (SDXL's "small" ControlNets have no attention in their down blocks)."""
    ours, theirs = family(net), family(unet)
    if (net.get("cross_attention_dim"), net.get("addition_embed_type")) != (unet.get("cross_attention_dim"),
                                                                             unet.get("addition_embed_type")):
        raise ValueError(f"ControlNet {name!r} is for {ours} but the model is {theirs}; use a ControlNet made for "
                         "the model's family")
    shape = ("block_out_channels", "layers_per_block")
    if any(_listed(net.get(k)) != _listed(unet.get(k)) for k in shape) or net.get("in_channels") != unet.get("out_channels"):
        raise ValueError(f"ControlNet {name!r} does not fit this model's U-Net: its blocks "
                         f"{_listed(net.get('block_out_channels'))} x {net.get('layers_per_block')} layers, "
                         f"{net.get('in_channels')} latent channels; the model's {_listed(unet.get('block_out_channels'))} "
                         f"x {unet.get('layers_per_block')}, {unet.get('out_channels')}")


def _listed(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def derived_config(unet: dict, tensors: dict, name: str) -> dict:
    """The diffusers ControlNet config of a file: the base U-Net's architecture plus what the file says
    (the conditioning embedding's channels; pooled conditions for shuffle models)."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet.items() if k in accepted}
    config["in_channels"] = unet.get("out_channels", 4)  # the ControlNet sees the 4 latent channels only
    if DIFFUSERS_KEY in tensors:  # diffusers names in one file: conv_in, then pairs of blocks (same, next width)
        blocks = sorted((int(m[1]), s) for k, (_, s) in tensors.items() if (m := _BLOCK.fullmatch(k)))
        convs = [tensors["controlnet_cond_embedding.conv_in.weight"][1], *[s for _, s in blocks]]
        config["conditioning_channels"] = convs[0][1]
        outs = [s[0] for s in convs]
        config["conditioning_embedding_out_channels"] = [outs[0], *outs[2::2]]
        config.update(_attention_layout(tensors, len(config["block_out_channels"]), name))
    else:  # original layout: input_hint_block = conv_in, SiLU, (conv, SiLU, strided conv, SiLU) ..., conv_out
        hint = sorted((int(m[1]), shape) for key, (_, shape) in tensors.items() if (m := _HINT.fullmatch(key)))
        if len(hint) < 3:
            raise ModelLoadError(f"{name}: no input_hint_block in the file; it is not a ControlNet in the original layout")
        outs = [shape[0] for _, shape in hint]
        config["conditioning_channels"] = hint[0][1][1]
        config["conditioning_embedding_out_channels"] = [outs[0], *outs[2:-1:2]]
    config["global_pool_conditions"] = "shuffle" in name.lower()
    config["_class_name"] = "ControlNetModel"
    return config


def _attention_layout(tensors: dict, blocks: int, name: str) -> dict:
    """Down block types and transformer depths from diffusers' key names; diffusers' ControlNetModel gives
    the middle block the last down block's depth, so a file where the two differ cannot be expressed."""
    down, mid = {}, None
    for key in tensors:
        if m := _DOWN_ATTENTION.match(key):
            down[int(m[1])] = max(down.get(int(m[1]), 0), int(m[2]) + 1 if m[2] else 0)
        elif m := _MID_ATTENTION.match(key):
            mid = max(mid or 0, int(m[1]) + 1 if m[1] else 0)
    if not down and mid is None:
        return {}
    if mid is not None and down.get(blocks - 1, mid) != mid:
        raise ModelLoadError(f"{name}: the last down block has {down[blocks - 1]} transformer layers and the middle "
                             f"block {mid}; a ControlNet needs them equal")
    depths = [down.get(i, 1) for i in range(blocks)]
    depths[-1] = depths[-1] if mid is None else mid
    return {"down_block_types": ["CrossAttnDownBlock2D" if i in down else "DownBlock2D" for i in range(blocks)],
            "transformer_layers_per_block": depths}


def file_family(tensors: dict) -> dict:
    """What the weights say about the family, before they are read: cross-attention width (None when no
    layer has cross-attention), SDXL embeddings."""
    context = next((shape[1] for key, (_, shape) in tensors.items() if _CONTEXT.fullmatch(key)), None)
    sdxl = any(k.removeprefix("control_model.").startswith(_ADDED) for k in tensors)
    return {"cross_attention_dim": context, "addition_embed_type": "text_time" if sdxl else None}


def load_controlnet_file(file: Path, unet: dict, dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    tensors = check_safetensors(file)
    check_kind(tensors, file.name)
    # The family is visible in the keys and shapes of either layout (the width only where there is cross-attention).
    found = file_family(tensors)
    if found["cross_attention_dim"] is None:
        del found["cross_attention_dim"]
    check_family({**unet, **found}, unet, file.stem)
    config = derived_config(unet, tensors, file.stem)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        try:
            module = ControlNetModel.from_single_file(_diffusers_names(load_file(str(file)), config), config=folder,
                                                      local_files_only=True, torch_dtype=dtype)
        except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
            raise ModelLoadError(f"{file}: the ControlNet could not be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None
    require_complete(module, "ControlNet", file)
    return module


def _diffusers_names(state: dict, config: dict) -> dict:
    """The original layout renamed by diffusers' converter, plus SDXL's `label_emb` (pooled embedding + time
    ids), which that converter leaves out of ControlNets; diffusers names pass through."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if DIFFUSERS_KEY in state:
        return state
    out = convert_controlnet_checkpoint(state, config)
    for key, value in state.items():
        if m := _LABEL_EMB.fullmatch(key):
            out[f"add_embedding.linear_{int(m[1]) // 2 + 1}.{m[2]}"] = value
    return out
