"""A1111 request fields -> one ldm call per batch, checked before any model work.

`plan_txt2img` / `plan_img2img` turn a request into a `Plan`: which pipeline, how many batches, the
first seed, and `call(seed, callback)` that runs one batch through the pipeline's public task
(`pipe.txt2img`, `pipe.img2img`, `pipe.inpaint`). Sampler and schedule names are ldm's (A1111's
lower-case scheduler names are matched to them), the limits are the pipeline's `limits`; anything
wrong raises ValueError with a readable message (the routes answer 422), an image over the upload
limit raises `TooLarge` (413).
"""
from __future__ import annotations

import base64
import binascii
import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

import ldm
from ldm import metadata, samplers
from ldm.extensions.refiner import check_base
from ldm.images import load_image
from ldm.masks import MaskedContent
from ldm.params import MAX_SEED, GenerationParams

from ..backend import Call
from ..models import NO_REFINER
from ..state import Context
from ..streaming import StepCallback
from . import controlnet
from .models import GenerationRequest, Img2ImgRequest, Txt2ImgRequest

MAX_N_ITER = 100
# A1111's inpainting_fill codes -> ldm's masked-content start.
INPAINTING_FILL = {0: MaskedContent.FILL, 1: MaskedContent.ORIGINAL, 2: MaskedContent.LATENT_NOISE,
                   3: MaskedContent.LATENT_NOTHING}
# Fields that A1111 reads but this server does not act on: a note in `info` when they are set.
IGNORED = {"subseed_strength": "variation seeds (subseed) are not supported", "restore_faces": "face restoration is not available",
           "tiling": "tiling is not supported", "styles": "saved styles are not supported",
           "script_name": "scripts are not supported"}


class TooLarge(ValueError):
    """An image field over --max-upload-mb (answered 413)."""


@dataclass
class Plan:
    task: str  # txt2img, img2img, inpaint (the outputs subfolder)
    pipe: Any
    call: Callable[[int, StepCallback], Any]  # (first seed of the batch, callback) -> ldm.Result
    prompt: str
    seed: int  # the first batch's first seed (concrete)
    batch_size: int
    n_iter: int
    save: bool
    send_images: bool
    params: GenerationParams  # the validated first-pass settings, for `info`
    notes: list[str] = field(default_factory=list)
    user: str | None = None  # the HTTP Basic user: with per-user outputs, whose folder gets the images


# ---- images ------------------------------------------------------------------------------------


def decode_image(ctx: Context, text: Any, what: str = "image", mode: str | None = "RGB") -> Image.Image:
    """base64 or a data: URL -> an image; URLs are refused (the server fetches nothing)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be a base64-encoded image (or a data: URL)")
    text = text.strip()
    if text.lower().startswith(("http:", "https:", "ftp:", "file:", "//")):
        raise ValueError(f"{what} is a URL: this server does not fetch images; send the image itself, base64-encoded")
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{what} is a data: URL without ;base64 data")
    limit = ctx.options.max_upload_bytes
    if len(text) * 3 // 4 > limit + 3:
        raise TooLarge(f"{what} is about {len(text) * 3 // 4 / 1048576:.1f} MB; the limit is {limit / 1048576:g} MB")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    return load_image(data, max_bytes=limit, mode=mode)


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """An image as base64 PNG carrying its `parameters` infotext."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=metadata.png_info(infotext) if infotext else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- names -------------------------------------------------------------------------------------


def schedule_name(name: str | None) -> str:
    """A1111's scheduler name ("automatic", "karras", "sgm_uniform") or ours -> ours."""
    if not name:
        return samplers.DEFAULT_SCHEDULE
    key = name.strip().lower().replace("_", " ")
    for ours in samplers.schedule_names():
        if ours.lower() == key:
            return ours
    raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(samplers.schedule_names())}")


def hires_upscaler(name: str | None) -> str:
    """A1111's hires upscaler name ("Latent", "Lanczos") -> ldm's key in ldm.HIRES_UPSCALERS."""
    if not name:
        return next(iter(ldm.HIRES_UPSCALERS))
    for key, label in ldm.HIRES_UPSCALERS.items():
        if name.strip().lower() in (key.lower(), label.lower()):
            return key
    raise ValueError(f"unknown hr_upscaler {name!r}; choose one of: {', '.join(ldm.HIRES_UPSCALERS.values())}")


