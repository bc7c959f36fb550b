"""Inpainting and outpainting: pre/post-processing around the engine's `run` (never a copy of the loop).

Two kinds of model are supported, as diffusers' `StableDiffusionInpaintPipeline` supports them:

* inpainting models (9-channel U-Net): the U-Net sees the latents plus the latent-size mask and the
  latents of the image with the masked area blanked (the `UNetInputs` extension);
* regular models (4-channel U-Net): after every step the known area is replaced by the original
  latents noised to the next timestep (the `KnownAreaBlend` extension).

Around that sits what A1111 adds: mask blur, paste-back of the generated pixels over the untouched
original, "only masked" crops generated at full resolution, and the masked-content start modes.

Conventions: masks are "L" images, 255 = repaint. Regions are (x0, y0, x1, y1), exclusive ends.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops

from .. import images as imgs
from ..components import ModelKind
from ..controlnet import with_control
from ..denoise import Extension, StepCallback
from ..engine import Model, Result, Start, StartFn, params_for, run, size_from_image, strength_slice
from ..extensions import KnownAreaBlend, UNetInputs
from ..fill import fill_masked
from ..latents import encode, seeded_noise
from ..masks import (
    InpaintArea,
    MaskedContent,
    Region,
    blur_mask,
    check_mask_blur,
    crop_region,
    expand_to_aspect,
    normalize_mask,
    pad_for_outpaint,
    paste_back,
)
from ..params import INPAINT_PADDING, GenerationParams, check_int

# A1111's infotext labels for the start modes ("original" is its default and is not written).
_CONTENT_LABELS = {
    MaskedContent.FILL: "fill",
    MaskedContent.LATENT_NOISE: "latent noise",
    MaskedContent.LATENT_NOTHING: "latent nothing",
}


@dataclass(frozen=True)
class _Job:
    """Everything prepared from the user's inputs before any model work."""

    original: Image.Image  # the input image (RGB), what the result is pasted over
    overlay: Image.Image  # "L", original size: paste-back alpha
    region: Region  # the part of `original` that was generated (whole image, or the crop)
    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1]: what the model starts from, at the generation size
    mask: torch.Tensor  # [1, 1, H, W], exactly 0 or 1 (1 = repaint), as diffusers binarises it
    latent_mask: torch.Tensor  # [1, 1, h, w]: `mask` at latent size, nearest (diffusers' interpolate)


# ---- public tasks -----------------------------------------------------------------------------


def inpaint(
    model: Model,
    image,
    mask,
    prompt: str = "",
    *,
    strength: float = 1.0,
    mask_blur: float = 4,
    inpaint_area: str | InpaintArea = "whole",
    padding: int = 32,
    masked_content: str | MaskedContent = "original",
    invert_mask: bool = False,
    callback: StepCallback | None = None,
    extensions: Sequence[Extension] = (),
    control=(),
    **settings,
) -> Result:
    """Repaint the white part of `mask` in `image`; the result always has the image's size.

    width/height default to the image size rounded down to the model's size step (images of any
    size are accepted); with inpaint_area="masked" they are the size the crop is generated at.
    Other settings are `GenerationParams` fields (steps, sampler, seed, batch_size, ...). `control`:
    `ldm.ControlUnit`s, their images fitted to the image (and cropped like it for inpaint_area="masked").
    """
    return _inpaint(
        model, image, mask, prompt, strength=strength, mask_blur=mask_blur, inpaint_area=inpaint_area,
        padding=padding, masked_content=masked_content, invert_mask=invert_mask, callback=callback,
        extensions=extensions, settings=settings, protect_original=False, extra_info={}, control=control,
    )


