"""Running one ldm call in a worker thread and streaming its progress: `Step`s (step counts and an
occasional cheap latent preview) while it runs, then the call's result; a handler's final `Output`;
and the status-line texts shown for both.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ldm.latents import preview as latent_preview

log = logging.getLogger(__name__)


@dataclass
class Step:
    step: int
    total: int
    batch: int = 0  # which batch of `batch_count` is running
    batch_count: int = 1
    preview: Image.Image | None = None


@dataclass
class Output:
    images: list[str | Image.Image]  # PNG paths (with infotext) or images that could not be written
    infotexts: list[str]
    seeds: list[int]
    warnings: list[str] = field(default_factory=list)
    stopped: bool = False
    partial: bool = False  # the finished batches of a run still going (shown, so Stop keeps them)

    @property
    def info(self) -> str:
        return self.infotexts[0] if self.infotexts else ""


StepCallback = Callable[[int, int, Any], bool]


PREVIEW_SIDE = 128  # latents are 1/4..1/8 of the image; enlarge small previews so they are visible


_PREVIEWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def previewer(pipe):
    """How live previews of `pipe` are drawn (`ldm.Pipeline.previewer`: its VAE when small, a TAESD decoder
    from the models folder, or a fitted linear map), made once per loaded model; call it while holding the
    model's turn. None (the generic SD colours) if that fails."""
    if pipe not in _PREVIEWERS:
        try:
            _PREVIEWERS[pipe] = pipe.previewer()
        except Exception:  # noqa: BLE001 - previews fall back to the generic colours
            log.warning("could not set up previews for %s", pipe.name, exc_info=True)
            _PREVIEWERS[pipe] = None
    return _PREVIEWERS[pipe]


def preview_image(latents, draw=None) -> Image.Image:
    """A preview of the first image in the batch by `draw` (a `previewer`), else the generic latent colours,
    enlarged by a whole factor."""
    pixels = draw(latents) if draw is not None else latent_preview(latents[:1])[0]
    image = Image.fromarray(pixels.numpy())
    factor = max(1, PREVIEW_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def stream_call(call: Callable[[StepCallback], Any], cancel: threading.Event, preview_every: int,
                abandon_after: float | None = None, draw=None) -> Iterator[Step | Any]:
    """Run `call(callback)` in a worker thread; yield `Step`s as it progresses, then its return value.

    The callback returns the cancel flag, which is how ldm stops between steps. The flag is set
    when the consumer closes this generator (Stop, closed tab) or stops reading from it for
    `abandon_after` seconds (a cancel that never reached the generator). `draw`: the model's
    `previewer`.
    """
    cond = threading.Condition()
    state: dict[str, Any] = {"step": None, "preview": None, "done": False, "result": None, "error": None,
                             "read": time.monotonic()}

    def callback(step: int, total: int, latents) -> bool:
        # Previews only every few steps, and never on the last (the decoded image follows).
        image = preview_image(latents, draw) if preview_every and step % preview_every == 0 and step < total else None
        with cond:
            state["step"] = (step, total)
            state["preview"] = image or state["preview"]
            cond.notify()
            if abandon_after is not None and time.monotonic() - state["read"] > abandon_after:
                cancel.set()
        return cancel.is_set()

    def work() -> None:
        try:
            result = call(callback)
            with cond:
                state["result"] = result
        except BaseException as exc:  # handed to the consumer thread
            with cond:
                state["error"] = exc
        finally:
            with cond:
                state["done"] = True
                cond.notify()

    threading.Thread(target=work, daemon=True, name="ldm-task").start()
    finished = False
    try:
        while True:
            with cond:
                state["read"] = time.monotonic()
                cond.wait_for(lambda: state["step"] is not None or state["done"], timeout=1.0)
                state["read"] = time.monotonic()
                step, image, finished = state["step"], state["preview"], state["done"]
                state["step"] = state["preview"] = None
            if step is not None:
                yield Step(step[0], step[1], preview=image)
            if finished:
                break
    finally:
        if not finished:
            cancel.set()
    if state["error"] is not None:
        raise state["error"]
    yield state["result"]


def progress_text(step: Step, elapsed: float) -> str:
    """"Step 12/20 · batch 1/2 · 3 s, ~9 s left" (the ETA assumes every batch runs as many steps)."""
    done = step.batch * step.total + step.step
    remaining = elapsed / done * (step.batch_count * step.total - done) if done else None
    batch = f" · batch {step.batch + 1}/{step.batch_count}" if step.batch_count > 1 else ""
    eta = f", ~{_seconds(remaining)} left" if remaining is not None else ""
    return f"Step {step.step}/{step.total}{batch} · {_seconds(elapsed)}{eta}"


def done_text(out: Output, elapsed: float) -> str:
    n = len(out.images)
    what = f"{n} image{'s' if n != 1 else ''} in {_seconds(elapsed)}"
    return f"Running: {what} so far" if out.partial else f"Stopped: {what}" if out.stopped else f"Done: {what}"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def run(gen: Iterator[Step | Output]) -> Output:
    """Drain a handler generator and return its Output (tests, scripts)."""
    out = None
    for item in gen:
        out = item
    if not isinstance(out, Output):
        raise RuntimeError("handler ended without an output")
    return out