def resampler(name: str | None) -> str:
    """An /upscalers name ("None", "Lanczos", ...) -> ldm's resampler key; "None" resizes with Lanczos as A1111 does."""
    key = (name or "None").strip().lower()
    if key == "none":
        return "lanczos" if "lanczos" in ldm.RESAMPLERS else next(iter(ldm.RESAMPLERS))
    if key not in ldm.RESAMPLERS:
        raise ValueError(f"unknown upscaler {name!r}; choose one of: None, {', '.join(k.capitalize() for k in ldm.RESAMPLERS)}")
    return key


def check_checkpoint(ctx: Context, name: Any) -> None:
    """A request's override_settings may name only the serving checkpoint (by title, name or hash); another one
    is switched to with POST /sdapi/v1/options."""
    if name in (None, ""):
        return
    m = ctx.models
    if m.resolve(str(name)) != m.checkpoint:
        raise ValueError(f"checkpoint {str(name).strip()!r} is not loaded (serving {m.title(m.checkpoint)!r}); switch "
                         f"checkpoints with POST /sdapi/v1/options {{\"sd_model_checkpoint\": ...}} first")


# ---- requests ----------------------------------------------------------------------------------


def _common(ctx: Context, req: GenerationRequest, defaults: dict[str, Any], pipe: Any, strength: float, size) -> tuple[dict, GenerationParams, list[str]]:
    """Sampler settings in ldm's names, validated with the pipeline's limits before any model work."""
    overrides = req.override_settings or {}
    check_checkpoint(ctx, overrides.get("sd_model_checkpoint"))
    clip_skip = overrides.get("CLIP_stop_at_last_layers", defaults.get("CLIP_stop_at_last_layers", 1))
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool):
        raise ValueError(f"CLIP_stop_at_last_layers must be a whole number, got {clip_skip!r}")
    if not 1 <= req.n_iter <= MAX_N_ITER:
        raise ValueError(f"n_iter must be from 1 to {MAX_N_ITER}, got {req.n_iter}")
    sampler, schedule = samplers.resolve(req.sampler_name or req.sampler_index or samplers.DEFAULT_SAMPLER,
                                         schedule_name(req.scheduler))
    width, height = req.width or size[0], req.height or size[1]
    seed = req.seed
    if seed == -1:
        seed = random.randint(0, max(0, MAX_SEED - req.batch_size * req.n_iter + 1))
    params = GenerationParams(prompt=req.prompt, negative_prompt=req.negative_prompt or "", width=width, height=height,
                              steps=req.steps, guidance_scale=req.cfg_scale, sampler=sampler, schedule=schedule,
                              seed=seed, batch_size=req.batch_size, clip_skip=clip_skip, strength=strength)
    params = params.validate(pipe.limits, pipe.family.token_count)
    if seed + req.batch_size * req.n_iter - 1 > MAX_SEED:
        raise ValueError(f"seed {seed} + {req.batch_size * req.n_iter} images passes {MAX_SEED}")
    notes = [why for name, why in IGNORED.items() if getattr(req, name, None)]
    if req.subseed not in (-1, None) and req.subseed_strength:
        notes.append("subseed ignored")
    settings = {"negative_prompt": params.negative_prompt, "steps": params.steps, "guidance_scale": params.guidance_scale,
                "sampler": params.sampler, "schedule": params.schedule, "batch_size": params.batch_size,
                "clip_skip": params.clip_skip}
    return settings, params, notes


def with_controlnet(ctx: Context, pipe: Any, req: GenerationRequest, settings: dict, notes: list[str],
                    cache: controlnet.ControlNets | None, init_image: Image.Image | None = None) -> None:
    """`alwayson_scripts.controlnet` units -> settings["control"] (validated, then their ControlNets loaded)."""
    units, more = controlnet.parse_units(ctx, pipe, req.alwayson_scripts, lambda text, what: decode_image(ctx, text, what),
                                         init_image=init_image, cache=cache)
    if units:
        settings["control"] = units
    notes.extend(more)


