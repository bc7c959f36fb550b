"""The ControlNets of the models folder as the UI and the REST API use them: listed by A1111's "name [hash]"
title, validated without their weights (`unloaded`), loaded lazily and kept per pipeline (`ControlNets`, one
per app in `Context.controlnets`, so the page and the API share the loaded weights)."""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import ldm

MAX_CACHED = 3  # ControlNets kept loaded between requests (an SD 1.5 one is ~0.7-1.4 GB, an SDXL one ~2.5-5 GB)


class ControlNets:
    """Loaded ControlNets, per pipeline and file (reloaded when the file changes), least recently used first out."""

    def __init__(self, size: int = MAX_CACHED) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.loaded: OrderedDict[tuple, tuple[weakref.ref, ldm.ControlNet]] = OrderedDict()

    def get(self, pipe: Any, entry: Any) -> ldm.ControlNet:
        stat = entry.path.stat()
        key = (id(pipe), str(entry.path), stat.st_mtime_ns, entry.size)
        with self.lock:  # one load at a time: two requests for one model load it once
            # The pipeline itself must match: after a checkpoint switch a new one may reuse a released one's id.
            if key in self.loaded and self.loaded[key][0]() is pipe:
                self.loaded.move_to_end(key)
                return self.loaded[key][1]
            net = ldm.load_controlnet(entry.path, base=pipe)
            self.loaded[key] = (weakref.ref(pipe), net)
            while len(self.loaded) > self.size:
                self.loaded.popitem(last=False)
            return net


def unloaded(entry: Any) -> ldm.ControlNet:
    """A models-folder entry as a ControlNet without weights (named as ldm.load_controlnet names it): for its
    "name [hash]" title, and to validate a unit (weight, start/end, settings, image) before loading anything."""
    return ldm.ControlNet(None, entry.path.stem if entry.path.is_file() else entry.path.name, entry.path)


def titles(library: Any) -> list[str]:
    """The models folder's ControlNets as "name [hash]" (rescanned on every call); [] without a folder."""
    return [] if library is None else [unloaded(e).title for e in library.list("controlnets")]
