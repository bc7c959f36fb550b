"""ControlNet: load a model, describe a unit (`ControlUnit`), turn units into loop extensions.

    cn = ldm.load_controlnet("models/ControlNet/control_v11p_sd15_canny", base=pipe)  # SD 1.x/2.x or SDXL
    unit = ldm.ControlUnit(cn, "photo.png", preprocessor="canny", weight=0.8, end=0.6)
    pipe.txt2img("a house", control=[unit])

A unit's residuals are computed per step by `ldm.extensions.control.ControlResiduals` exactly as
diffusers' ControlNet pipelines do (see there); several units add up. `start`/`end` are fractions
of the steps run (diffusers' control_guidance_start/end). A1111's "Control mode" names map onto
these settings (`CONTROL_MODES`):

    "Balanced"                      guess_mode=False               residuals x weight, both CFG halves
    "My prompt is more important"   soft=True                      x weight x 0.1..1 (shallow..deep), both halves
    "ControlNet is more important"  guess_mode=True                the same scaling, conditional half only

(A1111's 0.825^(12 - i) per layer is diffusers' logspace(-1, 0, 13), since 0.825 ~ 10^(-1/12).)

The control image is fitted to the generation size ("crop": A1111's "Crop and Resize", "just":
"Just Resize", "fill": "Resize and Fill", as diffusers' image processor does them), then run through
its preprocessor (ldm.control_preprocess), and given to the ControlNet in [0, 1].
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import images as imgs
from .control_preprocess import PREPROCESSORS, get_preprocessor, preprocess
from .components import ModelLoadError, check_safetensors, read_json, require_complete, require_regular_files
from .controlnet_file import check_family, check_kind, load_controlnet_file
from .extensions.control import ControlResiduals
from .extensions.fast import FastPreset
from .library import legacy_hash
from .params import CONTROL_STEPS, CONTROL_WEIGHT, Range

RESIZE_MODES = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}  # name -> A1111 label
CONTROL_MODES = {  # A1111's "Control mode" -> ControlUnit settings
    "Balanced": {"guess_mode": False, "soft": False},
    "My prompt is more important": {"guess_mode": False, "soft": True},
    "ControlNet is more important": {"guess_mode": True, "soft": False},
}
MAX_UNITS = 8


@dataclass(eq=False)
class ControlNet:
    """A loaded ControlNet: the diffusers `ControlNetModel`, its name and where it came from."""

    module: torch.nn.Module
    name: str
    path: Path | None = None

    @property
    def config(self):
        return self.module.config

    @cached_property
    def short_hash(self) -> str:
        """The hash A1111's ControlNet extension shows ("name [hash]"), as the models folder lists it:
        its old 8-hex model hash (`ldm.library.legacy_hash`)."""
        return "" if self.path is None else legacy_hash(self.path)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


def load_controlnet(path: str | os.PathLike, *, base=None, device=None, dtype=None) -> ControlNet:
    """A ControlNet from a diffusers folder (config.json + safetensors weights) or a single .safetensors
    file, original layout or diffusers names (A1111's models/ControlNet; SD 1.x/2.x and SDXL ControlNets).
    Offline, safetensors only.

    base: the pipeline it will run with; gives the default device and dtype (its U-Net's), and for single
    files the architecture (a ControlNet is its base U-Net's encoder half); a ControlNet made for another
    family (SDXL for an SD 1.5 model, or the reverse) is refused here, before its weights are read. With a base loaded
    with `models_dir=`, `path` may be a name in its ControlNet/ folder ("control_v11p_sd15_canny")."""
    path = Path(path).expanduser()
    library = getattr(base, "library", None)
    if not path.exists() and library is not None and path.suffix not in (".pth", ".ckpt", ".pt", ".bin"):
        path = library.find("controlnets", str(path)).path
    unet = getattr(base, "unet", None)
    device = device if device is not None else (base.device if base is not None else "cpu")
    dtype = dtype if dtype is not None else (unet.dtype if unet is not None else torch.float32)
    if path.is_dir():
        module = _load_folder(path, dtype, None if unet is None else dict(unet.config))
    elif path.suffix == ".safetensors":
        if unet is None:
            raise ValueError(f"{path} is a single-file ControlNet: pass base=<the pipeline it is for> "
                             "(its architecture comes from the base model)")
        module = load_controlnet_file(path, dict(unet.config), dtype)
    elif path.exists():
        raise ModelLoadError(f"{path}: a ControlNet must be a diffusers folder or a .safetensors file "
                             "(pickle formats like .pth/.ckpt are not loaded)")
    else:
        raise ModelLoadError(f"ControlNet not found: {path}")
    return ControlNet(module.to(device).eval(), path.stem if path.is_file() else path.name, path)


def _load_folder(folder: Path, dtype, unet_config: dict | None) -> torch.nn.Module:
    from diffusers import ControlNetModel

    require_regular_files(folder)
    config = read_json(folder / "config.json")
    if unet_config is not None:
        check_family(config, unet_config, folder.name)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder} (pickle formats are not loaded)")
    headers = {f: check_safetensors(f) for f in files}
    check_kind({k: v for tensors in headers.values() for k, v in tensors.items()}, folder.name, config.get("_class_name"))
    with torch.device("meta"):
        try:
            skeleton = ControlNetModel.from_config(config)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{folder}/config.json is not a ControlNet config ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for file, tensors in headers.items():
        for name, (_, shape) in tensors.items():
            if name in expected and expected[name] != shape:
                raise ModelLoadError(f"{file}: tensor {name} has shape {list(shape)}, its config expects "
                                     f"{list(expected[name])}")
    try:
        module, info = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True,
                                                       local_files_only=True, output_loading_info=True)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
        raise ModelLoadError(f"{folder}: the ControlNet could not be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None
    require_complete(module, "ControlNet", folder, missing=info.get("missing_keys", ()))
    return module


def _number(name: str, value, allowed: Range) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in allowed:
        raise ValueError(f"ControlNet {name} must be a number from {allowed.text()}, got {value!r}")
    return float(value)


def _resize_mode(value) -> str:
    """"crop", "just", "fill", or A1111's label for one of them -> the short name."""
    labels = {v: k for k, v in RESIZE_MODES.items()}
    mode = labels.get(value, value) if isinstance(value, str) else value
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown ControlNet resize mode {value!r}; choose one of: {', '.join(RESIZE_MODES)} "
                         f"(or {', '.join(labels)})")
    return mode


def _fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """diffusers' VaeImageProcessor resize modes (Lanczos): "just" stretches, "crop" covers and crops
    the centre, "fill" fits inside and stretches the edge rows/columns into the margins."""
    if image.size == (width, height):
        return image
    if mode == "just":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        w = width if ratio > src_ratio else image.width * height // image.height
        h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        w = width if ratio < src_ratio else image.width * height // image.height
        h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == "fill" and ratio < src_ratio and (pad := height // 2 - h // 2) > 0:
        out.paste(resized.resize((width, pad), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, pad), box=(0, h, width, h)), box=(0, pad + h))
    elif mode == "fill" and ratio > src_ratio and (pad := width // 2 - w // 2) > 0:
        out.paste(resized.resize((pad, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((pad, height), box=(w, 0, w, height)), box=(pad + w, 0))
    return out


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet with its image and settings. `settings` are the preprocessor's (see
    `ldm.control_preprocess.PREPROCESSORS`); `resize` is "crop", "just" or "fill" (or A1111's labels)."""

    model: ControlNet
    image: object  # PIL image, path, bytes or binary file
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str = "none"
    resize: str = "crop"
    soft: bool = False
    settings: Mapping = field(default_factory=dict)

    @classmethod
    def a1111(cls, model, image, *, control_mode: str = "Balanced", **fields) -> "ControlUnit":
        """A unit from A1111's control mode name ("Balanced", "My prompt is more important", ...)."""
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {control_mode!r}; choose one of: {', '.join(CONTROL_MODES)}")
        return cls(model, image, **{**fields, **CONTROL_MODES[control_mode]})

    @property
    def control_mode(self) -> str:
        return "ControlNet is more important" if self.guess_mode else "My prompt is more important" if self.soft else "Balanced"

    def validate(self, unet_config=None, *, max_pixels: int = imgs.DEFAULT_MAX_PIXELS) -> "ControlUnit":
        """Check every field (and, given the base U-Net's config, that the ControlNet fits it); return a copy
        with the image loaded as RGB, the resize mode canonical and the preprocessor settings filled in."""
        model = self.model
        if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
            model = ControlNet(model, "controlnet")
        if not isinstance(model, ControlNet):
            raise ValueError(f"ControlUnit.model must be a ControlNet from ldm.load_controlnet, got {type(model).__name__}")
        weight = _number("weight", self.weight, CONTROL_WEIGHT)
        start, end = _number("start", self.start, CONTROL_STEPS), _number("end", self.end, CONTROL_STEPS)
        if start >= end:
            raise ValueError(f"ControlNet start ({start:g}) must be before end ({end:g}): both are fractions of the steps")
        for name in ("guess_mode", "soft"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ControlNet {name} must be True or False, got {getattr(self, name)!r}")
        resize = _resize_mode(self.resize)
        settings = get_preprocessor(self.preprocessor).resolve(self.settings)
        if unet_config is not None:
            check_family(dict(model.config), dict(unet_config), model.name)
        try:
            image = imgs.load_image(self.image, max_pixels=max_pixels)
        except FileNotFoundError:
            raise ValueError(f"ControlNet image not found: {self.image}") from None
        except ValueError as exc:
            raise ValueError(f"ControlNet image: {exc}") from None
        return replace(self, model=model, image=image, weight=weight, start=start, end=end, resize=resize,
                       settings=settings)

    def control_map(self, width: int, height: int, *, seed: int = 0, canvas: tuple[int, int] | None = None,
                    region: tuple[int, int, int, int] | None = None) -> Image.Image:
        """The preprocessed control image at the generation size (what the UI previews). With `region`
        (inpainting "only masked"), the image is fitted to `canvas`, cropped to the region, then stretched."""
        image = self.image
        if not (isinstance(image, Image.Image) and image.mode == "RGB"):
            image = imgs.load_image(image)
        if region is not None:
            image = _fit(image, *canvas, _resize_mode(self.resize)).crop(region)
            image = _fit(image, width, height, "just")
        else:
            image = _fit(image, width, height, _resize_mode(self.resize))
        out = preprocess(image, self.preprocessor, self.settings, seed=seed)
        return out if out.size == (width, height) else out.resize((width, height), Image.LANCZOS)

    def infotext(self) -> str:
        """The unit as A1111's ControlNet extension writes it ("Module: canny, Model: name [hash], ...")."""
        title = self.model.title if isinstance(self.model, ControlNet) else "controlnet"
        parts = {"Module": self.preprocessor, "Model": title, "Weight": float(self.weight),
                 "Resize Mode": RESIZE_MODES.get(self.resize, self.resize)}
        for label, value in zip(("Threshold A", "Threshold B"), dict(self.settings).values()):
            parts[label] = float(value)
        parts.update({"Guidance Start": float(self.start), "Guidance End": float(self.end), "Pixel Perfect": True,
                      "Control Mode": self.control_mode})
        return ", ".join(f"{k}: {str(v).replace(',', ' ').replace(':', ' ')}" for k, v in parts.items())


def parse_unit_infotext(text: str) -> dict:
    """A "ControlNet N" infotext value (ours or A1111's) -> ControlUnit keyword fields plus "model_title"
    (the "name [hash]" to look the model up by) and "control_mode". Unknown keys are ignored, as A1111 does."""
    raw = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if sep:
            raw[key.strip()] = value.strip()
    out: dict = {}
    if "Module" in raw:
        out["preprocessor"] = raw["Module"]
    if "Model" in raw:
        out["model_title"] = raw["Model"]
    for key, name in (("Weight", "weight"), ("Guidance Start", "start"), ("Guidance End", "end")):
        try:
            out[name] = float(raw[key])
        except (KeyError, ValueError):
            pass
    labels = {v: k for k, v in RESIZE_MODES.items()}
    if raw.get("Resize Mode") in labels:
        out["resize"] = labels[raw["Resize Mode"]]
    if raw.get("Control Mode") in CONTROL_MODES:
        out["control_mode"] = raw["Control Mode"]
    pre = PREPROCESSORS.get(out.get("preprocessor", ""))
    if pre is not None:
        settings = {}
        for setting, key in zip(pre.settings, ("Threshold A", "Threshold B")):
            try:
                settings[setting.name] = float(raw[key])
            except (KeyError, ValueError):
                pass
        out["settings"] = settings
    return out


def check_units(control, unet_config, *, extensions: Sequence = ()) -> list[ControlUnit]:
    """Validate a task's `control` argument before any model work; returns the validated units."""
    if control is None:
        return []
    if isinstance(control, ControlUnit) or not isinstance(control, Sequence):
        control = [control]
    units = list(control)
    if len(units) > MAX_UNITS:
        raise ValueError(f"{len(units)} ControlNet units given; at most {MAX_UNITS} at once")
    for u in units:
        if not isinstance(u, ControlUnit):
            raise ValueError(f"control must be a list of ldm.ControlUnit, got {type(u).__name__}")
    if units and any(isinstance(e, FastPreset) for e in extensions):
        raise ValueError("the fast preset cannot be combined with ControlNet (its cached U-Net steps skip the "
                         "ControlNet residuals); turn fast off")
    return [u.validate(unet_config) for u in units]


def control_extensions(model, units: Sequence[ControlUnit], p, *, canvas=None, region=None) -> list[ControlResiduals]:
    """One loop extension per validated unit, its control image prepared for `p` (size, batch, seed)."""
    out = []
    for i, unit in enumerate(units):
        net = unit.model.module
        first = next(net.parameters())
        if first.device.type != torch.device(model.device).type or first.dtype != model.unet.dtype:
            raise ValueError(f"ControlNet {unit.model.name!r} is on {first.device.type}/{first.dtype} but the model runs "
                             f"on {torch.device(model.device).type}/{model.unet.dtype}: load it with "
                             "ldm.load_controlnet(path, base=pipe)")
        cmap = unit.control_map(p.width, p.height, seed=max(p.seed, 0), canvas=canvas, region=region)
        pixels = torch.from_numpy(np.asarray(cmap).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        image = pixels.repeat(p.batch_size, 1, 1, 1).to(device=first.device, dtype=first.dtype)
        out.append(ControlResiduals(net, image, unit.weight, unit.start, unit.end, unit.guess_mode, unit.soft,
                                    info={f"ControlNet {i}": unit.infotext()}))
    return out


def with_control(model, p, control, extensions: Sequence = (), *, canvas=None, region=None) -> tuple:
    """For a task, before any model work: (p with a concrete seed, `extensions` plus one extension per
    unit); `p` and `extensions` unchanged without control. The seed may drive a preprocessor (shuffle)."""
    units = check_units(control, model.unet.config, extensions=extensions)
    if not units:
        return p, list(extensions)
    p = p.with_seed()
    return p, [*extensions, *control_extensions(model, units, p, canvas=canvas, region=region)]
