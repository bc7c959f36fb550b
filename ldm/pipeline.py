"""`Pipeline`: the tasks users run, all on top of the one denoising loop in `denoise.py`."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from PIL import Image

from . import images as imgs
from .accel import Accel
from .denoise import DenoiseInputs, StepCallback, StepHook, denoise
from .faults import guard_out_of_memory
from .fastpath import FastPreset
from .guidance import uses_cfg
from .latents import decode, encode, generators, seeded_noise, vae_scale_factor
from .loading import Components, ModelKind
from .metadata import format_infotext
from .params import GenerationParams, Limits
from .prompts import PromptEncoder
from .samplers import make_scheduler

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
    """How a task starts the loop: its initial latents, schedule slice, and per-step extras."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    extra_channels: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    after_step: StepHook | None = None


# (scheduler, generators) -> Start; called after set_timesteps, in diffusers' random-draw order.
StartFn = Callable[[object, list[torch.Generator]], Start]


class Pipeline:
    """A loaded model and the tasks it can run. Keeps no per-request state (each call builds its own
    scheduler and generators), but run one call at a time per pipeline: the fp16 VAE NaN retry
    briefly upcasts the shared VAE. Different pipelines may run concurrently."""

    def __init__(self, components: Components, *, max_size: int = 2048, max_batch: int = 16):
        self.components = components
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler_config = components.scheduler_config
        self.kind = components.kind
        self.name = components.name
        self.prompts = PromptEncoder(self.tokenizer, self.text_encoder)
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.limits = Limits(
            size_step=math.lcm(8, self.vae_scale_factor),
            max_size=max_size,
            max_batch=max_batch,
            max_steps=int(self.scheduler_config.get("num_train_timesteps", 1000)),
        )
        self.default_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.accel = Accel(device=self.unet.device)  # ldm.load records the options it applied here
        # Large images (docs/upscaling.md): tiled VAE encode/decode in every task (tile in latent pixels),
        # the x4 upscaler's working-memory budget per tile (None: free GPU memory / a CPU default)
        # and its largest output side.
        self.vae_tiling = False
        self.vae_tile_size = 64
        self.memory_budget_mb: float | None = None
        self.max_upscale_size = 4096

    @property
    def device(self) -> torch.device:
        return self.accel.device  # with offload the U-Net's weights sit on the CPU between uses

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of latents and sampler state: float32 under a bfloat16 U-Net (8-bit mantissas would
        drift over the steps and change what a seed draws), else the U-Net's dtype as in diffusers."""
        return torch.float32 if self.unet.dtype == torch.bfloat16 else self.unet.dtype

    def warmup(self, width: int | None = None, height: int | None = None) -> None:
        """Pay torch.compile / allocator warm-up for this size now instead of on the first request."""
        from .accel import warmup

        warmup(self, width, height)

    @cached_property
    def model_hash(self) -> str:
        """First 10 hex digits of the SHA-256 of the checkpoint file (A1111's short hash, computed once);
        for a diffusers folder, of its U-Net weights."""
        path = self.components.path
        files = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors"))
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()[:10]

    # ---- tasks -------------------------------------------------------------------------------

    def txt2img(self, prompt: str = "", *, callback: StepCallback | None = None, fast: bool = False,
                hires_scale: float | None = None, hires_strength: float = 0.5, hires_upscaler: str = "latent",
                hires_steps: int | None = None, **settings) -> Result:
        """Generate images from text. Settings are `GenerationParams` fields (width, steps, sampler, ...).
        fast=True: the fast preset (ldm.fastpath), ~2x fewer U-Net FLOPs for a slightly different image.
        hires_scale > 1: A1111's hires fix, a second pass at that scale (see `ldm.upscale.hires_fix`)."""
        self._require(ModelKind.BASE, "txt2img")
        p = self._params(prompt, settings, strength=1.0)
        hires = None
        if hires_scale is not None:  # validated now, before the first pass
            from .upscale import plan_hires

            hires = plan_hires(self, p, scale=hires_scale, upscaler=hires_upscaler, strength=hires_strength, steps=hires_steps)

        def start(scheduler, gens):
            shape = (p.batch_size, self.unet.config.in_channels, p.height // self.vae_scale_factor, p.width // self.vae_scale_factor)
            noise = seeded_noise(shape, gens, dtype=self.dtype, device=self.device)
            return Start(noise * scheduler.init_noise_sigma, scheduler.timesteps)

        first = self._run(p, start, callback, fast=fast)
        return first if hires is None else hires.run(self, first, callback)

    def img2img(self, image, prompt: str = "", *, strength: float = 0.75, callback: StepCallback | None = None,
                fast: bool = False, **settings) -> Result:
        """Redraw an image. width/height default to the image's size rounded down to the size step."""
        self._require(ModelKind.BASE, "img2img")
        image = imgs.load_image(image)
        settings = self._size_from_image(image, settings)
        p = self._params(prompt, settings, strength=strength)
        pixels = imgs.pil_to_tensor([image.resize((p.width, p.height), Image.LANCZOS) if image.size != (p.width, p.height) else image])

        def start(scheduler, gens):
            timesteps = self._strength_slice(scheduler, p.steps, p.strength)
            init = encode(self.vae, pixels.repeat(p.batch_size, 1, 1, 1), gens, tile=self._vae_tile())
            noise = seeded_noise(init.shape, gens, dtype=self.dtype, device=self.device)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(p.batch_size))
            return Start(latents, timesteps)

        return self._run(p, start, callback, extra_info={"Denoising strength": p.strength}, fast=fast)

    def inpaint(self, image, mask, prompt: str = "", **kwargs) -> Result:
        """Repaint the masked (white) part of an image; see `ldm.inpaint.inpaint`."""
        from .inpaint import inpaint

        return inpaint(self, image, mask, prompt, **kwargs)

    def outpaint(self, image, prompt: str = "", **kwargs) -> Result:
        """Extend the canvas on chosen sides and paint the new area; see `ldm.inpaint.outpaint`."""
        from .inpaint import outpaint

        return outpaint(self, image, prompt, **kwargs)

    def upscale(self, image, prompt: str = "", **kwargs) -> Result:
        """x4 upscaler models; see `ldm.upscale.upscale`."""
        from .upscale import upscale

        return upscale(self, image, prompt, **kwargs)

    def hires_fix(self, image_or_result, prompt: str = "", **kwargs) -> Result:
        """Upscale (latents or pixels) and redraw at a denoising strength; see `ldm.upscale.hires_fix`."""
        from .upscale import hires_fix

        return hires_fix(self, image_or_result, prompt, **kwargs)

    # ---- shared machinery --------------------------------------------------------------------

    def _vae_tile(self) -> int | None:
        return self.vae_tile_size if self.vae_tiling else None

    def _require(self, kind: ModelKind, task: str) -> None:
        if self.kind != kind:
            raise ValueError(f"{task} needs a {kind.value} model, but {self.name!r} is a {self.kind.value} model")

    def _size_from_image(self, image: Image.Image, settings: dict) -> dict:
        step = self.limits.size_step
        w, h = image.size
        out = dict(settings)
        if out.get("width") is None:
            out["width"] = max(step, w // step * step)
        if out.get("height") is None:
            out["height"] = max(step, h // step * step)
        return out

    def _params(self, prompt: str, settings: dict, **fixed) -> GenerationParams:
        unknown = set(settings) - GenerationParams.field_names()
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in settings.items() if v is not None}
        values.setdefault("width", self.default_size)
        values.setdefault("height", self.default_size)
        return GenerationParams(prompt=prompt, **values, **fixed).validate(self.limits)

    @staticmethod
    def _strength_slice(scheduler, steps: int, strength: float) -> torch.Tensor:
        """The tail of the schedule that img2img runs, cut as diffusers cuts it."""
        run = min(int(steps * strength), steps)
        begin = (steps - run) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        timesteps = scheduler.timesteps[begin:]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise one of them")
        return timesteps

    @guard_out_of_memory  # an OOM anywhere in a task -> ldm.OutOfMemory, with the call's memory released
    def _run(self, p: GenerationParams, start_fn: StartFn, callback: StepCallback | None, extra_info: dict | None = None,
             fast: bool = False) -> Result:
        p = p.with_seed()
        seeds = [p.seed + i for i in range(p.batch_size)]
        gens = generators(seeds)
        with torch.inference_mode():
            cond, uncond = self.prompts.encode_pair(
                p.prompt, p.negative_prompt, clip_skip=p.clip_skip, need_negative=uses_cfg(p.guidance_scale)
            )
            cond = cond.repeat(p.batch_size, 1, 1)
            uncond = uncond.repeat(p.batch_size, 1, 1) if uncond is not None else None
            scheduler = make_scheduler(p.sampler, p.schedule, self.scheduler_config, seeds=seeds)
            scheduler.set_timesteps(p.steps, device=self.device)
            s = start_fn(scheduler, gens)
            latents = denoise(
                self.unet,
                DenoiseInputs(
                    latents=s.latents, timesteps=s.timesteps, scheduler=scheduler, cond=cond, uncond=uncond,
                    guidance_scale=p.guidance_scale, generators=gens, extra_channels=s.extra_channels,
                    class_labels=s.class_labels, after_step=s.after_step, policy=FastPreset() if fast else None,
                ),
                callback,
            )
            pixels = decode(self.vae, latents, tile=self._vae_tile())
        images = imgs.tensor_to_pil(pixels)
        if fast:
            extra_info = {**(extra_info or {}), "Fast": True}
        infotexts = [self.infotext(replace(p, seed=s), extra_info) for s in seeds]
        return Result(images, seeds, infotexts, p, latents)

    def infotext(self, p: GenerationParams, extra: dict | None = None) -> str:
        info = {
            "Steps": p.steps,
            "Sampler": p.sampler,
            "Schedule type": None if p.schedule == "Automatic" else p.schedule,
            "CFG scale": _num(p.guidance_scale),
            "Seed": p.seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model_hash,
            "Model": self.name,
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            **{k: _num(v) for k, v in (extra or {}).items()},
            "Version": VERSION,
        }
        return format_infotext(p.prompt, p.negative_prompt, info)


def _num(v):
    """7.0 -> 7, as A1111 writes whole numbers."""
    return int(v) if isinstance(v, float) and v.is_integer() else v
