"""The widgets of each tab: the input fields (named as the handlers' parameters) and the results panel.

Number ranges are the ones ldm checks (`ui.ranges`: typed values outside them reach ldm, which refuses
them with its message): those of the loaded model from `pipe.limits.range` (width/height from the size
step to `max_size` on every tab, batch size, steps, clip skip up to the text encoder's depth), the x4
upscaler's noise level from its `max_noise_level`, the fixed ones from `ldm.params` (CFG scale, denoising
strength, hires scale, mask blur, inpaint padding, outpaint sides, x4 tile size and overlap). Choices come
from `ui.choices` (which reads ldm's tables).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from ldm import samplers
from ldm.params import (AUTO_TILE_OVERLAP, GUIDANCE, HIRES_SCALE, INPAINT_PADDING, MASK_BLUR, OUTPAINT_SIDE, STRENGTH,
                        TILE_OVERLAP, UPSCALE_TILE, Range)

from . import brush, choices
from .control_widgets import control_accordion
from .model_widgets import refiner_accordion
from .errors import readable
from .ranges import (CFG_DRAG_TOP, HIRES_SCALE_DRAG_TOP, MASK_BLUR_DRAG_TOP, OUTPAINT_DRAG_TOP, PADDING_DRAG_TOP,
                     STEPS_DRAG_TOP, TILE_DRAG_TOP, TILE_OVERLAP_DRAG_TOP, slider)
from .state import Context
from .streaming import Output, Step, done_text, progress_text
from .tasks import BATCH_COUNT, RESIZE_SCALE

NOISE_LEVEL = 20  # the Upscale tab's default noise level for the x4 model (diffusers' default)
# What ldm does with the x4 overlap for tiles it picks (ldm.params), where people set it; a value past
# ldm's rules for a given tile size is refused with its message.
TILE_OVERLAP_INFO = (f"Input pixels. With tile size 0, at most {AUTO_TILE_OVERLAP:.0%} of the tile picked "
                     "(the infotext shows the overlap used).")


@dataclass
class Results:
    """The output side of a generation tab."""

    preview: gr.Image
    status: gr.Textbox
    gallery: gr.Gallery
    info: gr.Textbox
    infotexts: gr.State
    seeds: gr.State
    index: gr.State
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_upscale: gr.Button

    API_NAMES = ("images", "infotext", "preview", "status")  # the returns an API client sees (states are not)

    @property
    def outputs(self) -> list:
        # API returns: images, infotext of the first image, live preview (None at the end), status line.
        return [self.gallery, self.info, self.preview, self.status, self.infotexts, self.seeds, self.index]

    @staticmethod
    def values(out: Output, elapsed: float) -> tuple:
        if not out.images:  # stopped before any image: keep the previous results on screen
            return (gr.skip(), gr.skip(), None, done_text(out, elapsed), gr.skip(), gr.skip(), gr.skip())
        return out.images, out.info, None, done_text(out, elapsed), out.infotexts, out.seeds, 0

    @staticmethod
    def status_only(text: str) -> tuple:
        """Only the status line changes ("Running…", "Failed: <why>"); the preview is cleared."""
        return (gr.skip(), gr.skip(), None, text, gr.skip(), gr.skip(), gr.skip())

    @staticmethod
    def step(step: Step, elapsed: float) -> tuple:
        preview = step.preview if step.preview is not None else gr.skip()
        return (gr.skip(), gr.skip(), preview, progress_text(step, elapsed), gr.skip(), gr.skip(), gr.skip())


def results_panel(name: str) -> Results:
    preview = gr.Image(label="Live preview", interactive=False, height=160, elem_id=f"{name}-preview")
    status = gr.Textbox(value="", show_label=False, interactive=False, container=False, elem_id=f"{name}-status",
                        placeholder="idle")
    gallery = gr.Gallery(label="Images", format="png", columns=4, height=420, interactive=False,
                         elem_id=f"{name}-gallery", buttons=["download", "fullscreen"])
    info = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False, buttons=["copy"],
                      elem_id=f"{name}-info")
    with gr.Row():
        send = [gr.Button(f"Send to {t}", size="sm") for t in ("img2img", "inpaint", "upscale")]
    return Results(preview, status, gallery, info, gr.State([]), gr.State([]), gr.State(0), *send)


def sampler_fields(pipe, name: str, defaults: dict | None = None) -> dict[str, gr.components.Component]:
    d = {"steps": 20, "guidance_scale": 7.0, **(defaults or {})}
    # Custom values pass through so ldm judges them: it accepts A1111's old names ("DPM++ 2M Karras")
    # and its errors list the valid choices.
    sampler = gr.Dropdown(choices.samplers_list(), value=samplers.DEFAULT_SAMPLER, label="Sampler",
                          allow_custom_value=True)
    schedule = gr.Dropdown(choices.schedules_for(samplers.DEFAULT_SAMPLER), value=samplers.DEFAULT_SCHEDULE,
                           label="Schedule type", allow_custom_value=True)
    sampler.change(readable(_schedule_update), [sampler, schedule], schedule, queue=False, api_visibility="private")
    with gr.Row():
        steps = slider(pipe.limits.range("steps"), drag_top=STEPS_DRAG_TOP, value=d["steps"], step=1,
                       label="Sampling steps", elem_id=f"{name}-steps")
        cfg = slider(GUIDANCE, drag_top=CFG_DRAG_TOP, value=d["guidance_scale"], step=0.5, label="CFG scale",
                     elem_id=f"{name}-cfg")
    return {"sampler": sampler, "schedule": schedule, "steps": steps, "guidance_scale": cfg}


def _schedule_update(sampler: str, schedule: str):
    names = choices.schedules_for(sampler)
    return gr.update(choices=names, value=schedule if schedule in names else samplers.DEFAULT_SCHEDULE)


def size_fields(pipe, name: str, from_image: bool) -> dict[str, gr.Slider]:
    """Width/height over ldm's sizes (`limits.range`: from the size step to max_size) on every tab, at the
    native size; where there is an input image they start at 0, "the input image's size", a value typed or
    sent rather than dragged. ldm checks the range: a typed 7 is refused with its message, as 100 is."""
    step, value = pipe.limits.size_step, 0 if from_image else pipe.default_size
    note = " (0 = image's)" if from_image else ""
    with gr.Row():
        width = slider(pipe.limits.range("width"), value=value, step=step, label="Width" + note, elem_id=f"{name}-width")
        height = slider(pipe.limits.range("height"), value=value, step=step, label="Height" + note,
                        elem_id=f"{name}-height")
    return {"width": width, "height": height}


def seed_fields(pipe, name: str) -> dict[str, gr.components.Component]:
    with gr.Row(equal_height=True):
        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", scale=4, minimum=-1, elem_id=f"{name}-seed")
        dice = gr.Button("🎲", scale=0, min_width=40, elem_id=f"{name}-random-seed")  # tooltips: ui.page
        reuse = gr.Button("♻️", scale=0, min_width=40, elem_id=f"{name}-reuse-seed")
    with gr.Row():
        batch_size = slider(pipe.limits.range("batch_size"), value=1, step=1, label="Batch size",
                            elem_id=f"{name}-batch-size")
        batch_count = slider(BATCH_COUNT, value=1, step=1, label="Batch count", elem_id=f"{name}-batch-count")
    dice.click(readable(lambda: -1), None, seed, queue=False, api_visibility="private")
    return {"seed": seed, "batch_size": batch_size, "batch_count": batch_count, "_reuse": reuse}


def generation_fields(pipe, name: str, from_image: bool) -> dict[str, gr.components.Component]:
    """What every generation tab has: sampler, size, seed and batch, clip skip."""
    fields = sampler_fields(pipe, name) | size_fields(pipe, name, from_image) | seed_fields(pipe, name)
    fields["clip_skip"] = clip_skip_field(pipe, name)
    return fields


def image_field(name: str) -> gr.Image:
    return gr.Image(label="Image", type="filepath", image_mode=None, format="png", height=300,
                    sources=["upload", "clipboard"], elem_id=f"{name}-image")


def clip_skip_field(pipe, name: str) -> gr.Slider:
    return slider(pipe.limits.range("clip_skip"), value=1, step=1, label="Clip skip", elem_id=f"{name}-clip-skip")


def strength_field(value: float, label: str = "Denoising strength", elem_id: str | None = None) -> gr.Slider:
    return slider(STRENGTH, value=value, step=0.01, label=label, elem_id=elem_id)


def prompt_fields(name: str, placeholder: str = "a red circle on a blue background") -> dict[str, gr.Textbox]:
    prompt = gr.Textbox(label="Prompt", lines=3, value="", placeholder=placeholder,
                        elem_id=f"{name}-prompt")
    negative = gr.Textbox(label="Negative prompt", lines=2, value="", elem_id=f"{name}-negative")
    return {"prompt": prompt, "negative_prompt": negative}


def action_buttons(name: str, label: str = "Generate") -> tuple[gr.Button, gr.Button]:
    with gr.Row(elem_classes=["ldm-actions"]):  # on a narrow screen the results follow this row (ui.page)
        go = gr.Button(label, variant="primary", elem_id=f"{name}-generate")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{name}-stop")
    return go, stop


# ---- tabs -----------------------------------------------------------------------------------


@dataclass
class Tab:
    fields: dict[str, Any]
    results: Results | None = None
    go: gr.Button | None = None
    stop: gr.Button | None = None


def txt2img_tab(ctx: Context) -> Tab:
    pipe = ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1, elem_classes=["ldm-inputs"]):
            f = prompt_fields("txt2img")
            go, stop = action_buttons("txt2img")
            f |= generation_fields(pipe, "txt2img", from_image=False)
            f["fast"] = gr.Checkbox(value=False, label="Fast preset (about 1.5-2x faster, slightly different images)")
            with gr.Accordion("Hires fix", open=False):
                f["hires_scale"] = slider(HIRES_SCALE, drag_top=HIRES_SCALE_DRAG_TOP, value=1, step=0.05,
                                          label="Upscale by (1 = off)", elem_id="txt2img-hires-scale")
                f["hires_strength"] = strength_field(0.5, elem_id="txt2img-hires-strength")
                with gr.Row():
                    f["hires_upscaler"] = gr.Radio(choices.HIRES_UPSCALERS, value="latent", label="Upscaler",
                                                   elem_id="txt2img-hires-upscaler")
                    steps = pipe.limits.range("steps")  # and 0: as many as the first pass
                    f["hires_steps"] = slider(Range(0, steps.high), drag_top=STEPS_DRAG_TOP, value=0, step=1,
                                              label="Hires steps (0 = as the first pass)", elem_id="txt2img-hires-steps")
            f |= refiner_accordion(ctx, "txt2img")
            f |= control_accordion(ctx, "txt2img", (f["width"], f["height"]), uses_tab_image=False)
        with gr.Column(scale=1, elem_classes=["ldm-results"]):
            results = results_panel("txt2img")
    return Tab(f, results, go, stop)


def img2img_tab(ctx: Context) -> Tab:
    pipe = ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1, elem_classes=["ldm-inputs"]):
            f = {"image": image_field("img2img")}
            f |= prompt_fields("img2img")
            go, stop = action_buttons("img2img")
            f["strength"] = strength_field(0.75, elem_id="img2img-strength")
            f |= generation_fields(pipe, "img2img", from_image=True)
            f |= control_accordion(ctx, "img2img", (f["width"], f["height"]), uses_tab_image=True)
        with gr.Column(scale=1, elem_classes=["ldm-results"]):
            results = results_panel("img2img")
    return Tab(f, results, go, stop)


def inpaint_tab(ctx: Context) -> Tab:
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1, elem_classes=["ldm-inputs"]):
            f: dict[str, Any] = {}
            f["_editor"] = gr.ImageEditor(
                label="Image — paint over what to repaint", type="pil",
                image_mode="RGBA", format="png", height=420, transforms=(), layers=False, sources=["upload", "clipboard"],
                brush=brush.brush(brush.DEFAULT_SIZE), elem_id="inpaint-editor",
            )
            f["_brush_size"] = brush.size_field()  # sized to each uploaded picture (ui.brush)
            with gr.Accordion("Or upload a mask (white = repaint; transparent = repaint if it has alpha)", open=False):
                f["_mask_upload"] = gr.Image(label="Mask", type="pil", image_mode=None, format="png", height=200,
                                             sources=["upload", "clipboard"])
            # What the API's /inpaint receives: the editor drawing is turned into these two files first.
            f["image"] = gr.Image(type="filepath", image_mode=None, format="png", visible=False)
            f["mask"] = gr.Image(type="filepath", image_mode=None, format="png", visible=False)
            f |= prompt_fields("inpaint")
            go, stop = action_buttons("inpaint", "Inpaint")
            f["strength"] = strength_field(0.75, elem_id="inpaint-strength")
            with gr.Row():
                f["mask_blur"] = slider(MASK_BLUR, drag_top=MASK_BLUR_DRAG_TOP, value=4, step=1, label="Mask blur",
                                        elem_id="inpaint-mask-blur")
                f["invert_mask"] = gr.Checkbox(value=False, label="Invert mask")
            with gr.Row():
                f["inpaint_area"] = gr.Radio(choices.INPAINT_AREAS, value="whole", label="Inpaint area")
                f["padding"] = slider(INPAINT_PADDING, drag_top=PADDING_DRAG_TOP, value=32, step=4,
                                      label="Only masked padding, pixels", elem_id="inpaint-padding")
            f["masked_content"] = gr.Radio(choices.MASKED_CONTENT, value="original", label="Masked content")
            f |= generation_fields(pipe, "inpaint", from_image=True)
            f |= control_accordion(ctx, "inpaint", (f["width"], f["height"]), uses_tab_image=True)
            with gr.Accordion("Outpaint (extend the canvas)", open=False):
                with gr.Row():
                    for side in ("left", "right", "top", "bottom"):
                        f[side] = slider(OUTPAINT_SIDE, drag_top=OUTPAINT_DRAG_TOP, value=0, step=pipe.limits.size_step,
                                         label=f"{side.title()}, pixels", elem_id=f"outpaint-{side}")
                f["_outpaint"] = gr.Button("Outpaint", variant="primary", elem_id="outpaint-generate")
        with gr.Column(scale=1, elem_classes=["ldm-results"]):
            results = results_panel("inpaint")
    brush.wire_brush(f["_editor"], f["_brush_size"], results.status)
    return Tab(f, results, go, stop)


def upscale_tab(ctx: Context) -> Tab:
    """Only what is loaded is offered: without an x4 model its method, tile and noise settings are not
    shown (they keep their defaults for the API) and a note says how to load one."""
    pipe = ctx.pipes.base
    x4 = ctx.pipes.upscale is not None
    methods = choices.upscale_methods(x4)
    with gr.Row():
        with gr.Column(scale=1, elem_classes=["ldm-inputs"]):
            f = {"image": image_field("upscale")}
            default = choices.UPSCALE_X4 if x4 else "lanczos"
            f["method"] = gr.Radio(methods, value=default, label="Method", elem_id="upscale-method")
            # Dragged: what every method takes; typed: the plain resizes also take less than 1 (RESIZE_SCALE).
            f["scale"] = slider(Range(HIRES_SCALE.low, RESIZE_SCALE.high), value=2, step=0.25,
                                label="Scale (the x4 model is always 4)" if x4 else "Scale", elem_id="upscale-scale")
            go, stop = action_buttons("upscale", "Upscale")
            if not x4:
                gr.Markdown(choices.NO_X4_MODEL, elem_id="upscale-no-x4")
            with gr.Accordion("Model-based methods (x4 model, hires fix)" if x4 else "Hires fix settings", open=False):
                f |= prompt_fields("upscale", "empty: the image's own prompt, from its parameters")
                with gr.Row(visible=x4):
                    # and 0: automatic (ldm's None)
                    f["tile_size"] = slider(Range(0, UPSCALE_TILE.high), drag_top=TILE_DRAG_TOP, value=0,
                                            step=pipe.limits.size_step,
                                            label="Tile size (0 = auto)", elem_id="upscale-tile-size")
                    f["tile_overlap"] = slider(TILE_OVERLAP, drag_top=TILE_OVERLAP_DRAG_TOP, value=32, step=8,
                                               label="Tile overlap", elem_id="upscale-tile-overlap",
                                               info=TILE_OVERLAP_INFO)
                with gr.Row():
                    f["noise_level"] = noise_level_field(ctx.pipes.upscale)
                    f["strength"] = strength_field(0.5, "Denoising strength (hires fix)" if x4 else "Denoising strength",
                                                   elem_id="upscale-strength")
                f["upscaler"] = gr.Radio(choices.HIRES_UPSCALERS, value="lanczos", label="Hires fix upscaler")
                f |= sampler_fields(pipe, "upscale")
                f["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1)
        with gr.Column(scale=1, elem_classes=["ldm-results"]):
            results = results_panel("upscale")
    return Tab(f, results, go, stop)


def noise_level_field(x4_pipe) -> gr.Slider:
    """Up to the x4 model's max_noise_level; without an x4 model the field is hidden (it is only
    read by the "x4 model" method) and stays at the default."""
    top = x4_pipe.max_noise_level if x4_pipe is not None else NOISE_LEVEL
    return slider(Range(0, top), value=min(NOISE_LEVEL, top), step=1, label="Noise level (x4 model)",
                  visible=x4_pipe is not None, elem_id="upscale-noise-level")


def png_info_tab(ctx: Context) -> Tab:
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="PNG", type="filepath", image_mode=None, format="png", height=360,
                             sources=["upload", "clipboard"], elem_id="png-info-image")
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, buttons=["copy"], elem_id="png-info-text",
                              placeholder="No generation parameters found in this image.")
            send = gr.Button("Send to txt2img")
    return Tab({"image": image, "_text": text, "_send": send})
