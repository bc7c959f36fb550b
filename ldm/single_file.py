"""Single-file checkpoints -> Components, fully offline.

Model sites share Stable Diffusion as one file in the original (CompVis/LDM) key layout:
`model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder).
The file holds weights only; the architecture comes from a diffusers config folder: the bundled one
of its family (`BUNDLED_CONFIGS`: SD 1.5, SD 2.x 512 or 768-v, SDXL base or refiner), or the caller's
`config=` folder. Epsilon or v-prediction: see `ldm.prediction`. diffusers converts the keys
(`from_single_file` with a local config and `local_files_only=True`, so the hub is never asked).

Safety: the file is read here, by content, before diffusers sees it. safetensors files are checked
for truncation first; pickles (.ckpt/.pt/.bin) can run code while loading, so they are refused unless
the caller opts in, and even then only tensors are unpickled (`torch.load(weights_only=True)`).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .components import (Components, ModelKind, ModelLoadError, check_safetensors, require_complete, require_regular,
                         require_regular_files)
from .devices import ComponentDtypes, force_upcast_vae
from .prediction import PredictionType, predicts_v

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
SD15_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15"
SDXL_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl"
SDXL_REFINER_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl-refiner"
SD2_CONFIG = Path(__file__).resolve().parent / "configs" / "sd2"  # SD 2.x 512px, epsilon
SD2_V_CONFIG = Path(__file__).resolve().parent / "configs" / "sd2-v"  # SD 2.x 768px, v-prediction
# The bundled architecture of each family; "sd2-v" is chosen over "sd2" for v-prediction checkpoints.
BUNDLED_CONFIGS = {"sd1": SD15_CONFIG, "sd2": SD2_CONFIG, "sd2-v": SD2_V_CONFIG, "sdxl": SDXL_CONFIG,
                   "sdxl-refiner": SDXL_REFINER_CONFIG}
# The CLIP tokenizer ships once, as package data; config folders reference it instead of copying it.
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "configs" / "clip-tokenizer"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 text model
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_PREFIX = "conditioner."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L (HF names)
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG (original names)
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: bigG only
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
V_PRED_MARKER = "v_pred"  # empty tensor some trainers add to mark v-prediction checkpoints

SUPPORTED = ("supported single-file checkpoints: Stable Diffusion 1.x and 2.x (base or 9-channel inpainting, "
             "epsilon or v-prediction), SDXL base (base or 9-channel inpainting) and SDXL refiner as "
             ".safetensors, or as a pickle with allow_pickle=True")


def is_single_file(model: str | os.PathLike) -> bool:
    """True for an existing file, or a missing path that is named like a checkpoint file."""
    path = Path(model).expanduser()
    return path.is_file() or (not path.is_dir() and path.suffix.lower() in SINGLE_FILE_SUFFIXES)


@dataclass(frozen=True)
class Layout:
    """What the keys and shapes of an original-layout checkpoint say about the model."""

    family: str  # "sd1" (CLIP text encoder), "sd2" (OpenCLIP), "sdxl" (CLIP + OpenCLIP bigG), "sdxl-refiner" (bigG)
    in_channels: int  # 4 base, 9 inpainting
    v_prediction: bool


# ---- reading the file ---------------------------------------------------------------------------


def _head(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(2)


def _looks_like_pickle(file: Path) -> bool:
    """torch.save writes a zip ("PK"); plain pickles start with the PROTO opcode 0x80."""
    head = _head(file)
    return head == b"PK" or head[:1] == b"\x80"


def read_state_dict(file: Path, *, allow_pickle: bool = False, dtypes: ComponentDtypes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint. The format is decided by content, not by name.

    With `dtypes`, floating-point tensors of a .safetensors file are converted to their component's dtype
    one at a time as they are read, so a conversion (fp16 file -> bf16 or fp32 weights) never holds the
    whole file and the whole converted model at once."""
    require_regular(file)  # "no such file"; a FIFO, device or directory is refused before open() can block on it
    if file.suffix.lower() != ".safetensors" and _looks_like_pickle(file):
        return _read_pickle(file, allow_pickle=allow_pickle)
    check_safetensors(file)  # refuses pickles named .safetensors and truncated files before parsing
    from safetensors.torch import load_file

    try:
        if dtypes is not None and _needs_conversion(file, dtypes):
            return _read_converting(file, dtypes)
        return load_file(file)  # memory-mapped: tensors are read as they are used
    except Exception as exc:  # header passed the checks but the tensors do not parse
        raise ModelLoadError(f"corrupt or incomplete file: {file} ({exc})") from None