def outpaint(
    model: Model,
    image,
    prompt: str = "",
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    strength: float = 1.0,
    mask_blur: float = 4,
    inpaint_area: str | InpaintArea = "whole",
    padding: int = 32,
    masked_content: str | MaskedContent = "original",
    callback: StepCallback | None = None,
    extensions: Sequence[Extension] = (),
    control=(),
    **settings,
) -> Result:
    """Extend the canvas by the given pixels per side and paint the new area.

    The result is (w + left + right) x (h + top + bottom); the original pixels are kept exactly
    (the blur only feathers inside the new area). Other arguments are as for `inpaint`.
    """
    _check_model(model, "outpainting")
    image = imgs.load_image(image)
    canvas, mask = pad_for_outpaint(image, left, right, top, bottom)
    sides = " ".join(f"{name} {n}" for name, n in (("left", left), ("right", right), ("top", top), ("bottom", bottom)) if n)
    return _inpaint(
        model, canvas, mask, prompt, strength=strength, mask_blur=mask_blur, inpaint_area=inpaint_area,
        padding=padding, masked_content=masked_content, invert_mask=False, callback=callback,
        extensions=extensions, settings=settings, protect_original=True, extra_info={"Outpaint": sides},
        control=control,
    )


# ---- the shared path --------------------------------------------------------------------------


def _inpaint(model: Model, image, mask, prompt: str, *, strength, mask_blur, inpaint_area, padding,
             masked_content, invert_mask, callback, extensions, settings: dict, protect_original: bool,
             extra_info: dict, control=()) -> Result:
    # Everything is checked and prepared here, before the first model call.
    _check_model(model, "inpainting")
    area = _choice(InpaintArea, inpaint_area, "inpaint_area")
    content = _choice(MaskedContent, masked_content, "masked_content")
    check_mask_blur(mask_blur)
    check_int("padding", padding, INPAINT_PADDING, " (pixels around the mask, inpaint_area='masked')")
    if not isinstance(invert_mask, bool):
        raise ValueError(f"invert_mask must be True or False, got {invert_mask!r}")

    image = imgs.load_image(image)
    if isinstance(mask, (str, os.PathLike)):
        mask = imgs.load_image(mask, mode=None)  # keep alpha: it may carry the mask
    mask = normalize_mask(mask, image.size, invert=invert_mask)
    p = params_for(model, prompt, _default_size(model, image, settings), strength=strength)
    job = _prepare(model, image, mask, p, mask_blur=mask_blur, area=area, padding=padding, content=content,
                   protect_original=protect_original)
    crop = job.region if area is InpaintArea.MASKED else None  # only-masked crops the control image like the image
    p, extensions = with_control(model, p, control, extensions, canvas=image.size, region=crop)

    info = {"Denoising strength": p.strength, "Mask blur": mask_blur}
    if invert_mask:
        info["Mask mode"] = "Inpaint not masked"
    if content in _CONTENT_LABELS:
        info["Masked content"] = _CONTENT_LABELS[content]
    if area is InpaintArea.MASKED:
        info.update({"Inpaint area": "Only masked", "Masked area padding": padding})
    result = run(model, p, _start_fn(model, p, job, content), callback, extensions, extra_info={**info, **extra_info})
    pasted = [paste_back(job.original, generated, job.overlay, job.region) for generated in result.images]
    return replace(result, images=pasted)


def _check_model(model: Model, task: str) -> None:
    if model.kind not in (ModelKind.BASE, ModelKind.INPAINT):
        raise ValueError(
            f"{task} needs a regular (4-channel) or inpainting (9-channel) model; "
            f"{model.name!r} is a {model.kind.value} model"
        )


def _choice(enum: type, value: Any, name: str):
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}") from None


def _default_size(model: Model, image: Image.Image, settings: dict) -> dict:
    """width/height default to the image size rounded down to the size step (never 0)."""
    out = size_from_image(model, image, settings)
    too_big = [n for n in ("width", "height") if settings.get(n) is None and out[n] > model.limits.max_size]
    if too_big:
        raise ValueError(
            f"the image is {image.width}x{image.height}, and by default it is generated at that size, which is "
            f"over this pipeline's limit of {model.limits.max_size} px a side: pass width and height "
            "(with inpaint_area='masked' they are the size of the crop)"
        )
    return out


# ---- preprocessing ------------------------------------------------------------------------------


