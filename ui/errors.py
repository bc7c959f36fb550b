"""Every handler's errors as messages for people.

Gradio shows a gr.Error's message (as HTML) and, with `show_error=False`, replaces anything else by
`{"error": null}`: the caller learns nothing. `readable(fn)` wraps a function wired to an event so
that whatever it raises reaches the caller as a gr.Error (plain text, no toast: the page shows it
in the tab's status line, `explain` and `ui.endpoints`): ldm's ValueErrors and user-facing
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

from .backend import ReplicaDied

log = logging.getLogger(__name__)

# Runtime errors whose ldm message tells the user what to change (smaller size, VAE tiling, ...).
USER_FACING: tuple[type[Exception], ...] = (ldm.OutOfMemory, ldm.DecodeError, ReplicaDied)


def user_error(exc: Exception) -> gr.Error:
    """-> the gr.Error the caller sees for `exc`: the plain message for API clients, not shown as a
    toast (a toast renders HTML, and the page shows the message in the tab's status line instead)."""
    if isinstance(exc, gr.Error):
        return exc
    return gr.Error(message(exc), visible=False)


def message(exc: Exception) -> str:
    """The plain-text message for `exc` (what a status line shows; unexpected errors are logged)."""
    if isinstance(exc, gr.Error):
        return html.unescape(exc.message)
    if isinstance(exc, (ValueError, *USER_FACING)):
        return str(exc)
    log.error("unexpected error in a handler", exc_info=exc)
    return f"internal error ({type(exc).__name__}); the details are in the server log"


def failed_text(exc: Exception) -> str:
    """The status line after an error: never "Done" (the page shows it next to the action)."""
    return f"Failed: {message(exc)}"


def explain(fn: Callable) -> Callable:
    """For a `.failure()` listener with `fn`'s inputs: runs `fn` again (UI-only steps are cheap) and
    returns `failed_text` of its error for the tab's status line (Gradio 6.31 shows no message in
    the page for a failed event)."""

    @functools.wraps(fn)
    def why(*args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - the message is the point
            return failed_text(exc)
        return gr.skip()

    return mark(why)


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