def _header(file: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, complete): a .safetensors file's tensors as meta-device placeholders of the right shapes,
    from its header alone (enough for `detect`), or a pickle's real tensors."""
    require_regular(file)
    if file.suffix.lower() != ".safetensors" and _looks_like_pickle(file):
        return _read_pickle(file, allow_pickle=allow_pickle), True
    shapes = check_safetensors(file)
    return {k: torch.empty(shape, device="meta") for k, (_, shape) in shapes.items()}, False


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a file `check_safetensors` accepted."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _needs_conversion(file: Path, dtypes: ComponentDtypes) -> bool:
    header, _ = _safetensors_header(file)
    if any(info["dtype"] not in _TORCH_DTYPES for info in header.values()):
        return False  # exotic dtypes: safetensors reads them, from_single_file converts
    return any(_TORCH_DTYPES[info["dtype"]].is_floating_point and _TORCH_DTYPES[info["dtype"]] != _component_dtype(k, dtypes)
               for k, info in header.items())


def _read_converting(file: Path, dtypes: ComponentDtypes) -> dict[str, torch.Tensor]:
    """Read tensor by tensor, each converted to its component's dtype at once: the peak is the converted
    model plus one tensor, not the whole file plus the converted model (safetensors' reader copies the file)."""
    header, data = _safetensors_header(file)
    out = {}
    with open(file, "rb") as f:
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = _TORCH_DTYPES[info["dtype"]]
            buffer = bytearray(end - begin)
            f.seek(data + begin)
            f.readinto(buffer)
            tensor = (torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)).reshape(info["shape"])
            want = _component_dtype(key, dtypes)
            out[key] = tensor.to(want) if dtype.is_floating_point and dtype != want else tensor
    return out


def _component_dtype(key: str, dtypes: ComponentDtypes) -> torch.dtype:
    if key.startswith(UNET_PREFIX):
        return dtypes.unet
    return dtypes.vae if key.startswith(VAE_PREFIX) else dtypes.text_encoder