def _prepare(model: Model, image: Image.Image, mask: Image.Image, p: GenerationParams, *, mask_blur,
             area: InpaintArea, padding: int, content: MaskedContent, protect_original: bool) -> _Job:
    blurred = blur_mask(mask, mask_blur)
    # Doubling the blurred mask (as A1111 does for the whole picture) puts the feather outside the
    # painted area: what the user painted is fully repainted, the transition lies in kept pixels.
    overlay = blurred.point(lambda v: min(255, 2 * v))
    if protect_original:  # outpainting: never touch the original pixels, feather only in the new area
        overlay = ImageChops.darker(overlay, mask)

    size = (p.width, p.height)
    region: Region = (0, 0, image.width, image.height)
    if area is InpaintArea.MASKED:
        region = expand_to_aspect(crop_region(blurred, padding), p.width, p.height, image.width, image.height)
    gen_image = _fit(image.crop(region), size)
    # The model's mask is the blurred mask thresholded at 50%: for mask_blur=0 exactly diffusers' mask.
    gen_mask = _fit(blurred.crop(region), size).point(lambda v: 255 if v >= 128 else 0)
    if content is not MaskedContent.ORIGINAL:
        gen_image = fill_masked(gen_image, gen_mask)  # A1111 fills for every mode but "original"

    mask_t = torch.from_numpy(np.asarray(gen_mask) >= 128).float()[None, None]  # exactly 0.0 / 1.0
    f = model.vae_scale_factor
    latent_mask = F.interpolate(mask_t, size=(p.height // f, p.width // f))  # nearest, as diffusers
    if latent_mask.max() == 0:
        raise ValueError(
            "the mask is too small to repaint: the model repaints whole "
            f"{f}x{f}-pixel cells (at the generation size), and after a {mask_blur}-pixel blur the mask "
            "covers none; paint a larger area, lower mask_blur, or use inpaint_area='masked'"
        )
    return _Job(image, overlay, region, imgs.pil_to_tensor(gen_image), mask_t, latent_mask)


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


# ---- the start of the loop -------------------------------------------------------------------------


def _start_fn(model: Model, p: GenerationParams, job: _Job, content: MaskedContent) -> StartFn:
    """Initial latents and per-step extras, drawing random numbers in diffusers' order."""
    b, device, dtype, vae = p.batch_size, model.device, model.dtype, model.vae
    inpaint_model = model.kind is ModelKind.INPAINT
    latent_shape = (b, vae.config.latent_channels, *job.latent_mask.shape[2:])
    mask = job.latent_mask.to(device=device, dtype=dtype).repeat(b, 1, 1, 1)

    def start(scheduler, gens: list[torch.Generator]) -> Start:
        timesteps = strength_slice(scheduler, p.steps, p.strength)
        pure_noise = p.strength == 1.0  # diffusers' is_strength_max: start from noise alone
        # Each image draws from its own generator in the order diffusers' pipeline draws from its
        # one generator at batch size 1 (image latents, noise, masked-image latents), so image i of
        # a batch is exactly the single image made with seed + i.
        per_image = job.pixels.repeat(b, 1, 1, 1)
        known = None
        if not inpaint_model or not pure_noise:
            known = encode(vae, per_image, gens).to(dtype)
        noise = seeded_noise(latent_shape, gens, dtype=dtype, device=device)
        blanked = per_image * (job.mask < 0.5)
        if inpaint_model:
            blanked_latents = encode(vae, blanked, gens).to(dtype)
        else:
            # diffusers encodes the blanked image for regular models too (and discards it); its
            # posterior sample advances the generator, which ancestral samplers then draw from.
            for g in gens:
                torch.randn((1, *latent_shape[1:]), generator=g, dtype=vae.dtype)
        if known is not None:
            known = _masked_start(known, mask, content, gens)  # any extra draws come last
        latents = noise * scheduler.init_noise_sigma if pure_noise else scheduler.add_noise(known, noise, timesteps[:1].repeat(b))
        if inpaint_model:
            return Start(latents, timesteps, [UNetInputs(channels=torch.cat([mask, blanked_latents], dim=1))])
        return Start(latents, timesteps, [KnownAreaBlend(scheduler, timesteps, known, noise, mask)])

    return start


def _masked_start(known: torch.Tensor, mask: torch.Tensor, content: MaskedContent, gens) -> torch.Tensor:
    """A1111's latent start modes: the masked latents replaced by fresh noise, or zeroed."""
    if content is MaskedContent.LATENT_NOISE:
        fresh = seeded_noise(known.shape, gens, dtype=known.dtype, device=known.device)
        return known * (1 - mask) + fresh * mask
    if content is MaskedContent.LATENT_NOTHING:
        return known * (1 - mask)
    return known
