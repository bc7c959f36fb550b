"""Every handler's errors as messages for people.

Gradio shows a gr.Error's message (as HTML) and, with `show_error=False`, replaces anything else by
`{"error": null}`: the caller learns nothing. `readable(fn)` wraps a function wired to an event so
that whatever it raises reaches the caller as an escaped gr.Error: ldm's ValueErrors and user-facing
runtime errors with their message, anything unexpected as "internal error (<type>)" with the
traceback in the server log. Every function `ui.layout` wires is wrapped (tests/test_web_abuse.py
checks `demo.fns`); a wrapped function carries `readable_errors = True`.
"""
from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable

import gradio as gr

import ldm

log = logging.getLogger(__name__)

# Runtime errors whose ldm message tells the user what to change (smaller size, VAE tiling, ...).
USER_FACING: tuple[type[Exception], ...] = (ldm.OutOfMemory, ldm.DecodeError)


def user_error(exc: Exception) -> gr.Error:
    """-> the gr.Error the caller sees for `exc` (gr.Error renders HTML: messages are escaped)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (ValueError, *USER_FACING)):
        return gr.Error(html.escape(str(exc)))
    log.error("unexpected error in a handler", exc_info=exc)
    return gr.Error(f"internal error ({html.escape(type(exc).__name__)}); the details are in the server log")


def mark(fn: Callable) -> Callable:
    fn.readable_errors = True
    return fn


def readable(fn: Callable) -> Callable:
    """`fn` (not a generator) with every error raised as `user_error(exc)`; same signature and hints."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - each becomes a message; unexpected ones are logged
            raise user_error(exc) from None

    return mark(wrapped)
