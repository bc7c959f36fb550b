"""Gradio Blocks: widgets and event wiring only. What a button does lives in `ui.handlers`.

Each action is a named API endpoint whose parameters are the handler's parameter names (the ldm
keyword names), so `gradio_client` users call e.g. `client.predict(prompt="...", steps=20,
api_name="/txt2img")`. Every input widget has a value, so every parameter but the images is optional.
"""
from __future__ import annotations

import html
import inspect
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

import ldm
from ldm import samplers
from ldm.images import DEFAULT_MAX_PIXELS

from . import choices
from . import handlers as h

log = logging.getLogger(__name__)
# Runtime errors whose ldm message tells the user what to change (smaller size, VAE tiling, ...).
USER_FACING: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(ldm, "OutOfMemory", None), getattr(ldm, "DecodeError", None)) if e is not None
)
STATUS_EVERY = 0.5  # seconds between status-line updates
GPU = "gpu"  # one concurrency group: one model run at a time, the rest wait in the queue


# ---- handler -> Gradio function -------------------------------------------------------------


def user_error(exc: Exception) -> gr.Error:
    """gr.Error renders HTML: escape ldm's message so prompts and paths show as typed."""
    return gr.Error(html.escape(str(exc)))


def _public_params(handler: Callable) -> list[inspect.Parameter]:
    """The handler's API parameters: everything but the context and keyword-only plumbing."""
    params = list(inspect.signature(handler).parameters.values())[1:]
    return [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def endpoint(ctx: h.Context, handler: Callable) -> Callable:
    """Wrap a streaming handler as a Gradio generator function for a `Results` panel, with the
    handler's own parameter names (they become the API's) plus the request (for Stop) and progress."""
    public = _public_params(handler)
    names = [p.name for p in public]

    def fn(*args):
        *values, request, progress = args
        session = getattr(request, "session_hash", None) or ""
        started = last = time.monotonic()
        try:
            for item in handler(ctx, **dict(zip(names, values)), session=session):
                now = time.monotonic()
                if isinstance(item, h.Step):
                    progress((item.step, item.total), desc=_step_label(item))
                    # Gradio hides its bar once a stream has yielded, so a status line carries
                    # step and ETA too; throttled, it is one small message every half second.
                    if item.preview is not None or now - last >= STATUS_EVERY:
                        last = now
                        yield Results.step(item, now - started)
                else:
                    _notify(item)
                    yield Results.values(item, now - started)
        except (ValueError, *USER_FACING) as exc:
            raise user_error(exc) from None

    extra = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ]
    fn.__signature__ = inspect.Signature(public + extra)
    fn.__annotations__ = {"request": gr.Request}
    fn.__name__ = handler.__name__
    fn.__doc__ = handler.__doc__
    return fn


def plain(ctx: h.Context, handler: Callable) -> Callable:
    """A non-streaming handler, its ValueErrors shown as gr.Error."""

    def fn(*args):
        try:
            return handler(ctx, *args)
        except ValueError as exc:
            raise user_error(exc) from None

    fn.__signature__ = inspect.Signature(_public_params(handler))
    fn.__name__ = handler.__name__
    return fn


def ui_only(fn: Callable) -> Callable:
    """A widget-to-widget helper (not an API endpoint), its ValueErrors shown as gr.Error."""

    def wrapped(*args):
        try:
            return fn(*args)
        except ValueError as exc:
            raise user_error(exc) from None

    wrapped.__signature__ = inspect.signature(fn)
    return wrapped


def _step_label(step: h.Step) -> str:
    return f"batch {step.batch + 1}/{step.batch_count}" if step.batch_count > 1 else "sampling"


def _notify(out: h.Output) -> None:
    for w in out.warnings:
        gr.Warning(html.escape(w))
    if out.stopped:
        gr.Info(f"Stopped; kept {len(out.images)} finished image(s).")


