"""Gradio Blocks: the tabs and their event wiring. What a button does lives in `ui.tasks`; the
widgets in `ui.widgets`; handler -> Gradio function in `ui.endpoints`; every reach into Gradio
beyond its public API in `ui.gradio_compat`.

Each action is a named API endpoint whose parameters are the handler's parameter names (the ldm
keyword names), so `gradio_client` users call e.g. `client.predict(prompt="...", steps=20,
api_name="/txt2img")`. Every input widget has a value, so every parameter but the images is optional.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from . import brush, control, convert, editor, header, history, page, tasks
from .endpoints import api_params, endpoint, int_params, plain
from .errors import explain, readable
from .gradio_compat import attach_context, blocks, check_image_headers, describe_api, readable_errors
from .model_widgets import model_bar, networks_panel, wire_model_bar, wire_networks
from .models import Models
from .state import Context, Options, Pipes
from .streaming import previewer
from .widgets import Results, Tab, img2img_tab, inpaint_tab, png_info_tab, txt2img_tab, upscale_tab

log = logging.getLogger(__name__)
GPU = "gpu"  # one concurrency group: one model run at a time, the rest wait in the queue


def _inputs(fields: dict[str, Any], handler: Callable) -> list:
    return [readable_errors(fields[p.name], p.name) for p in api_params(handler)]


def wire_generation(ctx: Context, tab: Tab, handler: Callable, api_name: str, trigger=None, button=None):
    """Connect a tab's button to its handler; returns the event (for Stop to cancel). The status line
    says "Queued" at the click (in the browser; Gradio's own position count shows on the gallery)."""
    r = tab.results
    fn = endpoint(ctx, handler)
    (button or tab.go).click(None, None, r.status, js=page.QUEUED_JS, queue=False, api_visibility="private")
    return (trigger or tab.go.click)(
        fn, _inputs(tab.fields, handler), r.outputs, api_name=api_name, concurrency_id=GPU,
        concurrency_limit=ctx.backend.slots(ctx.pipes.base), show_progress_on=[r.gallery],  # 1, or Ray's replicas
    )


def wire_results(ctx: Context, tab: Tab) -> None:
    r = tab.results

    def on_select(infotexts: list, evt: gr.SelectData):
        return evt.index, convert.selected(infotexts, evt.index, "")

    r.gallery.select(readable(on_select), [r.infotexts], [r.index, r.info], queue=False, api_visibility="private")
    if "_reuse" in tab.fields:
        tab.fields["_reuse"].click(readable(lambda seeds, i: convert.selected(seeds, i, -1)), [r.seeds, r.index], tab.fields["seed"],
                                   queue=False, api_visibility="private")


STOP_WAIT = 10.0  # seconds Stop waits for the model's next step before the page stops listening to the run


def wire_stop(ctx: Context, tab: Tab, events: list) -> None:
    """Stop: the flag stops the model at its next step; once it has (or after STOP_WAIT), Gradio cancels the
    events, which also drops this session's queued ones. In that order: Gradio's page sends an event's cancels
    alongside its function, and then a progress message still on its way could land after "Stopped." and stay
    (the cancel drops the run's own last word)."""
    r = tab.results

    def stop_runs(request: gr.Request):
        session = getattr(request, "session_hash", None) or ""
        n = ctx.jobs.stop(session, STOP_WAIT)
        log.info("stop: %d run(s) of session %s asked to stop", n, session)
        return ("Stopped." if n else "Nothing to stop."), None

    stopped = tab.stop.click(readable(stop_runs), None, [r.status, r.preview], queue=False, api_visibility="private")
    stopped.then(None, None, None, cancels=events, queue=False, api_visibility="private")


def wire_send_to(tabs: dict[str, Tab], tabs_block: gr.Tabs, extra: tuple = ()) -> None:
    """Gallery -> another tab: the selected image plus its prompt and sampler settings. `extra`: more
    galleries with the same named parts as a `Results` (the History tab's)."""
    for r in [*(tab.results for tab in tabs.values()), *extra]:
        for target, button in (("img2img", r.send_img2img), ("inpaint", r.send_inpaint), ("upscale", r.send_upscale)):
            dest = tabs[target].fields
            keys = [k for k in SENT_FIELDS if k in dest]
            # inpaint: the editor and the brush-size number, fitted to the sent picture (ui.brush)
            image_fields = [dest["_editor"], dest["_brush_size"]] if target == "inpaint" else [dest["image"]]
            send = _sender(target, keys)
            event = button.click(readable(send), [r.gallery, r.index, r.infotexts],
                                 [*image_fields, *[dest[k] for k in keys], tabs_block], queue=False,
                                 api_visibility="private")
            explain_failure(event, send, [r.gallery, r.index, r.infotexts], r.status)


def explain_failure(event, fn: Callable, inputs: list, status) -> None:
    """When a UI-only step fails, its message goes to the tab's status line, next to the action."""
    event.failure(explain(fn), inputs, status, queue=False, api_visibility="private")


SENT_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale", "seed", "width",
               "height") + control.pasted_names()


def _sender(target: str, keys: list[str]) -> Callable:
    def send(gallery, index, infotexts):
        path = convert.selected_image(gallery, index)
        if path is None:
            raise gr.Error("no image to send: generate one first")
        text = convert.selected(infotexts, index, "")
        values = convert.infotext_fields(text) | control.infotext_values(text)
        image = brush.sent(path) if target == "inpaint" else (path,)
        return (*image, *[values.get(k, gr.skip()) for k in keys], gr.Tabs(selected=target))

    return send


