"""Optional OpenVINO backend on the CPU (`ldm.load(..., openvino=True)`): the U-Net's and the VAE
decoder's plain calls run through OpenVINO models converted from our own loaded modules with
`openvino.convert_model` (the bare `openvino` wheel; no optimum-intel).

Opt-in, because it costs memory (OpenVINO keeps its own copy of the weights next to PyTorch's) and
a conversion on first use; its output matches PyTorch's within float rounding, not bit for bit
(figures in docs/performance.md).

How it works:
- One IR per module and weights: converted on the first call (dynamic batch, size and prompt length),
  saved uncompressed (float32) in the cache folder under a SHA-256 of the module's weights and config
  and the OpenVINO, torch and diffusers versions. A later load of the same weights reads it back.
- One compiled model per input shape (static shapes run faster than dynamic ones on the CPU plugin):
  the IR is reshaped and compiled on the first call with that shape (seconds), kept for the pipeline's life.
- Calls that OpenVINO would not run identically go through PyTorch, with exactly the numbers the
  PyTorch path gives: extra U-Net inputs (ControlNet residuals, SDXL's added conditioning, class
  labels), per-row timesteps, latents whose sides are not a multiple of the U-Net's downsampling, and
  every call while the module's weights or attention processors are not the ones converted (a LoRA
  merge swaps weights around a run; token merging swaps processors). The fast preset calls U-Net
  blocks directly, so it runs in PyTorch too. The first fallback for each reason is logged.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}  # f32: no silent bf16 on AMX CPUs


class OpenVINONotInstalled(ImportError):
    pass


def require_openvino():
    """The openvino module, or an error that says how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise OpenVINONotInstalled("openvino=True needs the openvino package (a ~60 MB wheel that needs only numpy): "
                                   "pip install openvino") from exc
    return openvino


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldm" / "openvino"