# ---- widgets --------------------------------------------------------------------------------


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

    @property
    def outputs(self) -> list:
        # API returns: images, infotext of the first image, live preview (None at the end), status line.
        return [self.gallery, self.info, self.preview, self.status, self.infotexts, self.seeds, self.index]

    @staticmethod
    def values(out: h.Output, elapsed: float) -> tuple:
        if not out.images:  # stopped before any image: keep the previous results on screen
            return (gr.skip(), gr.skip(), None, h.done_text(out, elapsed), gr.skip(), gr.skip(), gr.skip())
        return out.images, out.info, None, h.done_text(out, elapsed), out.infotexts, out.seeds, 0

    @staticmethod
    def step(step: h.Step, elapsed: float) -> tuple:
        preview = step.preview if step.preview is not None else gr.skip()
        return (gr.skip(), gr.skip(), preview, h.progress_text(step, elapsed), gr.skip(), gr.skip(), gr.skip())


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
    sampler.change(_schedule_update, [sampler, schedule], schedule, queue=False, api_visibility="private")
    with gr.Row():
        steps = gr.Slider(1, min(150, pipe.limits.max_steps), value=d["steps"], step=1, label="Sampling steps",
                          elem_id=f"{name}-steps")
        cfg = gr.Slider(0, 30, value=d["guidance_scale"], step=0.5, label="CFG scale")
    return {"sampler": sampler, "schedule": schedule, "steps": steps, "guidance_scale": cfg}


def _schedule_update(sampler: str, schedule: str):
    names = choices.schedules_for(sampler)
    return gr.update(choices=names, value=schedule if schedule in names else samplers.DEFAULT_SCHEDULE)


def size_fields(pipe, name: str, from_image: bool) -> dict[str, gr.Slider]:
    """Width/height on the model's size step; 0 means "the input image's size" where there is one."""
    step, top = pipe.limits.size_step, pipe.limits.max_size
    low, value = (0, 0) if from_image else (step, pipe.default_size)
    note = " (0 = image's)" if from_image else ""
    with gr.Row():
        width = gr.Slider(low, top, value=value, step=step, label="Width" + note, elem_id=f"{name}-width")
        height = gr.Slider(low, top, value=value, step=step, label="Height" + note, elem_id=f"{name}-height")
    return {"width": width, "height": height}


