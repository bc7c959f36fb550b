"""The ControlNet accordion of the txt2img, img2img and inpaint tabs: `UNITS` units, each with enable, model
(the models folder's ControlNet/, refreshable), image, preprocessor and its settings, weight, start, end,
control mode, resize mode, and a preview of the control map. Its fields are named as the handlers'
`cn{i}_*` parameters (`ui.control`), so `ui.layout` wires them like every other field. Choices come from
ldm's tables through `ui.choices`; what a unit does lives in `ui.control` (no Gradio there).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

import ldm
from ldm.params import CONTROL_STEPS, CONTROL_WEIGHT

from . import choices, control
from .controlnets import titles
from .errors import failed_text, mark, readable
from .gradio_compat import library_range
from .ranges import slider
from .state import Context

SLOTS = ("setting_a", "setting_b")  # a preprocessor has at most two settings (A1111's threshold_a/b)


def slot_updates(preprocessor: str, *, defaults: bool) -> tuple:
    """The two setting sliders for `preprocessor`: label and range, hidden when it has no such setting; with
    `defaults`, also its default values (a user's choice; a pasted infotext brings its own values)."""
    pre = ldm.PREPROCESSORS.get(preprocessor)
    settings = pre.settings if pre is not None else ()
    out = []
    for slot in range(len(SLOTS)):
        if slot >= len(settings):
            out.append(gr.update(visible=False))
            continue
        s = settings[slot]
        extra = {"value": s.default} if defaults else {}
        out.append(gr.update(label=s.label, minimum=s.minimum, maximum=s.maximum, step=s.step, visible=True, **extra))
    return tuple(out)


def control_accordion(ctx: Context, name: str, size: tuple[Any, Any], *, uses_tab_image: bool) -> dict[str, Any]:
    """The accordion (call inside the tab's inputs column); `size` = the tab's width/height fields (the
    preview's size; 0 = the control image's own). Returns its fields by parameter name."""
    f: dict[str, Any] = {}
    models = titles(ctx.models.library)
    note = " (empty: the tab's image)" if uses_tab_image else ""
    with gr.Accordion("ControlNet", open=False, elem_id=f"{name}-controlnet"):
        refresh = gr.Button("🔄 Refresh models", size="sm", elem_id=f"{name}-cn-refresh")
        dropdowns = []
        with gr.Tabs():
            for i in range(control.UNITS):
                with gr.Tab(f"Unit {i}", elem_id=f"{name}-cn{i}"):
                    f |= _unit(ctx, name, i, models, note, size)
                    dropdowns.append(f[control.param(i, "model")])

    def refreshed():
        found = titles(ctx.models.library)
        return tuple(gr.update(choices=found) for _ in dropdowns)

    refresh.click(readable(refreshed), None, dropdowns, queue=False, api_visibility="private")
    return f


def _unit(ctx: Context, name: str, i: int, models: list[str], note: str, size: tuple[Any, Any]) -> dict[str, Any]:
    eid = f"{name}-cn{i}"
    d = control.UnitValues()
    enabled = gr.Checkbox(value=d.enabled, label="Enable", elem_id=f"{eid}-enabled")
    with gr.Row():
        image = gr.Image(label=f"Control image{note}", type="filepath", image_mode=None, format="png", height=220,
                         sources=["upload", "clipboard"], elem_id=f"{eid}-image")
        shown = gr.Image(label="Control map (preview)", type="pil", format="png", interactive=False, height=220,
                         elem_id=f"{eid}-map")
    with gr.Row(equal_height=True):
        preprocessor = gr.Dropdown(choices.CONTROL_PREPROCESSORS, value=d.preprocessor, label="Preprocessor",
                                   elem_id=f"{eid}-preprocessor")
        # Custom values pass through (a pasted infotext's model that is not in the folder): the run names the choices.
        model = gr.Dropdown(models, value=models[0] if models else None, label="Model", allow_custom_value=True,
                            elem_id=f"{eid}-model")
        show = gr.Button("💥 Preview map", scale=0, min_width=120, elem_id=f"{eid}-preview")
    # Hidden until a preprocessor with settings is chosen, which shows its defaults (slot_updates; a pasted
    # infotext brings its values, ui.control fills in the defaults of those it does not give). ldm checks each
    # setting's range (ldm.control_preprocess); the API's default is None: the preprocessor's default.
    with gr.Row():
        sliders = [library_range(gr.Slider(0, 255, value=0, step=1, label=slot, visible=False, elem_id=f"{eid}-{slot}"),
                                 unset=True) for slot in SLOTS]
    with gr.Row():
        weight = slider(CONTROL_WEIGHT, value=d.weight, step=0.05, label="Control weight", elem_id=f"{eid}-weight")
        start = slider(CONTROL_STEPS, value=d.start, step=0.01, label="Starting control step", elem_id=f"{eid}-start")
        end = slider(CONTROL_STEPS, value=d.end, step=0.01, label="Ending control step", elem_id=f"{eid}-end")
    control_mode = gr.Radio(choices.CONTROL_MODES, value=d.control_mode, label="Control mode",
                            elem_id=f"{eid}-control-mode")
    resize = gr.Radio(choices.CONTROL_RESIZE, value=d.resize, label="Resize mode", elem_id=f"{eid}-resize")
    status = gr.Textbox(value="", show_label=False, interactive=False, container=False, elem_id=f"{eid}-status")

    # .input: the user picked a preprocessor -> its defaults; .change (also a paste): only labels and ranges.
    preprocessor.input(readable(lambda p: slot_updates(p, defaults=True)), preprocessor, sliders, queue=False,
                       api_visibility="private")
    preprocessor.change(readable(lambda p: slot_updates(p, defaults=False)), preprocessor, sliders, queue=False,
                        api_visibility="private")

    def preview(*values):
        try:
            return control.preview(ctx, *values), ""
        except Exception as exc:  # noqa: BLE001 - shown next to the button
            return gr.skip(), failed_text(exc)

    show.click(mark(preview), [image, preprocessor, *sliders, resize, *size], [shown, status], concurrency_limit=2,
               api_visibility="private")
    fields = {"enabled": enabled, "model": model, "image": image, "preprocessor": preprocessor,
              "setting_a": sliders[0], "setting_b": sliders[1], "weight": weight, "start": start, "end": end,
              "control_mode": control_mode, "resize": resize}
    return {control.param(i, k): v for k, v in fields.items()}
