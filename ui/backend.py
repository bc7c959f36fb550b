"""Where a generation runs: the one seam between the handlers (ui.tasks, the REST API) and the library.

A handler describes one batch as a `Call` (a Pipeline task by name with its arguments: plain values and
PIL images, so it pickles) and hands it, with the front end's pipeline for that model, to the app's
`Backend`:

    result = ctx.backend.run(pipe, Call("txt2img", ("a cat",), {"seed": 1, "steps": 20}), callback)

`InProcess` (the default) runs it here on `pipe`. `scaleout.RayBackend` (`--backend ray`) sends the
same Call to a Ray Serve replica that has the same model loaded and streams the steps back, so
progress, previews and Stop behave the same (docs/scale-out.md). `slots` tells the model's queue
(ui.turns) how many calls may run at once: one per pipeline in process, one per replica on Ray.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ldm
from ldm.denoise import StepCallback

BACKENDS = ("inprocess", "ray")  # app.py's --backend choices

# The Pipeline tasks a Call may name: one table, read by both backends (the pipeline's own bound methods).
TASKS: dict[str, Callable[..., ldm.Result]] = {
    "txt2img": lambda pipe, *args, **kwargs: pipe.txt2img(*args, **kwargs),
    "img2img": lambda pipe, *args, **kwargs: pipe.img2img(*args, **kwargs),
    "inpaint": lambda pipe, *args, **kwargs: pipe.inpaint(*args, **kwargs),
    "outpaint": lambda pipe, *args, **kwargs: pipe.outpaint(*args, **kwargs),
    "upscale": lambda pipe, *args, **kwargs: pipe.upscale(*args, **kwargs),
    "hires_fix": lambda pipe, *args, **kwargs: pipe.hires_fix(*args, **kwargs),
}


class ReplicaDied(RuntimeError):
    """The worker running a request went away (killed, out of memory, node lost). `started`: it had
    begun the request (so resending it would repeat work)."""

    def __init__(self, message: str, *, started: bool = True):
        super().__init__(message)
        self.started = started


@dataclass(frozen=True)
class Call:
    """One batch: `TASKS[task](pipe, *args, callback=..., **kwargs)`."""

    task: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "Call":
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if "callback" in self.kwargs:
            raise ValueError("a Call's callback is the backend's to give, not a keyword")
        return self

    def run(self, pipe: Any, callback: StepCallback | None) -> ldm.Result:
        return TASKS[self.task](pipe, *self.args, callback=callback, **self.kwargs)


class Backend:
    """Runs Calls. Subclasses: InProcess here, scaleout.RayBackend for Ray Serve."""

    name = "inprocess"

    def run(self, pipe: Any, call: Call, callback: StepCallback) -> ldm.Result:
        """Run `call` for the model `pipe` is; `callback(step, total, latents) -> stop?` every step
        (latents: at least the first image's). Raises ldm.Cancelled when the callback asked to stop."""
        raise NotImplementedError

    def slots(self, pipe: Any) -> int:
        """How many calls for `pipe`'s model may run at the same time."""
        return 1

    def describe(self) -> str:
        return "in process"

    def close(self) -> None:
        """Release what the backend started (nothing in process)."""


class InProcess(Backend):
    """Today's behaviour: the call runs on `pipe` in this process (one at a time per pipeline: ui.turns)."""

    def run(self, pipe: Any, call: Call, callback: StepCallback) -> ldm.Result:
        return call.validate().run(pipe, callback)
