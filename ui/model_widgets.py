"""The models bar at the top of the page (checkpoint and VAE dropdowns with a refresh button, a status
line) and the extra-networks panel (LoRAs and embeddings; a click adds the tag to the prompt), with their
events. What they do lives in `ui.models` and `ui.networks` (no Gradio there).

Switching is also the named API endpoint `/switch_model(checkpoint, vae)` (and `/models` lists); it runs in the generation
concurrency group, so it waits for the run in progress and the next one waits for it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ldm.params import REFINER_SWITCH

from . import models, networks
from .errors import readable
from .ranges import slider
from .state import Context


@dataclass
class ModelBar:
    checkpoint: gr.Dropdown
    vae: gr.Dropdown
    refresh: gr.Button
    status: gr.Textbox


def model_bar(ctx: Context) -> ModelBar:
    m = ctx.models
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(m.titled(), value=m.checkpoint, label="Stable Diffusion checkpoint", scale=4,
                                 elem_id="model-checkpoint")  # shows A1111's "name [hash]", hands back the name
        refresh = gr.Button("🔄", scale=0, min_width=40, elem_id="model-refresh")
        vae = gr.Dropdown(m.vaes(), value=m.vae, label="SD VAE", scale=3, elem_id="model-vae")
        status = gr.Textbox(m.status(), show_label=False, interactive=False, container=False, scale=4,
                            elem_id="model-status")
    return ModelBar(checkpoint, vae, refresh, status)


def wire_model_bar(ctx: Context, bar: ModelBar, concurrency_id: str) -> None:
    def switch(checkpoint: str, vae: str):
        try:
            text = models.switch_model(ctx, checkpoint, vae)
        except ValueError as exc:  # the previous model serves: say why, put the dropdowns back
            gr.Warning(html.escape(str(exc)))
            text = f"⚠ {exc}"
        return text, gr.Dropdown(choices=ctx.models.titled(), value=ctx.models.checkpoint), ctx.models.vae

    def refresh():
        _, current, vaes, vae = models.model_choices(ctx)
        return gr.Dropdown(choices=ctx.models.titled(), value=current), gr.Dropdown(choices=vaes, value=vae)

    slots = ctx.backend.slots(ctx.pipes.base)  # the group's limit is its events' smallest: the generations' (ui.layout)
    for dropdown in (bar.checkpoint, bar.vae):
        dropdown.input(readable(switch), [bar.checkpoint, bar.vae], [bar.status, bar.checkpoint, bar.vae],
                       concurrency_id=concurrency_id, concurrency_limit=slots, api_visibility="private",
                       show_progress_on=[bar.status])
    bar.refresh.click(readable(refresh), None, [bar.checkpoint, bar.vae], queue=False, api_visibility="private")

    def switch_model(checkpoint: str = "", vae: str = "") -> str:
        return models.switch_model(ctx, checkpoint, vae)

    def list_models() -> dict:
        checkpoints, current, vaes, vae = models.model_choices(ctx)
        return {"checkpoints": checkpoints, "checkpoint": current, "vaes": vaes, "vae": vae}

    switch_model.__doc__ = models.switch_model.__doc__
    list_models.__doc__ = "The models folder's checkpoints and VAEs (rescanned) and the ones serving."
    gr.api(readable(switch_model), api_name="switch_model", concurrency_id=concurrency_id, concurrency_limit=slots)
    gr.api(readable(list_models), api_name="models", queue=False)


def refiner_accordion(ctx: Context, name: str) -> dict[str, Any]:
    """A1111's refiner (SDXL): a checkpoint of the models folder that takes over at "Switch at" of the steps
    (`refiner`, `refiner_switch_at` of the txt2img handler); 🔄 rescans the folder."""
    with gr.Accordion("Refiner", open=False, elem_id=f"{name}-refiner"):
        with gr.Row(equal_height=True):
            refiner = gr.Dropdown(ctx.models.refiner_choices(), value=models.NO_REFINER, allow_custom_value=True,
                                  label="Checkpoint (an SDXL refiner or base)", scale=4, elem_id=f"{name}-refiner-checkpoint")
            refresh = gr.Button("🔄", scale=0, min_width=40, elem_id=f"{name}-refiner-refresh")
        switch_at = slider(REFINER_SWITCH, value=0.8, step=0.01, label="Switch at (fraction of the steps)",
                           elem_id=f"{name}-refiner-switch-at")
    refresh.click(readable(lambda: gr.Dropdown(choices=ctx.models.refiner_choices())), None, refiner, queue=False,
                  api_visibility="private")
    return {"refiner": refiner, "refiner_switch_at": switch_at}


@dataclass
class NetworksPanel:
    table: gr.Dataset
    refresh: gr.Button


def networks_panel(ctx: Context, name: str) -> NetworksPanel:
    with gr.Accordion("Extra networks: LoRAs and embeddings (click one to add it to the prompt)", open=False,
                      elem_id=f"{name}-networks"):
        table = gr.Dataset(components=["textbox"] * len(networks.HEADERS), headers=networks.HEADERS,
                           samples=networks.network_rows(ctx), type="values", samples_per_page=20, layout="table",
                           elem_id=f"{name}-networks-table")
        refresh = gr.Button("🔄 Refresh list", size="sm", elem_id=f"{name}-networks-refresh")
    return NetworksPanel(table, refresh)


def wire_networks(ctx: Context, panel: NetworksPanel, prompt: gr.Textbox) -> None:
    def insert(row: list, text: str) -> str:
        return networks.insert_tag(text, row[0], row[1])

    panel.table.click(readable(insert), [panel.table, prompt], prompt, queue=False, api_visibility="private")
    panel.refresh.click(readable(lambda: gr.Dataset(samples=networks.network_rows(ctx))), None, panel.table,
                        queue=False, api_visibility="private")
