"""The Ray Serve deployment: one replica = one process with the model loaded once, one request at a time.

A request is a `ui.backend.Call`; the model it needs travels as Serve's multiplexed model id (`model_id`:
the model's path or name plus its VAE), so Serve routes requests to replicas that have that model loaded
and a replica loads another one only when a request needs it (its least recently used is dropped past
`max_models`). `run` is a streaming method: it yields `Started` (which process serves), a `Progress` per
step (the first image's latents, for previews), then `Done` or `Failed`. When the front end cancels the
stream (Stop), the step callback returns "stop" and the run ends at its next step.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

import ldm
from ui.backend import Call


@dataclass(frozen=True)
class LoadSettings:
    """What the app's ldm.load gets besides the model (app.py's --device, --dtype, options, models folder)."""

    device: str | None
    dtype: str | None
    options: ldm.Options
    models_dir: str | None


@dataclass(frozen=True)
class Started:
    pid: int
    host: str


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    latents: Any  # the first image's latents (CPU float32), for the front end's preview


@dataclass(frozen=True)
class Done:
    result: ldm.Result


@dataclass(frozen=True)
class Failed:
    error: BaseException  # raised again in the front end, so it reads as it would in process


def model_id(pipe: Any) -> str:
    """The multiplexed id of the model `pipe` is: what ldm.load takes, and the VAE put on it."""
    c = pipe.components
    return json.dumps({"model": str(c.path), "vae": c.vae_name})


def open_model(key: str, settings: LoadSettings):
    spec = json.loads(key)
    pipe = ldm.load(spec["model"], device=settings.device, dtype=settings.dtype, options=settings.options,
                    models_dir=settings.models_dir)
    return pipe.with_vae(spec["vae"]) if spec["vae"] else pipe


class Generator:
    """One replica. `first` (the start-up model's id) is loaded in the constructor, so a replica is
    ready only when the model is; others load on first request."""

    def __init__(self, first: str, settings: LoadSettings, max_models: int = 1):
        self.preloaded = {first: open_model(first, settings)}
        self.busy = threading.Lock()  # a cancelled run may still finish its step: the next one waits

        async def load(key: str):
            if key in self.preloaded:
                return self.preloaded.pop(key)
            return await asyncio.to_thread(open_model, key, settings)

        self.model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    async def run(self, call: Call):
        yield Started(os.getpid(), socket.gethostname())
        try:
            pipe = await self.model(serve.get_multiplexed_model_id())
        except Exception as exc:  # noqa: BLE001 - a model that does not load: the front end shows why
            yield Failed(exc)
            return
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def callback(step: int, total: int, latents) -> bool:
            first = latents[:1].detach().to("cpu", torch.float32).clone()
            loop.call_soon_threadsafe(updates.put_nowait, Progress(step, total, first))
            return stop.is_set()

        def work():
            with self.busy:
                if stop.is_set():
                    raise ldm.Cancelled("stopped before it started")
                return call.validate().run(pipe, callback)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            try:
                yield Done(task.result())
            except Exception as exc:  # noqa: BLE001 - ldm's errors (and Cancelled) go back as they are
                yield Failed(exc)
        finally:
            stop.set()  # the stream was cancelled or closed (Stop): the run ends at its next step
