"""The engine every task runs on: a loaded `Model`, the task start contract and `run`.

A task (ldm/tasks/) validates its inputs with `params_for`, then calls

    run(model, params, start, callback, extensions, extra_info)

`run` picks the seeds (`seed + i`, one CPU generator per image), lets the model family turn the
prompts into conditioning, builds a fresh scheduler, calls `start(scheduler, generators)` (where
the task draws its random numbers, in the matching diffusers pipeline's order, and returns its
initial latents, the timesteps to run and its own loop extensions), runs the one denoising loop
(`ldm.denoise`) and decodes. Tasks never copy the loop and never reach into each other.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import images as imgs
from .accel import Accel
from .components import Components, ModelKind
from .conditioning import check_prompt_plan, plan_for
from .denoise import DenoiseInputs, Extension, StepCallback, denoise
from .devices import weights_dtype
from .embeddings import EmbeddingFiles
from .faults import guard_out_of_memory
from .family import ModelFamily, family_for
from .latents import decode, generators, vae_scale_factor
from .library import Library
from .lora import Networks
from .metadata import format_infotext
from .options import Options
from .params import GenerationParams, Limits
from .prompt_tags import extract_loras
from .samplers import make_scheduler
from .weights_hash import WeightsHash, hasher

VERSION = "ldm 0.1.0"


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    params: GenerationParams
    latents: torch.Tensor | None = field(default=None, repr=False)  # final latents, for a hires-fix pass


@dataclass
class Start:
    """How a task starts the loop: initial latents, the timesteps to run, and its loop extensions."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    extensions: Sequence[Extension] = ()


# (scheduler, generators) -> Start; called after set_timesteps, in diffusers' random-draw order.
StartFn = Callable[[object, list[torch.Generator]], Start]


