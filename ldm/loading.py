"""Model folders / hub ids / single files -> components. Offline first; safetensors only.

`load_components` is the one entry: a single checkpoint file goes to `ldm.single_file`, anything
else must be a diffusers folder (or a hub id found in the local cache)."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from . import single_file
from .components import (KIND_BY_CHANNELS, Components, ModelKind, ModelLoadError, check_safetensors, read_json, require_complete,
                         require_regular, require_regular_files)
from .devices import ComponentDtypes, force_upcast_vae
from .prediction import PredictionType

log = logging.getLogger(__name__)

COMPONENT_DIRS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SDXL_DIRS = ("tokenizer_2", "text_encoder_2")  # SDXL's second (OpenCLIP bigG) tokenizer and text encoder
REFINER_LACKS = ("tokenizer", "text_encoder")  # an SDXL refiner folder has only the second pair


def locate(model: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local diffusers folder for `model`: the folder itself, or a hub id from the local cache
    (downloaded only when allowed and reachable)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):  # existing files went to ldm.single_file
        raise ModelLoadError(f"checkpoint file not found: {text}")
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelLoadError(f"model {text!r} is neither a local folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
            reason = "it is not in the local Hugging Face cache and downloads are off"
        else:
            try:
                return Path(snapshot_download(text, allow_patterns=patterns))
            except Exception as exc:  # network down, no such repo, gated, ...
                reason = f"it is not in the local cache and could not be downloaded ({type(exc).__name__})"
    raise ModelLoadError(
        f"model {text!r} not found: {reason}. Pre-download it on a machine with network access with "
        f"`huggingface-cli download {text}` (then copy the cache, ~/.cache/huggingface), or pass a local folder."
    )


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """What a checkpoint on disk is, from its folder layout or its file's header (no weights are read):
    "sdxl", "sdxl-refiner", "sd1", "sd2", or "sd" (a diffusers folder of SD 1.x or 2.x); None when it is not a
    model this library loads (unreadable, a pickle, a LoRA, ...). For listings, e.g. the UI's refiner choices."""
    path = Path(path)
    if path.is_dir():
        if (path / "text_encoder_2").is_dir():
            return "sdxl" if (path / "text_encoder").is_dir() else "sdxl-refiner"
        return "sd" if (path / "unet").is_dir() else None
    try:
        return single_file.read_layout(path).family
    except (ModelLoadError, OSError):
        return None


def _weights(folder: Path) -> dict[Path, dict[str, tuple[str, tuple[int, ...]]]]:
    """The folder's safetensors files, each checked, with the {name: (dtype, shape)} its header lists."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        hint = f" (found {', '.join(others)}: pickle formats are not loaded)" if others else ""
        raise ModelLoadError(f"no .safetensors weights in {folder}{hint}")
    return {f: check_safetensors(f) for f in files}


LOAD_ERRORS = (RuntimeError, ValueError, KeyError, OSError, TypeError)  # corrupt configs and weights


@contextmanager
def _component_errors(folder: Path, what: str, errors: tuple = LOAD_ERRORS):
    """What diffusers/transformers raise on a corrupt component becomes a ModelLoadError naming its folder."""
    try:
        yield
    except ModelLoadError:
        raise
    except errors as exc:
        raise ModelLoadError(f"{folder}: the {what} could not be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None


def _shape_key(name: str) -> str:
    # transformers 5 names CLIPTextModel's weights without the `text_model.` prefix that model files carry
    return name.removeprefix("text_model.")


def _require_shapes(folder: Path, what: str, skeleton: torch.nn.Module, files: dict) -> None:
    """Compare the header shapes with a model built from the config on the meta device, before reading any data."""
    expected = {_shape_key(k): tuple(t.shape) for k, t in skeleton.state_dict().items()}
    for file, tensors in files.items():
        for name, (_, shape) in tensors.items():
            want = expected.get(_shape_key(name))
            if want is not None and want != shape:
                raise ModelLoadError(f"{file}: tensor {name} has shape {list(shape)} but the {what} config in {folder} "
                                     f"expects {list(want)}; the weights do not belong to this config")


def _checked_weights(folder: Path, what: str, skeleton) -> dict:
    """A component's weight files, headers checked and shapes compared with its config, before any data is read."""
    files = _weights(folder)
    with _component_errors(folder, what):
        with torch.device("meta"):  # full size, no memory
            model = skeleton(folder)
    _require_shapes(folder, what, model, files)
    return files


def _load_checked(folder: Path, what: str, files: dict, load) -> torch.nn.Module:
    with _component_errors(folder, what):
        model, info = load(folder)
    require_complete(model, what, next(iter(files)) if len(files) == 1 else folder, missing=info.get("missing_keys", ()))
    return model


