"""A real-size SDXL base single file (original layout, random fp16 weights) and the memory of loading it.

The shapes come from a diffusers config folder (by default the library's bundled ldm/configs/sdxl)
built on the meta device; each diffusers key is renamed to the original (Stability / A1111) layout
that model sites share: `model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP bigG,
fused q/k/v). The file is written tensor by tensor (never the whole model in memory): ~6.9 GB.

`load_rss` loads it with `ldm.load` in a fresh process and reports its peak RSS, the load time and
the weights' size.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.single_file import SDXL_CONFIG

ROOT = Path(__file__).resolve().parents[2]
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_key(key: str, cfg) -> str:
    """A diffusers UNet2DConditionModel key -> the original `model.diffusion_model.` name (without the prefix)."""
    n = cfg.layers_per_block + 1  # original blocks per level: the resnet/attention layers + a down/upsampler
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, kind = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{kind}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{b * n + j + 1}." + (f"0.{_resnet(rest)}" if part == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * n + j}." + (f"0.{_resnet(rest)}" if part == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in cfg.up_block_types[b] else 1  # the upsampler follows the attention, if any
        return f"output_blocks.{b * n + n - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> the original `first_stage_model.` name (without the prefix)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\..+", key) or key.startswith(("quant_conv", "post_quant_conv")):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # original counts up from the bottom
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(key)


def _bigg_shapes(shapes: dict[str, tuple], layers: int, prefix: str) -> dict[str, tuple]:
    """CLIPTextModelWithProjection shapes -> OpenCLIP names: fused q/k/v, transposed projection."""
    t = "text_model."
    out = {prefix + "token_embedding.weight": shapes[t + "embeddings.token_embedding.weight"],
           prefix + "positional_embedding": shapes[t + "embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": shapes[t + "final_layer_norm.weight"],
           prefix + "ln_final.bias": shapes[t + "final_layer_norm.bias"],
           prefix + "text_projection": shapes["text_projection.weight"][::-1]}
    for i in range(layers):
        layer, block = f"{t}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            q = shapes[f"{layer}self_attn.q_proj.{kind}"]
            out[f"{block}attn.in_proj_{kind}"] = (3 * q[0], *q[1:])
            for ours, theirs in _OPEN_CLIP.items():
                out[f"{block}{theirs}.{kind}"] = shapes[f"{layer}{ours}.{kind}"]
    return out


def original_shapes(config: Path = SDXL_CONFIG) -> dict[str, tuple[int, ...]]:
    """{original key: shape} of the SDXL base model a diffusers config folder describes (no weights built)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
    out = {"model.diffusion_model." + unet_key(k, unet.config): tuple(v.shape) for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name = vae_key(k, len(vae.config.block_out_channels))
        conv = re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name)  # the original VAE attention uses 1x1 convolutions
        out["first_stage_model." + name] = (*v.shape, 1, 1) if conv else tuple(v.shape)
    for k, v in clip.state_dict().items():
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = tuple(v.shape)
    bigg_shapes = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): tuple(v.shape)
                   for k, v in bigg.state_dict().items()}
    out.update(_bigg_shapes(bigg_shapes, bigg.config.num_hidden_layers, "conditioner.embedders.1.model."))
    return out


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float16, seed: int = 0) -> int:
    """Write a .safetensors file of random tensors one at a time (1-D weights, the norms', 1; others N(0, 0.02));
    returns the bytes of tensor data."""
    names = sorted(shapes)
    size = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    for name in names:
        n = int(torch.Size(shapes[name]).numel()) * size
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            norm = len(shapes[name]) == 1 and name.endswith("weight")  # only norms have 1-D weights here
            t = torch.ones(shapes[name]) if norm else torch.randn(shapes[name], generator=gen) * 0.02
            f.write(t.to(dtype).numpy().tobytes() if dtype != torch.bfloat16 else t.to(dtype).view(torch.int16).numpy().tobytes())
    return offset


_LOAD = """
import json, sys, time
from pathlib import Path
import torch

from ldm_tools.bench.measure import status_kb as kb

import ldm  # imports (torch, diffusers, transformers) before the baseline
base = kb("VmRSS")
t = time.perf_counter()
pipe = ldm.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
seconds = time.perf_counter() - t
mods = (pipe.text_encoder, pipe.components.text_encoder_2, pipe.unet, pipe.vae)
weights = sum(t.numel() * t.element_size() for m in mods if m is not None for t in (*m.parameters(), *m.buffers()))
print(json.dumps({"seconds": seconds, "peak": kb("VmHWM") * 1024, "base": base * 1024, "after": kb("VmRSS") * 1024,
                  "weights": weights, "threads": torch.get_num_threads(), "dtype": str(pipe.unet.dtype),
                  "vae_dtype": str(pipe.vae.dtype), "family": pipe.family.name}))
"""


def load_rss(file: Path, dtype: str) -> dict:
    """`ldm.load(file, device="cpu", dtype=dtype)` in a fresh process: peak RSS (VmHWM), RSS before (after the
    imports) and after, load seconds, bytes of the loaded weights."""
    out = subprocess.run([sys.executable, "-c", _LOAD, str(file), dtype], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"loading {file} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(file: Path, file_bytes: int, dtype: str, r: dict, write_seconds: float | None) -> str:
    gib = 1024**3
    return (f"**SDXL single-file load, CPU, dtype {dtype}** (random SDXL-base weights in the original layout, fp16 file "
            f"{file_bytes / gib:.2f} GiB of tensors{'' if write_seconds is None else f', written in {write_seconds:.0f} s'})\n\n"
            f"- `ldm.load` in a fresh process: {r['seconds']:.1f} s; U-Net {r['dtype']}, VAE {r['vae_dtype']}, family {r['family']}\n"
            f"- loaded weights {r['weights'] / gib:.2f} GiB; peak RSS {r['peak'] / gib:.2f} GiB "
            f"(after imports {r['base'] / gib:.2f} GiB; after loading {r['after'] / gib:.2f} GiB)\n"
            f"- peak / loaded weights = **{r['peak'] / r['weights']:.2f}**; (peak - imports) / loaded weights = "
            f"{(r['peak'] - r['base']) / r['weights']:.2f} (target < 1.3)\n")


def run(out_dir: Path, dtype: str, file: Path | None = None) -> str:
    """Write (unless `file` is given) the random SDXL file, measure its load, delete what was written."""
    written = None
    if file is None:
        file = out_dir / "sdxl-random-fp16.safetensors"
        t = time.perf_counter()
        write_random(file, original_shapes())
        written = time.perf_counter() - t
    try:
        header_len = int.from_bytes(file.open("rb").read(8), "little")
        text = report(file, file.stat().st_size - 8 - header_len, dtype, load_rss(file, dtype), written)
    finally:
        if written is not None:
            file.unlink(missing_ok=True)
    return text