def weights_key(module: torch.nn.Module, config: dict, versions: dict) -> str:
    """SHA-256 over every tensor of the module (names, shapes, dtypes, bytes), its config and the versions
    that shape the conversion: a changed weight, architecture or converter gives another IR."""
    h = hashlib.sha256(json.dumps({"class": type(module).__name__, "config": config, **versions},
                                  sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def _versions(ov) -> dict:
    return {"openvino": ov.get_version(), "torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers")}


# ---- what is converted, per module kind ------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How to call one kind of module with positional tensors, and which calls qualify."""

    name: str
    inputs: Callable  # (module, args, kwargs) -> (list of tensors, None) or (None, reason to use PyTorch)
    traced: Callable  # (module, *tensors) -> tensor: the class's own forward, for convert_model
    output: Callable  # (tensor, args, kwargs) -> what forward returns
    dynamic: Callable  # module -> list of (input name, partial shape with -1 for dynamic dimensions)


_UNET_PLAIN = {"self", "sample", "timestep", "encoder_hidden_states", "return_dict"}


def _unet_inputs(unet, args, kwargs):
    bound = inspect.signature(type(unet).forward).bind(unet, *args, **kwargs).arguments
    extra = sorted(k for k, v in bound.items() if k not in _UNET_PLAIN and v is not None and v != {})
    if extra:
        return None, f"extra U-Net inputs ({', '.join(extra)})"
    sample, embeds = bound["sample"], bound.get("encoder_hidden_states")
    t = torch.as_tensor(bound["timestep"])
    if embeds is None or t.numel() != 1 and not bool((t == t.reshape(-1)[0]).all()):
        return None, "per-row timesteps or no text embeddings"
    factor = 2 ** getattr(unet, "num_upsamplers", 0)
    if sample.shape[-1] % factor or sample.shape[-2] % factor:
        return None, f"latent sides not a multiple of {factor}"
    if sample.dtype != torch.float32 or embeds.dtype != torch.float32:
        return None, "inputs not float32"
    return [sample, t.reshape(-1)[:1].to(torch.float32), embeds], None


def _unet_output(out, args, kwargs):
    if kwargs.get("return_dict", True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
    return (out,)


UNET = Spec(
    name="unet",
    inputs=_unet_inputs,
    traced=lambda unet, sample, t, embeds: type(unet).forward(unet, sample, t, encoder_hidden_states=embeds, return_dict=False)[0],
    output=_unet_output,
    dynamic=lambda unet: [("sample", [-1, unet.config.in_channels, -1, -1]), ("timestep", [1]),
                          ("encoder_hidden_states", [-1, -1, unet.config.cross_attention_dim])],
)


def _decoder_inputs(decoder, args, kwargs):
    bound = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs).arguments
    if bound.get("latent_embeds") is not None:
        return None, "latent embeddings"
    if bound["sample"].dtype != torch.float32:
        return None, "inputs not float32"
    return [bound["sample"]], None


DECODER = Spec(
    name="vae-decoder",
    inputs=_decoder_inputs,
    traced=lambda decoder, sample: type(decoder).forward(decoder, sample),
    output=lambda out, args, kwargs: out,
    dynamic=lambda decoder: [("sample", [-1, decoder.conv_in.in_channels, -1, -1])],
)


# ---- the forward that runs OpenVINO -----------------------------------------------------------------


class _Traced(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, spec: Spec):
        super().__init__()
        self.module, self.spec = module, spec

    def forward(self, *tensors):
        return self.spec.traced(self.module, *tensors)


def _weights(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in module.parameters())


def _processors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    return [(m, m.processor) for m in module.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


class OpenVINOForward:
    """Installed as `module.forward` (see `install`): calls like the module; counts `runs` (OpenVINO) and
    `fallbacks` (PyTorch). The module keeps its weights and sub-modules, so everything that reads or
    changes them (LoRA merges, the fast preset, token merging) still works, through PyTorch."""

    def __init__(self, module: torch.nn.Module, spec: Spec, cache_dir: Path, config: dict | None = None):
        self.module, self.spec, self.cache_dir = module, spec, Path(cache_dir)
        self.config = dict(config if config is not None else getattr(module, "config", None) or {})  # part of the cache key
        self.eager = module.forward  # the class's forward, bound (before this object replaces it)
        self.weights = _weights(module)
        self.processors = _processors(module)
        self.core = None
        self.compiled: dict[tuple, object] = {}  # input shapes -> infer request
        self.ir_path: Path | None = None  # the converted model in the cache, once known
        self.convert_seconds: float | None = None  # None: read from the cache
        self.compile_seconds: dict[tuple, float] = {}
        self.runs = self.fallbacks = 0
        self.reasons: set[str] = set()

    def __call__(self, *args, **kwargs):
        tensors, reason = self.spec.inputs(self.module, args, kwargs)
        if reason is None:
            reason = self._changed()
        if reason is not None:
            self.fallbacks += 1
            if reason not in self.reasons:
                self.reasons.add(reason)
                log.info("OpenVINO %s: %s, this call runs in PyTorch", self.spec.name, reason)
            return self.eager(*args, **kwargs)
        request = self._request(tensors)
        result = request.infer([t.detach().contiguous().numpy() for t in tensors])
        self.runs += 1
        out = torch.from_numpy(result[0])
        return self.spec.output(out, args, kwargs)

    def _changed(self) -> str | None:
        if _weights(self.module) != self.weights:
            return "weights differ from the converted ones (a LoRA merge?)"
        if any(m.processor is not p for m, p in self.processors):
            return "attention processors changed (token merging?)"
        return None

    def _request(self, tensors: list[torch.Tensor]):
        shapes = tuple(tuple(t.shape) for t in tensors)
        request = self.compiled.get(shapes)
        if request is None:
            ov = require_openvino()
            self.core = self.core or ov.Core()
            model = self.core.read_model(self._ir_path(ov, tensors))  # mapped from the file, dropped after compiling
            model.reshape({i: list(shape) for i, shape in enumerate(shapes)})  # inputs in the order of `dynamic`
            start = time.perf_counter()
            compiled = self.core.compile_model(model, "CPU", {**CPU_CONFIG, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            self.compile_seconds[shapes] = time.perf_counter() - start
            log.info("OpenVINO %s compiled for %s in %.1f s", self.spec.name, shapes, self.compile_seconds[shapes])
            request = self.compiled[shapes] = compiled.create_infer_request()
        return request

    def _ir_path(self, ov, example: list[torch.Tensor]) -> Path:
        """The IR file for these weights: found in the cache, or converted (`example` is the trace input) and saved."""
        if self.ir_path is None:
            key = weights_key(self.module, self.config, _versions(ov))
            path = self.cache_dir / f"{self.spec.name}-{key}.xml"
            if not path.exists():
                self._convert(ov, example, path)
            self.ir_path = path
        return self.ir_path

    def _convert(self, ov, example: list[torch.Tensor], path: Path) -> None:
        start = time.perf_counter()
        inputs = [(shape, ov.Type.f32) for _, shape in self.spec.dynamic(self.module)]
        with torch.no_grad():
            model = ov.convert_model(_Traced(self.module, self.spec), example_input=tuple(example), input=inputs)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.xml")
        ov.save_model(model, tmp, compress_to_fp16=False)  # fp16 weights would change the pixels
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # the .xml last: it marks a complete IR
        os.replace(tmp, path)
        self.convert_seconds = time.perf_counter() - start
        log.info("OpenVINO %s converted in %.1f s to %s", self.spec.name, self.convert_seconds, path)


def install(unet: torch.nn.Module, vae, cache_dir: str | os.PathLike | None = None, *, decoder: bool = True) -> None:
    """Route the U-Net's (and the VAE decoder's) plain calls through OpenVINO. Nothing is converted or
    compiled until the first call (`Pipeline.warmup` pays it at start-up)."""
    require_openvino()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    targets = [(unet, UNET, None)]
    if decoder and hasattr(vae, "decoder"):
        targets.append((vae.decoder, DECODER, dict(vae.config)))
    for module, spec, config in targets:
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"openvino=True runs float32 weights; the {spec.name} is {dtype}: load with dtype='float32'")
        module.forward = OpenVINOForward(module, spec, cache, config)
