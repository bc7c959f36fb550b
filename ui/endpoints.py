"""Handler -> Gradio function: the adapters that give `ui.tasks` handlers to Gradio events.

Each keeps the handler's own parameter names (they become the API's), turns every error into an
escaped gr.Error message (`ui.errors`), and for streaming handlers turns `Step`s and the final
`Output` into values for a `Results` panel.
"""
from __future__ import annotations

import html
import inspect
import time
from collections.abc import Callable

import gradio as gr

from .errors import failed_text, mark, readable, user_error
from .state import Context
from .streaming import Output, Step
from .widgets import Results

STATUS_EVERY = 0.5  # seconds between status-line updates


def api_params(handler: Callable) -> list[inspect.Parameter]:
    """The handler's API parameters: everything but the context and keyword-only plumbing."""
    params = list(inspect.signature(handler).parameters.values())[1:]
    return [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def int_params(handler: Callable) -> set[str]:
    """The API parameters the handler takes as whole numbers (annotated `int` or `int | None`)."""
    return {p.name for p in api_params(handler) if str(p.annotation).replace(" ", "") in ("int", "int|None")}


def endpoint(ctx: Context, handler: Callable) -> Callable:
    """Wrap a streaming handler as a Gradio generator function for a `Results` panel, with the
    handler's own parameter names (they become the API's) plus the request (for Stop) and progress."""
    public = api_params(handler)
    names = [p.name for p in public]

    def fn(*args):
        *values, request, progress = args
        session = getattr(request, "session_hash", None) or ""
        started = last = time.monotonic()
        yield Results.status_only("Running…")  # never "idle" while a job starts
        try:
            for item in handler(ctx, **dict(zip(names, values)), session=session, user=user_of(request)):
                now = time.monotonic()
                if isinstance(item, Step):
                    progress((item.step, item.total), desc=_step_label(item))
                    # Gradio hides its bar once a stream has yielded, so a status line carries
                    # step and ETA too; throttled, it is one small message every half second.
                    if item.preview is not None or now - last >= STATUS_EVERY:
                        last = now
                        yield Results.step(item, now - started)
                else:
                    if not item.partial:
                        _notify(item)
                    yield Results.values(item, now - started)
        except Exception as exc:  # noqa: BLE001 - every error is a message (ui.errors)
            yield Results.status_only(failed_text(exc))  # in the page, next to the action
            raise user_error(exc) from None

    extra = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ]
    fn.__signature__ = inspect.Signature(public + extra)
    fn.__annotations__ = {"request": gr.Request}
    fn.__name__ = handler.__name__
    fn.__doc__ = handler.__doc__
    return mark(fn)


def plain(ctx: Context, handler: Callable) -> Callable:
    """A non-streaming handler, its errors shown as gr.Error."""

    def fn(*args):
        return handler(ctx, *args)

    wrapped = readable(fn)
    wrapped.__signature__ = inspect.Signature(api_params(handler))
    wrapped.__name__ = handler.__name__
    return wrapped


def user_of(request: gr.Request | None) -> str | None:
    """The logged-in user of a request (None without auth)."""
    return getattr(request, "username", None) if request is not None else None


def _step_label(step: Step) -> str:
    return f"batch {step.batch + 1}/{step.batch_count}" if step.batch_count > 1 else "sampling"


def _notify(out: Output) -> None:
    for w in out.warnings:
        gr.Warning(html.escape(w))
    if out.stopped:
        gr.Info(f"Stopped; kept {len(out.images)} finished image(s).")
