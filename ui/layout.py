"""Gradio Blocks: the tabs and their event wiring. What a button does lives in `ui.tasks`; the
widgets in `ui.widgets`; handler -> Gradio function in `ui.endpoints`; every reach into Gradio
beyond its public API in `ui.gradio_compat`.

Each action is a named API endpoint whose parameters are the handler's parameter names (the ldm
keyword names), so `gradio_client` users call e.g. `client.predict(prompt="...", steps=20,
api_name="/txt2img")`. Every input widget has a value, so every parameter but the images is optional.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from . import convert, editor, tasks
from .endpoints import api_params, endpoint, plain, ui_only
from .gradio_compat import attach_context, limit_editor_pixels, readable_errors
from .state import Context, Options, Pipes
from .widgets import Tab, img2img_tab, inpaint_tab, png_info_tab, txt2img_tab, upscale_tab

log = logging.getLogger(__name__)
GPU = "gpu"  # one concurrency group: one model run at a time, the rest wait in the queue


def _inputs(fields: dict[str, Any], handler: Callable) -> list:
    return [readable_errors(fields[p.name], p.name) for p in api_params(handler)]


def wire_generation(ctx: Context, tab: Tab, handler: Callable, api_name: str, trigger=None):
    """Connect a tab's button to its handler; returns the event (for Stop to cancel)."""
    r = tab.results
    fn = endpoint(ctx, handler)
    return (trigger or tab.go.click)(
        fn, _inputs(tab.fields, handler), r.outputs, api_name=api_name, concurrency_id=GPU,
        concurrency_limit=1, show_progress_on=[r.gallery],
    )


def wire_results(ctx: Context, tab: Tab) -> None:
    r = tab.results

    def on_select(infotexts: list, evt: gr.SelectData):
        return evt.index, convert.selected(infotexts, evt.index, "")

    r.gallery.select(on_select, [r.infotexts], [r.index, r.info], queue=False, api_visibility="private")
    if "_reuse" in tab.fields:
        tab.fields["_reuse"].click(lambda seeds, i: convert.selected(seeds, i, -1), [r.seeds, r.index], tab.fields["seed"],
                                   queue=False, api_visibility="private")


def wire_stop(ctx: Context, tab: Tab, events: list) -> None:
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
        path = convert.selected_image(gallery, index)
        if path is None:
            raise gr.Error("no image to send: generate one first")
        values = convert.infotext_fields(convert.selected(infotexts, index, ""))
        image = {"background": path, "layers": [], "composite": path} if target == "inpaint" else path
        return (image, *[values.get(k, gr.skip()) for k in keys], gr.Tabs(selected=target))

    return send


def cache_policy(max_age: float) -> tuple[int, int] | None:
    """Gradio's delete_cache=(every, older_than): uploads and cached results of this app."""
    if not max_age or max_age <= 0:
        return None
    return max(1, int(min(max_age / 2, 600))), max(1, int(max_age))


def build(pipes: Pipes, options: Options | None = None) -> gr.Blocks:
    """The whole UI for already-loaded pipelines; call `.launch()` on the result."""
    ctx = Context(pipes, options or Options())
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

        for name, handler in (("txt2img", tasks.txt2img), ("img2img", tasks.img2img), ("upscale", tasks.upscale)):
            event = wire_generation(ctx, tabs[name], handler, name)
            wire_stop(ctx, tabs[name], [event])
        _wire_inpaint(ctx, inp)
        for tab in tabs.values():
            wire_results(ctx, tab)
        wire_send_to(tabs, tabs_block)
        _wire_png_info(ctx, info, t2i, tabs_block)
    demo.queue(max_size=ctx.options.queue_size, default_concurrency_limit=1)
    return attach_context(demo, ctx)  # for tests and app.py


def _wire_inpaint(ctx: Context, tab: Tab) -> None:
    f = tab.fields
    limit_editor_pixels(f["_editor"])

    # UI-only steps turn the editor into the files /inpaint and /outpaint take, then call them.
    convert = tab.go.click(ui_only(editor.editor_to_image_and_mask), [f["_editor"], f["_mask_upload"]],
                           [f["image"], f["mask"]], queue=False, api_visibility="private")
    inpaint = wire_generation(ctx, tab, tasks.inpaint, "inpaint", trigger=convert.success)
    grab = f["_outpaint"].click(ui_only(editor.editor_image), [f["_editor"]], [f["image"]], queue=False,
                                api_visibility="private")
    outpaint = wire_generation(ctx, tab, tasks.outpaint, "outpaint", trigger=grab.success)
    wire_stop(ctx, tab, [inpaint, outpaint])


def _wire_png_info(ctx: Context, tab: Tab, t2i: Tab, tabs_block: gr.Tabs) -> None:
    f = tab.fields
    f["image"].change(plain(ctx, tasks.png_info), [readable_errors(f["image"], "image")], [f["_text"]], api_name="png_info",
                      concurrency_limit=None)
    targets = [k for k in ("prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale", "seed",
                           "width", "height", "clip_skip") if k in t2i.fields]

    def send(text: str):
        values = convert.infotext_fields(text)
        return (*[values.get(k, gr.skip()) for k in targets], gr.Tabs(selected="txt2img"))

    f["_send"].click(send, [f["_text"]], [*[t2i.fields[k] for k in targets], tabs_block], queue=False,
                     api_visibility="private")