def _read_pickle(file: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ModelLoadError(
            f"{file} is a pickle checkpoint; loading a pickle can run arbitrary code, so it is refused. "
            "Use a .safetensors version of the model, or, if you trust the file, pass allow_pickle=True "
            "(only tensors are then unpickled)."
        )
    try:
        # weights_only: the restricted unpickler rebuilds tensors and containers and rejects any other object.
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=_head(file) == b"PK")  # mmap needs the zip format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{file} contains objects other than tensors, which could run code; refused even with allow_pickle "
            f"({first}). Convert it to .safetensors in a sandbox you can throw away."
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"corrupt or incomplete file: {file} ({type(exc).__name__}: {exc})") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # Lightning-style nesting
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} does not hold a state dict (found {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ---- what is in it ------------------------------------------------------------------------------


def detect(state_dict: dict[str, torch.Tensor], file: Path) -> Layout:
    """Read the model family from keys and shapes; refuse what this library cannot run."""
    keys = state_dict.keys()
    if CONV_IN not in state_dict:
        raise ModelLoadError(
            f"{file} is not a full Stable Diffusion checkpoint (no U-Net under '{UNET_PREFIX}'); LoRAs, VAEs and "
            f"embeddings are not models on their own. {SUPPORTED}"
        )
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise ModelLoadError(f"{file} has no VAE ('{VAE_PREFIX}*'); a full checkpoint is needed. {SUPPORTED}")
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        family = _sdxl_family(keys, file)
    elif any(k.startswith(CLIP_PREFIX) for k in keys):
        family = "sd1"
    elif any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        family = "sd2"
    else:
        raise ModelLoadError(f"{file} has no text encoder ('cond_stage_model.*'); a full checkpoint is needed. {SUPPORTED}")
    in_channels = int(state_dict[CONV_IN].shape[1])
    if in_channels not in (4, 9):
        raise ModelLoadError(
            f"{file}: a U-Net with {in_channels} input channels (x4 upscaler, instruct-pix2pix, ...) is not supported "
            f"as a single file; use its diffusers folder. {SUPPORTED}"
        )
    return Layout(family, in_channels, V_PRED_MARKER in state_dict)


def read_layout(file: str | os.PathLike) -> Layout:
    """`detect` from a .safetensors file's header alone (no tensor data is read); pickles are refused."""
    state_dict, _ = _header(Path(file), allow_pickle=False)
    return detect(state_dict, Path(file))


def _sdxl_family(keys, file: Path) -> str:
    clip, bigg = (any(k.startswith(p) for k in keys) for p in (SDXL_CLIP_PREFIX, SDXL_BIGG_PREFIX))
    if clip and bigg:
        return "sdxl"
    if any(k.startswith(SDXL_REFINER_PREFIX) for k in keys) and not clip:
        return "sdxl-refiner"
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(SDXL_PREFIX)})[:4]
    raise ModelLoadError(f"{file} has SDXL-style text encoders ('{SDXL_PREFIX}*') but neither SDXL base's pair "
                         f"('{SDXL_CLIP_PREFIX}*' and '{SDXL_BIGG_PREFIX}*') nor the refiner's '{SDXL_REFINER_PREFIX}*'; "
                         f"found {', '.join(found)}. {SUPPORTED}")


def _config_folder(layout: Layout, config: str | os.PathLike | None, prediction: PredictionType | None) -> Path:
    if config is not None:
        folder = Path(config).expanduser()
        for sub in (folder / d for d in ("unet", "vae", "text_encoder", "scheduler", "tokenizer")):
            if sub.is_dir():
                require_regular_files(sub)  # a FIFO named config.json would block open() forever
        needed = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                  *(() if layout.family == "sdxl-refiner" else ("text_encoder/config.json",)),
                  *(("text_encoder_2/config.json",) if layout.family.startswith("sdxl") else ()))
        missing = [p for p in needed if not (folder / p).is_file()]
        if missing:
            raise ModelLoadError(f"config folder {folder} lacks {', '.join(missing)} (a diffusers model folder layout is expected)")
        return folder
    if layout.family == "sd2" and prediction is PredictionType.V_PREDICTION:
        return BUNDLED_CONFIGS["sd2-v"]
    return BUNDLED_CONFIGS[layout.family]