def seed_fields(pipe, name: str) -> dict[str, gr.components.Component]:
    with gr.Row(equal_height=True):
        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", scale=4, minimum=-1)
        dice = gr.Button("🎲", scale=0, min_width=40)
        reuse = gr.Button("♻️", scale=0, min_width=40)
    with gr.Row():
        batch_size = gr.Slider(1, pipe.limits.max_batch, value=1, step=1, label="Batch size",
                               elem_id=f"{name}-batch-size")
        batch_count = gr.Slider(1, h.MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
    dice.click(lambda: -1, None, seed, queue=False, api_visibility="private")
    return {"seed": seed, "batch_size": batch_size, "batch_count": batch_count, "_reuse": reuse}


def prompt_fields(name: str) -> dict[str, gr.Textbox]:
    prompt = gr.Textbox(label="Prompt", lines=3, value="", placeholder="a red circle on a blue background",
                        elem_id=f"{name}-prompt")
    negative = gr.Textbox(label="Negative prompt", lines=2, value="", elem_id=f"{name}-negative")
    return {"prompt": prompt, "negative_prompt": negative}


def action_buttons(name: str, label: str = "Generate") -> tuple[gr.Button, gr.Button]:
    with gr.Row():
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


def txt2img_tab(ctx: h.Context) -> Tab:
    pipe = ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1):
            f = prompt_fields("txt2img")
            go, stop = action_buttons("txt2img")
            f |= sampler_fields(pipe, "txt2img")
            f |= size_fields(pipe, "txt2img", from_image=False)
            f |= seed_fields(pipe, "txt2img")
            f["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            f["fast"] = gr.Checkbox(value=False, label="Fast preset (about 1.5-2x faster, slightly different images)")
            with gr.Accordion("Hires fix", open=False):
                f["hires_scale"] = gr.Slider(1, 4, value=1, step=0.05, label="Upscale by (1 = off)")
                f["hires_strength"] = gr.Slider(0.05, 1, value=0.5, step=0.01, label="Denoising strength")
        with gr.Column(scale=1):
            results = results_panel("txt2img")
    return Tab(f, results, go, stop)


def img2img_tab(ctx: h.Context) -> Tab:
    pipe = ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1):
            f = {"image": gr.Image(label="Image", type="filepath", image_mode=None, format="png", height=300,
                                   sources=["upload", "clipboard"], elem_id="img2img-image")}
            f |= prompt_fields("img2img")
            go, stop = action_buttons("img2img")
            f["strength"] = gr.Slider(0.01, 1, value=0.75, step=0.01, label="Denoising strength")
            f |= sampler_fields(pipe, "img2img")
            f |= size_fields(pipe, "img2img", from_image=True)
            f |= seed_fields(pipe, "img2img")
            f["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
        with gr.Column(scale=1):
            results = results_panel("img2img")
    return Tab(f, results, go, stop)


def inpaint_tab(ctx: h.Context) -> Tab:
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    with gr.Row():
        with gr.Column(scale=1):
            f: dict[str, Any] = {}
            f["_editor"] = gr.ImageEditor(
                label="Image — paint over what to repaint (brush size in the brush menu)", type="pil",
                image_mode="RGBA", format="png", height=420, transforms=(), layers=False, sources=["upload", "clipboard"],
                brush=gr.Brush(default_size=16, colors=["#ffffff"], color_mode="fixed"), elem_id="inpaint-editor",
            )
            with gr.Accordion("Or upload a mask (white = repaint; transparent = repaint if it has alpha)", open=False):
                f["_mask_upload"] = gr.Image(label="Mask", type="pil", image_mode=None, format="png", height=200,
                                             sources=["upload", "clipboard"])
            # What the API's /inpaint receives: the editor drawing is turned into these two files first.
            f["image"] = gr.Image(type="filepath", image_mode=None, format="png", visible=False)
            f["mask"] = gr.Image(type="filepath", image_mode=None, format="png", visible=False)
            f |= prompt_fields("inpaint")
            go, stop = action_buttons("inpaint", "Inpaint")
            f["strength"] = gr.Slider(0.01, 1, value=0.75, step=0.01, label="Denoising strength")
            with gr.Row():
                f["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur")
                f["invert_mask"] = gr.Checkbox(value=False, label="Invert mask")
            with gr.Row():
                f["inpaint_area"] = gr.Radio(choices.INPAINT_AREAS, value="whole", label="Inpaint area")
                f["padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels")
            f["masked_content"] = gr.Radio(choices.MASKED_CONTENT, value="original", label="Masked content")
            f |= sampler_fields(pipe, "inpaint")
            f |= size_fields(pipe, "inpaint", from_image=True)
            f |= seed_fields(pipe, "inpaint")
            f["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            with gr.Accordion("Outpaint (extend the canvas)", open=False):
                with gr.Row():
                    for side in ("left", "right", "top", "bottom"):
                        f[side] = gr.Slider(0, 512, value=0, step=pipe.limits.size_step, label=f"{side.title()}, pixels")
                f["_outpaint"] = gr.Button("Outpaint", variant="primary", elem_id="outpaint-generate")
        with gr.Column(scale=1):
            results = results_panel("inpaint")
    return Tab(f, results, go, stop)


def upscale_tab(ctx: h.Context) -> Tab:
    pipe = ctx.pipes.base
    methods = choices.upscale_methods(ctx.pipes.upscale is not None)
    with gr.Row():
        with gr.Column(scale=1):
            f = {"image": gr.Image(label="Image", type="filepath", image_mode=None, format="png", height=300,
                                   sources=["upload", "clipboard"], elem_id="upscale-image")}
            default = choices.UPSCALE_X4 if choices.UPSCALE_X4 in methods else "lanczos"
            f["method"] = gr.Radio(methods, value=default, label="Method")
            f["scale"] = gr.Slider(1, 8, value=2, step=0.25, label="Scale (the x4 model is always 4)")
            go, stop = action_buttons("upscale", "Upscale")
            with gr.Accordion("Model-based methods (x4 model, hires fix)", open=False):
                f |= prompt_fields("upscale")
                with gr.Row():
                    f["tile_size"] = gr.Slider(0, 1024, value=0, step=pipe.limits.size_step, label="Tile size (0 = auto)")
                    f["tile_overlap"] = gr.Slider(0, 256, value=32, step=8, label="Tile overlap")
                with gr.Row():
                    f["noise_level"] = gr.Slider(0, 350, value=20, step=1, label="Noise level (x4 model)")
                    f["strength"] = gr.Slider(0.01, 1, value=0.5, step=0.01, label="Denoising strength (hires fix)")
                f["upscaler"] = gr.Radio(list(choices.HIRES_UPSCALERS), value="lanczos", label="Hires fix upscaler")
                f |= sampler_fields(pipe, "upscale")
                f["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1)
        with gr.Column(scale=1):
            results = results_panel("upscale")
    return Tab(f, results, go, stop)


def png_info_tab(ctx: h.Context) -> Tab:
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="PNG", type="filepath", image_mode=None, format="png", height=360,
                             sources=["upload", "clipboard"], elem_id="png-info-image")
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, buttons=["copy"], elem_id="png-info-text")
            send = gr.Button("Send to txt2img")
    return Tab({"image": image, "_text": text, "_send": send})


# ---- wiring ---------------------------------------------------------------------------------


def _inputs(fields: dict[str, Any], handler: Callable) -> list:
    return [readable_errors(fields[p.name], p.name) for p in _public_params(handler)]


def readable_errors(component, name: str):
    """Gradio checks API inputs before our handler runs. Its messages quote the raw value inside
    gr.Error, which renders HTML (a Radio given "<img onerror=...>"), and anything else it raises
    (a file that is not an image, a decompression bomb, text for a number) reaches the caller as a
    generic "the app raised an exception". Both become an escaped message naming the field."""
    if getattr(component, "_readable_errors", False):
        return component
    check = component.preprocess
    what = component.label or name

    def preprocess(payload):
        try:
            return check(payload)
        except gr.Error as exc:
            raise gr.Error(html.escape(str(exc.message))) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise gr.Error(html.escape(f"{what}: the image is too large to open ({exc})")) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            name = getattr(payload, "orig_name", None) or "the file"
            raise gr.Error(html.escape(f"{what}: {name} is not a readable image ({type(exc).__name__})")) from None
        except (TypeError, ValueError):
            raise gr.Error(html.escape(f"{what}: {type(payload).__name__} is not a valid value here")) from None

    component.preprocess = preprocess
    component._readable_errors = True
    return component


def limit_editor_pixels(editor: gr.ImageEditor, max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.ImageEditor:
    """The inpaint editor (type="pil", RGBA) makes Gradio decode and convert every uploaded layer
    before our handler sees it; a small PNG declaring 9000x9000 pixels would cost ~300 MB per
    request, and these UI steps run unqueued. Check each image's header first, as ldm.images does."""
    convert = editor.convert_and_format_image

    def checked(file, *args, **kwargs):
        if file is not None:
            source = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else getattr(file, "path", None)
            if source is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    try:
                        with Image.open(source) as im:  # reads the header only
                            width, height = im.size
                    except Image.DecompressionBombError as exc:
                        raise gr.Error(html.escape(f"the image is too large to open ({exc})")) from None
                    except (UnidentifiedImageError, OSError, SyntaxError):
                        raise gr.Error("the upload is not a readable image") from None
                if width * height > max_pixels:
                    raise gr.Error(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
        return convert(file, *args, **kwargs)

    editor.convert_and_format_image = checked
    return editor


def wire_generation(ctx: h.Context, tab: Tab, handler: Callable, api_name: str, trigger=None):
    """Connect a tab's button to its handler; returns the event (for Stop to cancel)."""
    r = tab.results
    fn = endpoint(ctx, handler)
    return (trigger or tab.go.click)(
        fn, _inputs(tab.fields, handler), r.outputs, api_name=api_name, concurrency_id=GPU,
        concurrency_limit=1, show_progress_on=[r.gallery],
    )


def wire_results(ctx: h.Context, tab: Tab) -> None:
    r = tab.results

    def on_select(infotexts: list, evt: gr.SelectData):
        return evt.index, h.selected(infotexts, evt.index, "")

    r.gallery.select(on_select, [r.infotexts], [r.index, r.info], queue=False, api_visibility="private")
    if "_reuse" in tab.fields:
        tab.fields["_reuse"].click(lambda seeds, i: h.selected(seeds, i, -1), [r.seeds, r.index], tab.fields["seed"],
                                   queue=False, api_visibility="private")


def wire_stop(ctx: h.Context, tab: Tab, events: list) -> None:
    """Stop: Gradio cancels the events (and drops queued ones); the flag stops the model at its next step."""
    r = tab.results

    def stop_runs(request: gr.Request):
        session = getattr(request, "session_hash", None) or ""
        n = ctx.jobs.cancel(session)
        log.info("stop: %d run(s) of session %s asked to stop", n, session)
        return ("Stopped." if n else "Nothing to stop."), None

    tab.stop.click(stop_runs, None, [r.status, r.preview], cancels=events, queue=False, api_visibility="private")


def wire_send_to(tabs: dict[str, Tab], tabs_block: gr.Tabs) -> None:
    """Gallery -> another tab: the selected image plus its prompt and sampler settings."""
    for tab in tabs.values():
        r = tab.results
        for target, button in (("img2img", r.send_img2img), ("inpaint", r.send_inpaint), ("upscale", r.send_upscale)):
            dest = tabs[target].fields
            keys = [k for k in SENT_FIELDS if k in dest]
            image_field = dest["_editor"] if target == "inpaint" else dest["image"]
            button.click(_sender(target, keys), [r.gallery, r.index, r.infotexts],
                         [image_field, *[dest[k] for k in keys], tabs_block], queue=False, api_visibility="private")


SENT_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale")


def _sender(target: str, keys: list[str]) -> Callable:
    def send(gallery, index, infotexts):
        path = h.selected_image(gallery, index)
        if path is None:
            raise gr.Error("no image to send: generate one first")
        values = h.infotext_fields(h.selected(infotexts, index, ""))
        image = {"background": path, "layers": [], "composite": path} if target == "inpaint" else path
        return (image, *[values.get(k, gr.skip()) for k in keys], gr.Tabs(selected=target))

    return send


def cache_policy(max_age: float) -> tuple[int, int] | None:
    """Gradio's delete_cache=(every, older_than): uploads and cached results of this app."""
    if not max_age or max_age <= 0:
        return None
    return max(1, int(min(max_age / 2, 600))), max(1, int(max_age))


def build(pipes: h.Pipes, options: h.Options | None = None) -> gr.Blocks:
    """The whole UI for already-loaded pipelines; call `.launch()` on the result."""
    ctx = h.Context(pipes, options or h.Options())
    with gr.Blocks(title="ldm — text to image", delete_cache=cache_policy(ctx.options.cache_max_age)) as demo:
        gr.Markdown(f"### ldm · model `{html.escape(str(pipes.base.name))}`"
                    + (f" · inpaint `{html.escape(str(pipes.inpaint.name))}`" if pipes.inpaint else "")
                    + (f" · upscale `{html.escape(str(pipes.upscale.name))}`" if pipes.upscale else ""))
        with gr.Tabs() as tabs_block:
            with gr.Tab("txt2img", id="txt2img"):
                t2i = txt2img_tab(ctx)
            with gr.Tab("img2img", id="img2img"):
                i2i = img2img_tab(ctx)
            with gr.Tab("Inpaint", id="inpaint"):
                inp = inpaint_tab(ctx)
            with gr.Tab("Upscale", id="upscale"):
                up = upscale_tab(ctx)
            with gr.Tab("PNG info", id="png_info"):
                info = png_info_tab(ctx)
        tabs = {"txt2img": t2i, "img2img": i2i, "inpaint": inp, "upscale": up}

        for name, handler in (("txt2img", h.txt2img), ("img2img", h.img2img), ("upscale", h.upscale)):
            event = wire_generation(ctx, tabs[name], handler, name)
            wire_stop(ctx, tabs[name], [event])
        _wire_inpaint(ctx, inp)
        for tab in tabs.values():
            wire_results(ctx, tab)
        wire_send_to(tabs, tabs_block)
        _wire_png_info(ctx, info, t2i, tabs_block)
    demo.queue(max_size=ctx.options.queue_size, default_concurrency_limit=1)
    demo.ldm_context = ctx  # for tests and app.py
    return demo


def _wire_inpaint(ctx: h.Context, tab: Tab) -> None:
    f = tab.fields
    limit_editor_pixels(f["_editor"])

    # UI-only steps turn the editor into the files /inpaint and /outpaint take, then call them.
    convert = tab.go.click(ui_only(h.editor_to_image_and_mask), [f["_editor"], f["_mask_upload"]],
                           [f["image"], f["mask"]], queue=False, api_visibility="private")
    inpaint = wire_generation(ctx, tab, h.inpaint, "inpaint", trigger=convert.success)
    grab = f["_outpaint"].click(ui_only(h.editor_image), [f["_editor"]], [f["image"]], queue=False,
                                api_visibility="private")
    outpaint = wire_generation(ctx, tab, h.outpaint, "outpaint", trigger=grab.success)
    wire_stop(ctx, tab, [inpaint, outpaint])


def _wire_png_info(ctx: h.Context, tab: Tab, t2i: Tab, tabs_block: gr.Tabs) -> None:
    f = tab.fields
    f["image"].change(plain(ctx, h.png_info), [readable_errors(f["image"], "image")], [f["_text"]], api_name="png_info",
                      concurrency_limit=None)
    targets = [k for k in ("prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale", "seed",
                           "width", "height", "clip_skip") if k in t2i.fields]

    def send(text: str):
        values = h.infotext_fields(text)
        return (*[values.get(k, gr.skip()) for k in targets], gr.Tabs(selected="txt2img"))

    f["_send"].click(send, [f["_text"]], [*[t2i.fields[k] for k in targets], tabs_block], queue=False,
                     api_visibility="private")
