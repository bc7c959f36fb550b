"""LoRA: read kohya/A1111 and diffusers/PEFT files, merge them into the weights for a run, restore exactly.

A LoRA layer holds `down` [rank, in(, kh, kw)], `up` [out, rank(, 1, 1)] and optionally `alpha`; it changes
one Linear or Conv2d weight by

    W += multiplier * alpha / rank * up @ down        (convolutions: flattened, multiplied, reshaped)

with the text-encoder multiplier for text-encoder layers and the U-Net one for U-Net layers.

Key layouts read:
- kohya / A1111: `lora_unet_<module path, "." -> "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj...` (and `lora_te1_`/`lora_te2_` for two text encoders).
  transformers 5's CLIPTextModel has no `text_model.` level in its module names; both spellings match.
- diffusers / PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` likewise); alpha
  from the file's `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`) as diffusers saves it,
  else alpha = rank.
Kinds we do not merge (LoHa, LoKr, DoRA, full-rank diffs, CP-decomposed convolutions, IA3, OFT, GLoRA)
are named in an error before anything is applied, as are layers that match nothing in the model.

`Networks.applied(tags)` swaps the merged tensors into the parameters for the duration of a run and puts
the original tensor objects back afterwards (no subtraction: the base model is bit-identical after); the
merged tensors of the last LoRA set are kept, so repeating a set costs two pointer swaps per weight.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .components import check_safetensors
from .library import Library
from .prompt_tags import LoraTag

PARTS = {  # key suffix -> role
    "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
}
UNSUPPORTED = (  # (pattern in a key, what it is)
    (re.compile(r"hada_"), "LoHa (hada_* keys)"),
    (re.compile(r"lokr_"), "LoKr (lokr_* keys)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.diff(_b)?$"), "a full-rank weight difference (.diff keys)"),
    (re.compile(r"lora_mid"), "LoCon with a CP-decomposed middle (lora_mid keys)"),
    (re.compile(r"on_input|\.ia3"), "IA3"),
    (re.compile(r"oft_|\.oft"), "OFT"),
    (re.compile(r"\.a1\.weight|\.b1\.weight"), "GLoRA"),
    (re.compile(r"\.[wb]_norm$"), "a norm-layer network (w_norm/b_norm)"),
)
# component attribute -> kohya prefixes, diffusers prefix (a second text encoder, e.g. SDXL's, is lora_te2_)
COMPONENTS = (("unet", ("lora_unet",), "unet"), ("text_encoder", ("lora_te", "lora_te1"), "text_encoder"),
              ("text_encoder_2", ("lora_te2",), "text_encoder_2"))


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message says why. Nothing was applied."""


@dataclass(frozen=True)
class Layer:
    component: str  # "unet", "text_encoder", ...
    module: str  # the module's name inside the component
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def check(self, weight: torch.Tensor) -> None:
        out, inner = self.up.shape[0], self.down[0].numel()
        if (out, inner) != (weight.shape[0], weight[0].numel()) or self.up[0].numel() != self.rank:
            raise LoraError(f"{self.component}.{self.module}: the LoRA's {list(self.up.shape)} x {list(self.down.shape)} "
                            f"matrices do not fit its weight of shape {list(weight.shape)}; it was made for another model")

    def add_to(self, acc: torch.Tensor, multiplier: float) -> None:
        """acc [out, in * kh * kw] (float32) += multiplier * alpha/rank * up @ down, in one GEMM."""
        up = self.up.to(acc.device, torch.float32).flatten(1)
        down = self.down.to(acc.device, torch.float32).flatten(1)
        acc.addmm_(up, down, alpha=multiplier * self.scale)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """alpha/rank * up @ down, shaped like `weight`, in float32."""
        self.check(weight)
        acc = torch.zeros(weight.shape[0], weight[0].numel(), device=weight.device)
        self.add_to(acc, 1.0)
        return acc.reshape(weight.shape)