def _tokenizer(config: Path, name: str, open_clip: bool):
    """The config folder's own tokenizer, else the bundled CLIP tokenizer; OpenCLIP's (SD 2.x, SDXL's second)
    pads with "!" (id 0) where OpenAI CLIP's pads with its end token."""
    from transformers import CLIPTokenizer

    own = config / name
    folder = own if own.is_dir() else DEFAULT_TOKENIZER
    if not (folder / "vocab.json").is_file():
        raise ModelLoadError(f"CLIP tokenizer not found at {folder} (expected vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(folder, **({"pad_token": "!"} if open_clip and not own.is_dir() else {}))


# ---- building the components --------------------------------------------------------------------


def load_single_file(file: str | os.PathLike, *, device: torch.device, dtype: torch.dtype | ComponentDtypes,
                     allow_pickle: bool = False, config: str | os.PathLike | None = None,
                     prediction_type: PredictionType | None = None) -> Components:
    """Components from one checkpoint file; `config` overrides the bundled config folder, `prediction_type`
    what the file and config say (None: the marker, the config, or for SD 2.x `predicts_v`)."""
    file = Path(file).expanduser()
    state_dict, complete = _header(file, allow_pickle)
    layout = detect(state_dict, file)
    prediction = prediction_type or (PredictionType.V_PREDICTION if layout.v_prediction else None)
    probe = layout.family == "sd2" and config is None and prediction is None
    if probe and layout.in_channels == 9:  # SD 2 inpainting is epsilon; A1111 does not test it either
        prediction, probe = PredictionType.EPSILON, False
    folder = _config_folder(layout, config, prediction)
    dtypes = dtype if isinstance(dtype, ComponentDtypes) else ComponentDtypes.same(dtype)
    sdxl, refiner = layout.family.startswith("sdxl"), layout.family == "sdxl-refiner"
    if sdxl:
        dtypes = force_upcast_vae(dtypes, json.loads((folder / "vae" / "config.json").read_text()))
    if not complete:  # safetensors: now read, each tensor converted to its component's dtype as it comes
        state_dict = read_state_dict(file, dtypes=dtypes)

    tokenizer = None if refiner else _tokenizer(folder, "tokenizer", open_clip=layout.family == "sd2")
    models = _build_models(state_dict, folder, layout, dtypes, file)
    del state_dict  # the converted copies live in the models now
    text_encoder, unet, vae = models.get("text encoder"), models["U-Net"], models["VAE"]
    extras = {}
    if sdxl:
        extras = {"tokenizer_2": _tokenizer(folder, "tokenizer_2", open_clip=True),
                  "text_encoder_2": models["second text encoder"]}
    for m in models.values():
        m.to(device).eval().requires_grad_(False)
    if probe:
        prediction = PredictionType.V_PREDICTION if predicts_v(unet) else PredictionType.EPSILON
        log.info("%s: A1111's output test says %s", file.name, prediction.value)
        folder = _config_folder(layout, config, prediction)
        # the 768-v config differs from the 512 one only in the native size, not in any weight's shape
        unet.register_to_config(sample_size=json.loads((folder / "unet" / "config.json").read_text())["sample_size"])

    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if prediction is not None:
        scheduler_config["prediction_type"] = prediction.value
    kind = ModelKind.REFINER if refiner else ModelKind.INPAINT if layout.in_channels == 9 else ModelKind.BASE
    log.info("loaded %s (%s, %s, %d-channel U-Net) with configs from %s", file.name, layout.family,
             scheduler_config.get("prediction_type", "epsilon"), layout.in_channels, folder)
    return Components(tokenizer, text_encoder, unet, vae, scheduler_config, file, file.stem, kind, **extras)


def _build_models(state_dict: dict, folder: Path, layout: Layout, dtypes: ComponentDtypes, file: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    offline = {"config": str(folder), "local_files_only": True}
    steps = {
        "text encoder": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state_dict, subfolder="text_encoder", torch_dtype=dtypes.text_encoder, **offline),
        # in_channels comes from the weights, so one config folder serves base and inpainting checkpoints.
        "U-Net": lambda: UNet2DConditionModel.from_single_file(
            state_dict, subfolder="unet", torch_dtype=dtypes.unet, in_channels=layout.in_channels, **offline),
        "VAE": lambda: AutoencoderKL.from_single_file(state_dict, subfolder="vae", torch_dtype=dtypes.vae, **offline),
    }
    if layout.family == "sdxl-refiner":
        del steps["text encoder"]
    if layout.family.startswith("sdxl"):
        steps["second text encoder"] = lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, state_dict, subfolder="text_encoder_2", torch_dtype=dtypes.text_encoder, **offline)
    models = {}
    for name, build in steps.items():
        try:
            model = build()
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # shape mismatches, missing keys
            raise ModelLoadError(
                f"{file}: the {name} weights do not fit the config in {folder} ({type(exc).__name__}: "
                f"{str(exc)[:300]}). {SUPPORTED}; for other architectures pass config=<matching diffusers folder>"
            ) from None
        require_complete(model, name, file, where=f" for the config in {folder}", hint=f". {SUPPORTED}")
        models[name] = model
    return models

