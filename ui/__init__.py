"""The Gradio web UI. `build(pipes, options)` returns the Blocks; app.py loads models and launches.

Modules: `state` (Pipes, Options, Context), `tasks` (the handlers, no Gradio), `streaming`, `jobs`,
`saving`, `convert`, `editor`, `choices`, `models` (checkpoint/VAE switching), `networks`
(LoRAs/embeddings panel data); `widgets`, `endpoints`, `layout` (the Blocks);
`errors` (every handler's errors as messages); `gradio_compat` (every patch of Gradio); `security`,
`limits` and `tempfiles` (serving).
"""
from __future__ import annotations


def build(pipes, options=None, models=None):
    from .layout import build as _build  # gradio is imported only when the UI is built

    return _build(pipes, options, models)