def load_components(model: str | os.PathLike, *, device: torch.device, dtype: torch.dtype | ComponentDtypes,
                    allow_download: bool = True, allow_pickle: bool = False, config: str | os.PathLike | None = None,
                    prediction_type: PredictionType | None = None) -> Components:
    """`prediction_type` (None = what the model says) replaces the scheduler's; see `ldm.prediction`."""
    if single_file.is_single_file(model):  # one checkpoint file; `config`/`allow_pickle` apply only here
        return single_file.load_single_file(model, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
                                            prediction_type=prediction_type)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = locate(model, allow_download=allow_download)
    sdxl = (root / "text_encoder_2").is_dir()
    refiner = sdxl and not (root / "text_encoder").is_dir()  # an SDXL refiner has only the second (bigG) encoder
    missing = [d for d in COMPONENT_DIRS if not (root / d).is_dir() and not (refiner and d in REFINER_LACKS)]
    if missing:
        raise ModelLoadError(f"{root} is not a diffusers model folder: missing {', '.join(missing)}/")
    for folder in (root, *(root / d for d in (*COMPONENT_DIRS, *SDXL_DIRS, "low_res_scheduler") if (root / d).is_dir())):
        require_regular_files(folder)  # a FIFO named config.json would block open() forever

    dtypes = dtype if isinstance(dtype, ComponentDtypes) else ComponentDtypes.same(dtype)
    loaded = {"output_loading_info": True, "use_safetensors": True}
    models = {  # folder: (name, build from the config, load the weights)
        "text_encoder": ("text encoder", lambda f: CLIPTextModel(CLIPTextConfig.from_pretrained(f)),
                         lambda f: CLIPTextModel.from_pretrained(f, dtype=dtypes.text_encoder, **loaded)),
        "unet": ("U-Net", lambda f: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f)),
                 lambda f: UNet2DConditionModel.from_pretrained(f, torch_dtype=dtypes.unet, **loaded)),
        "vae": ("VAE", lambda f: AutoencoderKL.from_config(AutoencoderKL.load_config(f)),
                lambda f: AutoencoderKL.from_pretrained(f, torch_dtype=dtypes.vae, **loaded)),
    }
    if sdxl:
        dtypes = force_upcast_vae(dtypes, read_json(root / "vae" / "config.json"))
        models.update(sdxl_models(root, dtypes, loaded))
    if refiner:
        del models["text_encoder"]
    files = {d: _checked_weights(root / d, what, skeleton) for d, (what, skeleton, _) in models.items()}
    tokenizers = [t for t in ("tokenizer", *(("tokenizer_2",) if sdxl else ())) if not (refiner and t in REFINER_LACKS)]
    with _component_errors(root / "tokenizer", "tokenizer", (Exception,)):  # the tokenizers library raises bare Exception
        toks = {t: CLIPTokenizer.from_pretrained(root / t) for t in tokenizers}
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type.value
    built = {d: _load_checked(root / d, what, files[d], load) for d, (what, _, load) in models.items()}
    for m in built.values():
        m.to(device).eval().requires_grad_(False)
    unet = built["unet"]

    channels = unet.config.in_channels
    if channels not in KIND_BY_CHANNELS:
        raise ModelLoadError(f"{root}: U-Net with {channels} input channels is not a known kind (4, 7 or 9)")
    name = root.name if Path(model).expanduser().is_dir() else str(model)
    kind = ModelKind.REFINER if refiner else KIND_BY_CHANNELS[channels]
    extras = _upscaler_extras(root) if kind == ModelKind.UPSCALE else {}
    if sdxl:
        extras.update(tokenizer_2=toks["tokenizer_2"], text_encoder_2=built["text_encoder_2"])
    return Components(toks.get("tokenizer"), built.get("text_encoder"), unet, built["vae"], scheduler_config, root,
                      name, kind, **extras)


def sdxl_models(root: Path, dtypes: ComponentDtypes, loaded: dict) -> dict:
    """SDXL's text_encoder_2 (CLIPTextModelWithProjection) as a `models` entry of load_components."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if not (root / "tokenizer_2").is_dir():
        raise ModelLoadError(f"{root} has text_encoder_2/ but no tokenizer_2/ (an SDXL folder has both)")
    return {"text_encoder_2": (
        "second text encoder", lambda f: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(f)),
        lambda f: CLIPTextModelWithProjection.from_pretrained(f, dtype=dtypes.text_encoder, **loaded))}


def _upscaler_extras(root: Path) -> dict:
    """low_res_scheduler/ and model_index.json's max_noise_level of a StableDiffusionUpscalePipeline folder."""
    config = root / "low_res_scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise ModelLoadError(f"{root} has a 7-channel (x4 upscaler) U-Net but no low_res_scheduler/scheduler_config.json")
    index = root / "model_index.json"
    max_noise = read_json(index).get("max_noise_level", 350) if index.exists() else 350  # diffusers' default
    return {"low_res_scheduler_config": read_json(config), "max_noise_level": int(max_noise)}