def read_layers(path, components) -> list[Layer]:
    """The LoRA layers of a .safetensors file, each matched to a module of `components`.
    Raises LoraError for unsupported kinds, unrecognised keys and layers that match nothing."""
    from safetensors.torch import load_file

    header = check_safetensors(path)  # refuses pickles, truncated and malformed files
    for key in header:
        for pattern, kind in UNSUPPORTED:
            if pattern.search(key):
                raise LoraError(f"{path}: {kind} is not supported, only LoRA/LoCon (lora_down/lora_up or "
                                f"lora_A/lora_B); found key {key!r}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        part = next((p for p in PARTS if key.endswith("." + p)), None)
        if part is None:
            raise LoraError(f"{path}: unrecognised key {key!r}; expected kohya (.lora_down.weight/.lora_up.weight/"
                            ".alpha) or diffusers/PEFT (.lora_A.weight/.lora_B.weight) keys")
        groups.setdefault(key[: -len(part) - 1], {})[PARTS[part]] = tensor
    if not groups:
        raise LoraError(f"{path} holds no LoRA layers")
    names = _module_names(components)
    peft_alpha = _peft_alphas(path)
    layers, unmatched = [], []
    for prefix, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{path}: layer {prefix!r} has {'no up' if 'up' not in parts else 'no down'} matrix")
        target = names.get(prefix) or names.get(_peft_name(prefix))
        if target is None:
            unmatched.append(prefix)
            continue
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None else peft_alpha(prefix)
        layers.append(Layer(*target, parts["down"], parts["up"], alpha))
    if unmatched:
        what = "none" if not layers else f"{len(unmatched)} of {len(groups)}"
        raise LoraError(f"{path}: {what} of its layers match this model ({_family_hint(unmatched)}), e.g. "
                        f"{', '.join(sorted(unmatched)[:3])}; nothing was applied")
    return layers


def _module_names(components) -> dict[str, tuple[str, str]]:
    """Every LoRA-able module of the model under each spelling a file may use -> (component, module name)."""
    out = {}
    for attr, kohya, diffusers_prefix in COMPONENTS:
        model = getattr(components, attr, None)
        if model is None:
            continue
        original = original_unet_names(model.config) if attr == "unet" else {}
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            plain = name.removeprefix("text_model.")
            spellings = [plain, f"text_model.{plain}"] if attr.startswith("text_encoder") else [plain]
            if _original_name(name, original):
                spellings.append(_original_name(name, original))
            for s in spellings:
                for k in kohya:
                    out[f"{k}_{s.replace('.', '_')}"] = (attr, name)
                out[f"{diffusers_prefix}.{s}"] = (attr, name)
    return out


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def original_unet_names(config) -> dict[str, str]:
    """diffusers U-Net block paths -> the original (LDM/SGM) layout's, which kohya uses for SDXL LoRAs
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) and some SD 1.x LoRAs use too."""
    per = int(config.layers_per_block)
    n = len(config.block_out_channels)
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    for b in range(n):
        for i in range(per):
            out[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{1 + b * (per + 1) + i}.0"
            out[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{1 + b * (per + 1) + i}.1"
        out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (per + 1)}.0.op"
        for i in range(per + 1):
            out[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{b * (per + 1) + i}.0"
            out[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{b * (per + 1) + i}.1"
        attention = "CrossAttn" in config.up_block_types[b]
        out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (per + 1) + per}.{2 if attention else 1}.conv"
    return out


def _original_name(name: str, table: dict[str, str]) -> str | None:
    """A module's name in the original layout: its block path mapped, resnet parts renamed."""
    if name in table:
        return table[name]
    parts = name.split(".")
    for cut in (4, 3, 2):  # "down_blocks.1.attentions.0" / "mid_block.resnets.0" + the rest
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if head in table and rest:
            if ".resnets." in head or head.startswith("mid_block.resnets"):
                rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
            return ".".join([table[head], *rest])
    return None


def _peft_alphas(path):
    """prefix -> alpha from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, "unet.alpha_pattern":
    {module: alpha}, ...}); None where the file says nothing (then alpha = rank, as diffusers assumes)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        raise LoraError(f"{path}: its lora_adapter_metadata is not valid JSON") from None

    def alpha(prefix: str) -> float | None:
        component, _, module = _peft_name(prefix).partition(".")
        for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's rule for per-module overrides
                return float(value)
        value = meta.get(f"{component}.lora_alpha")
        return None if value is None else float(value)

    return alpha


def _peft_name(prefix: str) -> str:
    return prefix.replace("base_model.model.", "")


def _family_hint(unmatched: list[str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in k or "output_blocks" in k for k in unmatched):
        return "it looks like an SDXL LoRA"
    return "it was made for another model family or architecture"


@dataclass(frozen=True)
class Applied:
    """The LoRAs of a run, for the infotext: [(name as tagged, file entry)]."""

    loras: tuple = ()

    def infotext(self, library: Library | None) -> dict:
        if not self.loras or library is None:
            return {}
        return {"Lora hashes": ", ".join(f"{name}: {library.short_hash(entry)}" for name, entry in self.loras)}


class Networks:
    """The LoRAs merged into one model's weights around a run. One run at a time (like the model itself)."""

    def __init__(self, components, library: Library | None):
        self.components = components
        self.library = library
        self._key = None
        self._merged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def resolve(self, tags: Sequence[LoraTag]) -> list:
        """The library entry of each tag, checked before any work (unknown names list close ones)."""
        if not tags:
            return []
        if self.library is None:
            raise ValueError(f"{tags[0].tag()} needs a models folder to find LoRAs in: load the model with "
                             "ldm.load(..., models_dir=DIR), the LoRA going in DIR/Lora/")
        return [self.library.find("loras", t.name) for t in tags]

    def merged(self, tags: Sequence[LoraTag], entries: list) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, merged weight) for every weight the LoRA set changes; the last set is cached."""
        key = tuple((str(e.path), e.path.stat().st_mtime_ns, e.size, t.te, t.unet) for t, e in zip(tags, entries))
        if key == self._key:
            return self._merged
        self._key, self._merged = None, []  # free the previous set before building the next
        work: dict[tuple[str, str], list] = {}  # target -> [parameter, [(layer, multiplier), ...]]
        for tag, layers in zip(tags, [read_layers(e.path, self.components) for e in entries]):  # all checked first
            for layer in layers:
                param = getattr(self.components, layer.component).get_submodule(layer.module).weight
                layer.check(param)
                mult = tag.unet if layer.component == "unet" else tag.te
                if mult != 0:
                    work.setdefault((layer.component, layer.module), [param, []])[1].append((layer, mult))
        merged = []
        with torch.no_grad():
            for param, layers in work.values():
                # float32 accumulation: a copy of the weight, then one GEMM per LoRA on the same layer
                acc = param.detach().to(torch.float32, copy=True).reshape(param.shape[0], -1)
                for layer, mult in layers:
                    layer.add_to(acc, mult)
                weight = acc.reshape(param.shape).to(param.dtype)
                if not param.is_contiguous():  # e.g. channels_last convolutions: keep the layout
                    weight = torch.empty_like(param.detach()).copy_(weight)
                merged.append((param, weight))
        self._key, self._merged = key, merged
        return merged

    @contextmanager
    def applied(self, tags: Sequence[LoraTag]) -> Iterator[Applied]:
        """Merge the tagged LoRAs for the duration of the block; the original tensors are restored after."""
        entries = self.resolve(tags)
        if not entries:
            yield Applied()
            return
        merged = self.merged(tags, entries)
        originals = [(param, param.data) for param, _ in merged]
        try:
            for param, weight in merged:
                param.data = weight
            yield Applied(tuple((t.name, e) for t, e in zip(tags, entries)))
        finally:
            for param, data in originals:
                param.data = data

    def clear_cache(self) -> None:
        """Drop the cached merged weights (they take as much memory as the weights the LoRAs change)."""
        self._key, self._merged = None, []
