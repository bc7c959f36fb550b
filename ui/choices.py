"""Dropdown choices and defaults shared by the layout and the handlers (no widgets here).

Every list that ldm also knows is read from ldm, never copied: samplers and schedules from
`ldm.samplers`, resize methods from `ldm.RESAMPLERS`, inpaint options from `ldm.masks`. Ranges that
depend on the loaded model (sizes, batch, clip skip, noise level) come from the pipeline itself
(`pipe.limits`, `pipe.max_noise_level`) where the widgets are built.
"""
from __future__ import annotations

import ldm
from ldm import samplers
from ldm.masks import InpaintArea, MaskedContent

# (label shown, value passed to ldm): radios show friendly labels, the API takes ldm's values.
INPAINT_AREAS: list[tuple[str, str]] = [("Whole picture", InpaintArea.WHOLE.value), ("Only masked", InpaintArea.MASKED.value)]
MASKED_CONTENT: list[tuple[str, str]] = [
    ("Original", MaskedContent.ORIGINAL.value),
    ("Fill", MaskedContent.FILL.value),
    ("Latent noise", MaskedContent.LATENT_NOISE.value),
    ("Latent nothing", MaskedContent.LATENT_NOTHING.value),
]

# ControlNet units (ui.control_widgets): (label, ldm name) from ldm's tables.
CONTROL_PREPROCESSORS: list[tuple[str, str]] = [(p.label, name) for name, p in ldm.PREPROCESSORS.items()]
CONTROL_MODES: list[str] = list(ldm.CONTROL_MODES)
CONTROL_RESIZE: list[tuple[str, str]] = [(label, name) for name, label in ldm.RESIZE_MODES.items()]

# Hires fix upscalers (txt2img's and the Upscale tab's): (A1111's label, ldm's name) from ldm's table.
HIRES_UPSCALERS: list[tuple[str, str]] = [(label, name) for name, label in ldm.HIRES_UPSCALERS.items()]
# Shown instead of the x4 model's settings when none is loaded.
NO_X4_MODEL = ("No x4 upscale model is loaded, so the model-based choice here is the hires fix (a redraw with the "
               "base model). To add the \"x4 model\" method, start the app with `--upscale-model "
               "stabilityai/stable-diffusion-x4-upscaler` (or a local copy of it).")

UPSCALE_X4 = "x4 model"
UPSCALE_HIRES = "hires fix"
RESIZE_METHODS: tuple[str, ...] = tuple(ldm.RESAMPLERS)  # plain resizes by ldm.upscale_image
UPSCALE_METHODS: list[str] = [UPSCALE_X4, UPSCALE_HIRES, *RESIZE_METHODS]


def samplers_list() -> list[str]:
    return samplers.sampler_names()


def schedules_for(sampler: str) -> list[str]:
    """Schedule types the sampler supports; all of them for a name ldm does not know (it reports that itself)."""
    try:
        return samplers.schedule_names(sampler)
    except (KeyError, ValueError):
        return samplers.schedule_names()


def upscale_methods(has_x4_model: bool) -> list[str]:
    return UPSCALE_METHODS if has_x4_model else [m for m in UPSCALE_METHODS if m != UPSCALE_X4]