def cache_policy(max_age: float) -> tuple[int, int] | None:
    """Gradio's delete_cache=(every, older_than): uploads and cached results of this app."""
    if not max_age or max_age <= 0:
        return None
    return max(1, int(min(max_age / 2, 600))), max(1, int(max_age))


def build(pipes: Pipes, options: Options | None = None, models: Models | None = None) -> gr.Blocks:
    """The whole UI for already-loaded pipelines; call `.launch()` on the result. `models` switches
    checkpoints (`ui.models`; default: the base model's VAEs only)."""
    ctx = Context(pipes, options or Options(), models=models)
    if ctx.options.preview_every:  # at load, before any run: how the base model's previews are drawn
        previewer(pipes.base)
    with blocks(title="ldm — text to image", delete_cache=cache_policy(ctx.options.cache_max_age), css=page.CSS,
                head=page.KEYS_JS) as demo:
        gr.Markdown("### ldm")
        # Model, family, native size (and the demo model's note), read at each page load: follows switches.
        gr.Markdown(readable(lambda: header.model_line(ctx.pipes.base, ctx.pipes.inpaint, ctx.pipes.upscale)),
                    elem_id="model-header")
        bar = model_bar(ctx)
        with gr.Tabs() as tabs_block:
            with gr.Tab("txt2img", id="txt2img"):
                t2i = txt2img_tab(ctx)
                t2i_networks = networks_panel(ctx, "txt2img")
            with gr.Tab("img2img", id="img2img"):
                i2i = img2img_tab(ctx)
                i2i_networks = networks_panel(ctx, "img2img")
            with gr.Tab("Inpaint", id="inpaint"):
                inp = inpaint_tab(ctx)
            with gr.Tab("Upscale", id="upscale"):
                up = upscale_tab(ctx)
            with gr.Tab("PNG info", id="png_info"):
                info = png_info_tab(ctx)
            with gr.Tab("History", id="history") as history_tab:
                past = history.history_panel()
        tabs = {"txt2img": t2i, "img2img": i2i, "inpaint": inp, "upscale": up}

        for name, handler in (("txt2img", tasks.txt2img), ("img2img", tasks.img2img), ("upscale", tasks.upscale)):
            event = wire_generation(ctx, tabs[name], handler, name)
            wire_stop(ctx, tabs[name], [event])
        _wire_inpaint(ctx, inp)
        for tab in tabs.values():
            wire_results(ctx, tab)
        wire_send_to(tabs, tabs_block, (past,))
        history.wire_history(history.History(ctx.saver), past, history_tab)
        _wire_png_info(ctx, info, t2i, tabs_block)
        wire_model_bar(ctx, bar, GPU)
        wire_networks(ctx, t2i_networks, t2i.fields["prompt"])
        wire_networks(ctx, i2i_networks, i2i.fields["prompt"])
    for block in demo.blocks.values():  # every image input, whichever event it feeds
        check_image_headers(block)
    describe_api(demo, {**{name: (int_params(handler), Results.API_NAMES) for name, handler in GENERATION.items()},
                        "png_info": (set(), ("infotext",))},
                 optional_images=tuple(n for n in control.param_names() if n.endswith("_image")),
                 unset_defaults=tuple(n for n in control.param_names() if n.endswith(("_setting_a", "_setting_b"))))
    demo.queue(max_size=ctx.options.queue_size, default_concurrency_limit=1)
    return attach_context(demo, ctx)  # for tests and app.py


GENERATION = {"txt2img": tasks.txt2img, "img2img": tasks.img2img, "inpaint": tasks.inpaint, "outpaint": tasks.outpaint,
              "upscale": tasks.upscale}  # api name -> handler


def _wire_inpaint(ctx: Context, tab: Tab) -> None:
    f = tab.fields

    # UI-only steps turn the editor into the files /inpaint and /outpaint take, then call them.
    convert = tab.go.click(readable(editor.editor_to_image_and_mask), [f["_editor"], f["_mask_upload"]],
                           [f["image"], f["mask"]], queue=False, api_visibility="private")
    explain_failure(convert, editor.editor_to_image_and_mask, [f["_editor"], f["_mask_upload"]], tab.results.status)
    inpaint = wire_generation(ctx, tab, tasks.inpaint, "inpaint", trigger=convert.success)
    grab = f["_outpaint"].click(readable(editor.editor_image), [f["_editor"]], [f["image"]], queue=False,
                                api_visibility="private")
    explain_failure(grab, editor.editor_image, [f["_editor"]], tab.results.status)
    outpaint = wire_generation(ctx, tab, tasks.outpaint, "outpaint", trigger=grab.success, button=f["_outpaint"])
    wire_stop(ctx, tab, [inpaint, outpaint])


def _wire_png_info(ctx: Context, tab: Tab, t2i: Tab, tabs_block: gr.Tabs) -> None:
    f = tab.fields
    f["image"].change(plain(ctx, tasks.png_info), [readable_errors(f["image"], "image")], [f["_text"]], api_name="png_info",
                      concurrency_limit=None)
    targets = [k for k in ("prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale", "seed",
                           "width", "height", "clip_skip", "hires_scale", "hires_strength", "hires_steps",
                           "hires_upscaler", "refiner", "refiner_switch_at", *control.pasted_names()) if k in t2i.fields]

    def send(text: str):
        values = convert.infotext_fields(text) | control.infotext_values(text)
        return (*[values.get(k, gr.skip()) for k in targets], gr.Tabs(selected="txt2img"))

    f["_send"].click(readable(send), [f["_text"]], [*[t2i.fields[k] for k in targets], tabs_block], queue=False,
                     api_visibility="private")