class Model:
    """A loaded model: its components, family and options. Keeps no per-request state (each run builds
    its own scheduler and generators), but run one call at a time per model: the fp16 VAE NaN retry
    briefly upcasts the shared VAE. Different models may run concurrently."""

    def __init__(self, components: Components, options: Options | None = None, accel: Accel | None = None,
                 family: ModelFamily | None = None, library: Library | None = None):
        self.components = components
        self.library = library  # the models folder LoRA tags and embeddings are looked up in (None: no folder)
        self.networks = Networks(components, library)  # <lora:...> tags: merged around a run, restored after
        self.options = (options or Options()).validate()
        self.accel = accel or Accel(device=components.unet.device)  # what ldm.load applied
        self.family = family or family_for(components, EmbeddingFiles(library) if library is not None else None)
        self.vae_scale_factor = vae_scale_factor(components.vae)
        self.limits = Limits(
            size_step=math.lcm(8, self.vae_scale_factor),
            max_size=self.options.max_size,
            max_batch=self.options.max_batch,
            max_steps=int(components.scheduler_config.get("num_train_timesteps", 1000)),
            max_clip_skip=self.family.max_clip_skip,
            max_prompt_tokens=self.options.max_prompt_tokens,
        )

    # The components, by name.
    tokenizer = property(lambda self: self.components.tokenizer)
    text_encoder = property(lambda self: self.components.text_encoder)
    unet = property(lambda self: self.components.unet)
    vae = property(lambda self: self.components.vae)
    scheduler_config = property(lambda self: self.components.scheduler_config)
    kind = property(lambda self: self.components.kind)
    name = property(lambda self: self.components.name)
    max_noise_level = property(lambda self: self.components.max_noise_level)  # x4 upscalers only
    prompts = property(lambda self: self.family.prompts)
    default_size = property(lambda self: self.family.default_size)

    @property
    def device(self) -> torch.device:
        return self.accel.device  # with offload the U-Net's weights sit on the CPU between uses

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of latents and sampler state: float32 under a bfloat16 U-Net (8-bit mantissas would
        drift over the steps and change what a seed draws), else the U-Net's dtype as in diffusers."""
        unet = weights_dtype(self.unet)  # not unet.dtype: diffusers walks every sub-module for it (~20 ms a call)
        return torch.float32 if unet == torch.bfloat16 else unet

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the SHA-256 of the checkpoint file (A1111's short hash); for a diffusers
        folder, of its U-Net weights. Computed once per loaded weights (waits for `start_hashing`'s
        computation if that is running); through the models folder's hash cache when the model is in it."""
        return self.components.weights_hash.value(hasher(self.components.path, self.library))

    def start_hashing(self) -> WeightsHash:
        """Compute `model_hash` on a daemon thread now, so no request waits for a multi-GB read unless
        its infotext is ready before the hash is. Returns the hash's handle (`.known`: the hash once
        computed), which, like the thread, holds no model: dropping the model frees it meanwhile."""
        self.components.weights_hash.start(hasher(self.components.path, self.library))
        return self.components.weights_hash

    def infotext(self, p: GenerationParams, extra: dict | None = None) -> str:
        """A1111's `parameters` text for one image made with `p`."""
        info = {
            "Steps": p.steps,
            "Sampler": p.sampler,
            "Schedule type": None if p.schedule == "Automatic" else p.schedule,
            "CFG scale": _num(p.guidance_scale),
            "Seed": p.seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model_hash,
            "Model": self.name,
            "VAE hash": self.components.vae_hash,
            "VAE": self.components.vae_name,
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            **{k: _num(v) for k, v in (extra or {}).items()},
            "Version": VERSION,
        }
        return format_infotext(p.prompt, p.negative_prompt, info)


def _num(v):
    """7.0 -> 7, as A1111 writes whole numbers."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# ---- what tasks call before any model work ---------------------------------------------------------


def require(model: Model, kinds: ModelKind | Sequence[ModelKind], task: str) -> None:
    """Refuse a task the model's kind cannot run (e.g. txt2img on an x4 upscaler)."""
    allowed = (kinds,) if isinstance(kinds, ModelKind) else tuple(kinds)
    if model.kind not in allowed:
        names = " or ".join(k.value for k in allowed)
        raise ValueError(f"{task} needs a {names} model, but {model.name!r} is a {model.kind.value} model")


def size_from_image(model: Model, image: Image.Image, settings: dict) -> dict:
    """`settings` with width/height defaulting to the image's size rounded down to the size step."""
    step = model.limits.size_step
    out = dict(settings)
    for name, side in (("width", image.width), ("height", image.height)):
        if out.get(name) is None:
            out[name] = max(step, side // step * step)
    return out


def params_for(model: Model, prompt: str, settings: dict, *, limits: Limits | None = None, **fixed) -> GenerationParams:
    """Validated parameters from a task's keyword settings (None = default), before any model work."""
    unknown = set(settings) - GenerationParams.field_names()
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in settings.items() if v is not None}
    values.setdefault("width", model.default_size)
    values.setdefault("height", model.default_size)
    p = GenerationParams(prompt=prompt, **values, **fixed).validate(limits or model.limits, model.family.token_count)
    loras = extract_loras(p.prompt)[1]  # malformed tags, unknown LoRA names: now, not mid-task
    if loras and model.accel.offload == "sequential":  # accelerate keeps its own copy of each weight
        raise ValueError("LoRA tags do not work with offload='sequential'; load with offload='model' or 'none'")
    model.networks.resolve(loras)
    check_prompt_plan(replace(p, prompt=extract_loras(p.prompt)[0]), model.limits.max_prompt_tokens,
                      model.family.token_count)
    return p


def strength_slice(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that img2img-style tasks run, cut as diffusers cuts it."""
    run_steps = min(int(steps * strength), steps)
    begin = (steps - run_steps) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise one of them")
    return timesteps


# ---- the run ----------------------------------------------------------------------------------------


@guard_out_of_memory  # an OOM anywhere in a task -> ldm.OutOfMemory, with the call's memory released
def run(model: Model, p: GenerationParams, start: StartFn, callback: StepCallback | None = None,
        extensions: Sequence[Extension] = (), extra_info: dict | None = None,
        first_pass_steps: int | None = None) -> Result:
    """Generate with validated `p`: conditioning, `start`, the loop with the family's, the caller's and the
    start's extensions (in that order), decode. Returns images, seeds, infotexts and the final latents.
    `first_pass_steps`: this is a hires-fix second pass, whose prompt schedule continues the first pass's."""
    p = p.with_seed()
    seeds = [p.seed + i for i in range(p.batch_size)]
    gens = generators(seeds)
    text, loras = extract_loras(p.prompt)  # the tags are not encoded; the infotext keeps them, as A1111's
    with model.networks.applied(loras) as applied, torch.inference_mode():
        encoded = replace(p, prompt=text)
        conditioning = model.family.encode(encoded, plan_for(encoded, first_pass_steps))
        scheduler = make_scheduler(p.sampler, p.schedule, model.scheduler_config, seeds=seeds)
        scheduler.set_timesteps(p.steps, device=model.device)
        s = start(scheduler, gens)
        exts = [*conditioning.extensions, *extensions, *s.extensions]
        inputs = DenoiseInputs(latents=s.latents, timesteps=s.timesteps, scheduler=scheduler, cond=conditioning.cond,
                               uncond=conditioning.uncond, guidance_scale=p.guidance_scale, generators=gens,
                               extensions=exts, cond_weights=conditioning.weights)
        latents = denoise(model.unet, inputs, callback)
        pixels = decode(model.vae, latents, tile=model.options.vae_tile)
    images = imgs.tensor_to_pil(pixels)
    info = {**(extra_info or {})}
    for ext in exts:
        info.update(ext.infotext())
    info.update(applied.infotext(model.library))
    infotexts = [model.infotext(replace(p, seed=s), info) for s in seeds]
    return Result(images, seeds, infotexts, p, latents)
