"""The Gradio web UI. `build(pipes, options)` returns the Blocks; app.py loads models and launches."""
from __future__ import annotations


def build(pipes, options=None):
    from .layout import build as _build  # gradio is imported only when the UI is built

    return _build(pipes, options)