def plan_txt2img(ctx: Context, req: Txt2ImgRequest, defaults: dict[str, Any], *, save: bool | None = None,
                 controlnets: controlnet.ControlNets | None = None) -> Plan:
    pipe = ctx.pipes.base
    settings, params, notes = _common(ctx, req, defaults, pipe, 1.0, (pipe.default_size, pipe.default_size))
    settings.update(width=params.width, height=params.height)
    if req.enable_hr:
        if req.hr_resize_x or req.hr_resize_y:
            raise ValueError("hr_resize_x/hr_resize_y are not supported: give hr_scale")
        strength = 0.7 if req.denoising_strength is None else req.denoising_strength
        settings.update(hires_scale=float(req.hr_scale), hires_strength=float(strength),
                        hires_upscaler=hires_upscaler(req.hr_upscaler), hires_steps=req.hr_second_pass_steps or None)
        if req.hr_prompt or req.hr_negative_prompt or req.hr_sampler_name:
            notes.append("hr_prompt, hr_negative_prompt and hr_sampler_name are ignored: the second pass uses the first's")
    with_controlnet(ctx, pipe, req, settings, notes, controlnets)
    if req.refiner_checkpoint and req.refiner_checkpoint != NO_REFINER:  # refused what ldm refuses, before it loads
        switch_at = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
        check_base(pipe, switch_at, hires=req.enable_hr, control="control" in settings)
        settings.update(refiner=ctx.models.refiner(req.refiner_checkpoint), refiner_switch_at=switch_at)
    prompt = params.prompt

    def call(seed: int, callback: StepCallback):
        return ctx.backend.run(pipe, Call("txt2img", (prompt,), {"seed": seed, **settings}), callback)

    return Plan("txt2img", pipe, call, prompt, params.seed, params.batch_size, req.n_iter,
                req.save_images if save is None else save, req.send_images, params, notes)


def plan_img2img(ctx: Context, req: Img2ImgRequest, defaults: dict[str, Any], *, save: bool | None = None,
                 controlnets: controlnet.ControlNets | None = None) -> Plan:
    if not req.init_images:
        raise ValueError("init_images is empty: send one base64-encoded image")
    if req.resize_mode != 0:
        raise ValueError(f"resize_mode {req.resize_mode} is not supported; use 0 (just resize)")
    if req.inpainting_fill not in INPAINTING_FILL:
        raise ValueError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                         f"got {req.inpainting_fill}")
    image = decode_image(ctx, req.init_images[0], "init_images[0]")
    mask = decode_image(ctx, req.mask, "mask", mode=None) if req.mask else None
    pipe = (ctx.pipes.inpaint or ctx.pipes.base) if mask is not None else ctx.pipes.base
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    step = pipe.limits.size_step
    size = (max(step, image.width // step * step), max(step, image.height // step * step))
    settings, params, notes = _common(ctx, req, defaults, pipe, strength, size)
    settings.update(width=params.width, height=params.height, strength=params.strength)
    if len(req.init_images) > 1:
        notes.append("only the first of init_images is used")
    with_controlnet(ctx, pipe, req, settings, notes, controlnets, init_image=image)
    prompt = params.prompt
    if mask is None:
        def call(seed: int, callback: StepCallback):
            return ctx.backend.run(pipe, Call("img2img", (image, prompt), {"seed": seed, **settings}), callback)
        task = "img2img"
    else:
        blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x or 0, req.mask_blur_y or 0)
        settings.update(mask_blur=blur, inpaint_area="masked" if req.inpaint_full_res else "whole",
                        padding=req.inpaint_full_res_padding, masked_content=INPAINTING_FILL[req.inpainting_fill],
                        invert_mask=bool(req.inpainting_mask_invert))

        def call(seed: int, callback: StepCallback):
            return ctx.backend.run(pipe, Call("inpaint", (image, mask, prompt), {"seed": seed, **settings}), callback)
        task = "inpaint"
    return Plan(task, pipe, call, prompt, params.seed, params.batch_size, req.n_iter,
                req.save_images if save is None else save, req.send_images, params, notes)


def parameters(req: GenerationRequest) -> dict[str, Any]:
    """The request as A1111 echoes it back (without the input images unless include_init_images)."""
    out = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        out["init_images"] = None
        out["mask"] = None
    return out


def info(plan: Plan, seeds: list[int], infotexts: list[str], pipe: Any) -> dict[str, Any]:
    """A1111's `info` object (sent as JSON text)."""
    p = plan.params
    first = seeds[0] if seeds else plan.seed
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * len(seeds), "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * len(seeds), "seed": first, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": p.width, "height": p.height,
        "sampler_name": p.sampler, "scheduler": p.schedule, "cfg_scale": p.guidance_scale, "steps": p.steps,
        "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": p.strength if plan.task != "txt2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": "", "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": False,
        "version": ldm.VERSION, "notes": plan.notes,
    }
