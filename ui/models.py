"""Checkpoint and VAE switching: which model serves as the base model, changed only between requests.

`Models` remembers the loaded checkpoints (at most `max_loaded`, least recently used dropped first) and
how to load another one (`loader`, app.py's `ldm.load` with the app's device, dtype and options and the
models folder). A switch

* waits for its turn on the serving model's queue (`ui.turns`, the one every generation takes), so it
  happens between requests and no request sees parts of two models; the UI's events are serialised by
  Gradio's "gpu" concurrency group as well;
* checks the name in the models folder first (an unknown name changes nothing);
* releases the old model before loading the new one unless `max_loaded` keeps it: drops every reference
  the app holds (`ctx.pipes.base`, this cache, its queue), collects and empties the CUDA cache;
* on a failed load, loads the previous checkpoint again and raises `SwitchError` saying why, so the
  page shows the reason while the previous model keeps serving.

A VAE from the models folder is put on the serving checkpoint with `pipe.with_vae(name)` (shared
weights, other VAE); "Automatic" is the checkpoint's own.

Checkpoints are shown as A1111 titles them, "name [hash]" (10 hex of the SHA-256), once the hash is known:
the serving checkpoint is hashed in the background after it loads (`pipe.start_hashing()`: through the models
folder's hash cache, `ldm-hashes.json`, so the next start knows it; the thread holds no pipeline, so a switch
frees the old one even mid-hash), others show a hash only if that cache has it. No listing or request waits
for a hash.

The txt2img refiner (SDXL) is a checkpoint too: `refiner(name)` reuses a loaded one (the serving checkpoint,
or one kept by `max_loaded`) and otherwise loads it with the same loader into one refiner slot, kept for the
next request until another refiner is chosen. So with a refiner in use the memory holds the serving model,
the refiner, and any others `max_loaded` keeps. Switching the checkpoint to the refiner in the slot moves it
out of the slot instead of loading it again.

The handlers at the end (`switch_model`, `model_choices`) are the UI's and the API's (`/switch_model`).
"""
from __future__ import annotations

import gc
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ldm.faults import free_memory
from ldm.loading import checkpoint_family

if TYPE_CHECKING:
    from .state import Context

log = logging.getLogger(__name__)
AUTOMATIC = "Automatic"
NO_REFINER = "None"
REFINER_FAMILIES = ("sdxl", "sdxl-refiner")  # what can refine an SDXL image (ldm.extensions.refiner)
TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")  # A1111's "name [hash]"


class SwitchError(ValueError):
    """A checkpoint or VAE that cannot be switched to; the message says which model serves now."""


class LoadFailed(SwitchError):
    """The checkpoint or VAE was found but failed to load (a broken file, too little memory): not the asker's fault."""


class Models:
    """The loaded checkpoints by name (plain, with their own VAE) and the current checkpoint/VAE choice.

    pipe: the start-up model; spec: what loads it again (the --model value; default its path);
    loader(spec) -> a pipeline, None = no checkpoint switching (VAE switching still works);
    library: the models folder whose checkpoints and VAEs are offered (default the pipeline's)."""

    def __init__(self, pipe: Any, *, loader: Callable[[str], Any] | None = None, spec: str | None = None,
                 max_loaded: int = 1, library: Any = None):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.library = library if library is not None else pipe.library
        self.loader = loader
        self.max_loaded = max_loaded
        self.checkpoint = str(pipe.name)
        self.vae = pipe.components.vae_name or AUTOMATIC
        self.specs = {self.checkpoint: str(spec or pipe.components.path)}  # name -> what the loader takes
        self.loaded: OrderedDict[str, Any] = OrderedDict({self.checkpoint: pipe})  # most recently used last
        self.lock = threading.Lock()  # one switch at a time
        self.hashing: dict[str, Any] = {}  # checkpoint name -> its weights' hash handle (`.known`), from `_hash_later`
        self.refiner_slot: tuple[str, Any] | None = None  # (name, pipeline) of the last refiner loaded
        self.refiner_lock = threading.Lock()
        self._families: dict[tuple, str | None] = {}  # (path, mtime, size) -> checkpoint_family: headers read once
        self._hash_later(self.checkpoint, pipe)

    # ---- what can be chosen -----------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        """The start-up model, then the models folder's checkpoints (rescanned on every call)."""
        found = [e.name for e in self.library.checkpoints] if self.library is not None else []
        return list(dict.fromkeys([*self.specs, *found]))

    def vaes(self) -> list[str]:
        return [AUTOMATIC, *([e.name for e in self.library.vaes] if self.library is not None else [])]

    def titled(self) -> list[tuple[str, str]]:
        """(title, name) for every checkpoint: what the dropdown shows and what it hands back."""
        entries = {e.name: e for e in self.library.checkpoints} if self.library is not None else {}
        names = list(dict.fromkeys([*self.specs, *entries]))
        return [(self._title(n, entries.get(n)), n) for n in names]

    def title(self, name: str) -> str:
        """A1111's title of one checkpoint: "name [hash]" when the hash is known, else the name."""
        return self._title(name, self._entry(name))

    def refiner_choices(self) -> list[tuple[str, str]]:
        """(title, name) of the checkpoints that can refine SDXL images (SDXL refiners and bases), read from their
        folder layout or file header; "None" first."""
        paths = {e.name: e.path for e in self.library.checkpoints} if self.library is not None else {}
        paths = {**{n: s for n, s in self.specs.items() if n not in paths}, **paths}
        sdxl = [(t, n) for t, n in self.titled() if self._family(paths.get(n, n)) in REFINER_FAMILIES]
        return [(NO_REFINER, NO_REFINER), *sdxl]

    def _family(self, path: Any) -> str | None:
        try:
            st = os.stat(path)
        except OSError:  # a hub id or a file gone: not offered
            return None
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._families:
            self._families[key] = checkpoint_family(path)
        return self._families[key]

    def refiner(self, name: str) -> Any:
        """The pipeline of checkpoint `name` to use as a refiner (see the module's note on memory)."""
        name = self.resolve(name)
        if name in self.loaded:
            return self.loaded[name]
        with self.refiner_lock:
            if self.refiner_slot is not None and self.refiner_slot[0] == name:
                return self.refiner_slot[1]
            self._check_name(name)  # an unknown name lists close ones
            self.refiner_slot = None  # the previous refiner goes before the next loads
            free_memory()
            try:
                pipe = self.loader(self.specs[name])
            except Exception as exc:  # noqa: BLE001 - any failure is the request's error; the base still serves
                raise LoadFailed(f"could not load refiner {name}: {exc}") from None
            self.refiner_slot = (name, pipe)
            log.info("loaded refiner %s", name)
            return pipe

    def resolve(self, text: str) -> str:
        """A checkpoint as A1111 clients give it (title "name [hash]", name, or short hash) -> its name here;
        unknown text comes back without the hash, for `switch` to refuse with close names."""
        text = str(text).strip()
        match = TITLE.match(text)
        bare = match.group(1) if match else text
        for title, name in self.titled():
            if text in (title, name) or bare == name or title.endswith(f"[{text}]"):
                return name
        return bare

    def _entry(self, name: str) -> Any:
        """The models-folder entry called exactly `name` (no fuzzy matching), or None."""
        return next((e for e in self.library.checkpoints if e.name == name), None) if self.library is not None else None

    def known_hash(self, name: str) -> str | None:
        """Checkpoint `name`'s short hash if it is computed or in the folder's cache, else None (never waits)."""
        return self._known(name, self._entry(name))

    def _known(self, name: str, entry: Any) -> str | None:
        handle = self.hashing.get(name)
        return (handle.known if handle is not None else None) or (
            self.library.cached_short_hash(entry) if entry is not None else None)

    def _title(self, name: str, entry: Any) -> str:
        known = self._known(name, entry)
        return f"{name} [{known}]" if known else name

    def _hash_later(self, name: str, pipe: Any) -> None:
        """The serving checkpoint's short hash, on the library's background thread, unless already known."""
        if self.known_hash(name) is None:
            self.hashing[name] = pipe.start_hashing()

    # ---- switching --------------------------------------------------------------------------------

    def switch(self, ctx: "Context", checkpoint: str | None = None, vae: str | None = None) -> str:
        """Serve `checkpoint` (a name from `checkpoints()`, or its A1111 title or hash) with `vae` ("Automatic" or a
        name from `vaes()`); None keeps the current one. Returns a one-line status; raises SwitchError/ValueError."""
        checkpoint = self.resolve(checkpoint) if checkpoint else self.checkpoint
        vae = str(vae or self.vae).strip()
        with self.lock:
            turn = ctx.queues.enter(ctx.pipes.base, threading.Event(), "switch")  # waits for running requests
            try:
                if checkpoint != self.checkpoint:
                    self._check_name(checkpoint)
                    turn, held = None, turn
                    self._load_checkpoint(ctx, checkpoint, held)  # leaves the turn, whatever happens
                if vae != self.vae:
                    turn = ctx.queues.enter(ctx.pipes.base, threading.Event(), "switch") if turn is None else turn
                    self._put_vae(ctx, vae, turn)
                    turn = None
            finally:
                if turn is not None:
                    ctx.queues.leave(ctx.pipes.base, turn)
        return self.status()

    def status(self) -> str:
        vae = "" if self.vae == AUTOMATIC else f", VAE {self.vae}"
        kept = f" ({len(self.loaded)} of at most {self.max_loaded} kept loaded)" if self.max_loaded > 1 else ""
        return f"Serving {self.checkpoint}{vae}{kept}."

    def _check_name(self, name: str) -> None:
        if name in self.specs or name in self.loaded:
            return
        if self.loader is None:
            raise SwitchError(f"checkpoint switching is off (no loader); still serving {self.checkpoint}")
        if self.library is None:
            raise SwitchError(f"no models folder to find {name!r} in; start the app with --models-dir")
        self.library.find("checkpoints", name)  # UnknownModelName (a ValueError) listing close names
        self.specs[name] = name

    def _load_checkpoint(self, ctx: "Context", name: str, turn: Any) -> None:
        if name in self.loaded:  # kept by max_loaded: nothing to load
            self.loaded.move_to_end(name)
            self._serve(ctx, name, turn)
            return
        if self.loader is None:
            ctx.queues.leave(ctx.pipes.base, turn)
            raise SwitchError(f"checkpoint switching is off (no loader); still serving {self.checkpoint}")
        previous, vae = self.checkpoint, self.vae
        if self.max_loaded == 1:  # the serving model goes first: nothing serves until the new one is in
            old = ctx.pipes.base
            ctx.pipes.base = None
            ctx.queues.leave(old, turn)
            ctx.queues.forget(old)
            ctx.queues.forget(self.loaded.get(previous))
            del old
            turn = None
        self._evict(ctx, self.max_loaded - 1)
        with self.refiner_lock:  # the refiner slot's model becomes the serving one rather than loading a second copy
            held = self.refiner_slot if self.refiner_slot is not None and self.refiner_slot[0] == name else None
            if held is not None:
                self.refiner_slot = None
        try:
            pipe = held[1] if held is not None else self.loader(self.specs[name])
        except Exception as exc:  # noqa: BLE001 - any failure: the previous model serves (again)
            reason = f"could not load {name}: {exc}"
            log.warning("%s; serving %s", reason, previous)
            if turn is not None:
                ctx.queues.leave(ctx.pipes.base, turn)
            else:
                self._restore(ctx, previous, vae)
            raise LoadFailed(f"{reason} — still serving {previous}") from None
        self.loaded[name] = pipe
        del pipe
        self._serve(ctx, name, turn)

    def _evict(self, ctx: "Context", keep: int) -> None:
        """Drop the least recently used checkpoints until `keep` remain (the serving one is the most recent)."""
        while len(self.loaded) > keep:
            name, pipe = self.loaded.popitem(last=False)
            ctx.queues.forget(pipe)
            del pipe
            log.info("released checkpoint %s", name)
        free_memory()  # gc + the CUDA cache
        gc.collect()

    def _serve(self, ctx: "Context", name: str, turn: Any) -> None:
        old = ctx.pipes.base
        ctx.pipes.base = self.loaded[name]
        ctx.pipes.follow(name)
        self.checkpoint, self.vae = name, AUTOMATIC
        if old is not None:
            if turn is not None:
                ctx.queues.leave(old, turn)
            ctx.queues.forget(old)
        self._hash_later(name, ctx.pipes.base)
        log.info("serving checkpoint %s", name)

    def _restore(self, ctx: "Context", name: str, vae: str) -> None:
        """The previous checkpoint (and VAE) again after a failed load."""
        try:
            self.loaded[name] = self.loader(self.specs[name])
        except Exception as exc:  # noqa: BLE001
            raise LoadFailed(f"the previous checkpoint {name} could not be loaded again either: {exc}") from None
        ctx.pipes.base = self.loaded[name]
        ctx.pipes.follow(name)
        self.checkpoint, self.vae = name, AUTOMATIC
        if vae != AUTOMATIC:
            try:
                ctx.pipes.base, self.vae = self.loaded[name].with_vae(vae), vae
            except Exception:  # noqa: BLE001 - it loaded a moment ago; if not, the checkpoint's own serves
                log.warning("could not put VAE %s back on %s", vae, name)

    def _put_vae(self, ctx: "Context", vae: str, turn: Any) -> None:
        plain = self.loaded[self.checkpoint]
        try:
            new = plain if vae == AUTOMATIC else plain.with_vae(vae)
        except Exception as exc:  # noqa: BLE001 - the VAE in use stays
            ctx.queues.leave(ctx.pipes.base, turn)
            raise LoadFailed(f"could not load VAE {vae}: {exc} — still serving {self.checkpoint}"
                              f"{'' if self.vae == AUTOMATIC else ' with VAE ' + self.vae}") from None
        old = ctx.pipes.base
        ctx.pipes.base = new
        self.vae = vae
        ctx.queues.leave(old, turn)
        ctx.queues.forget(old)
        log.info("serving checkpoint %s with VAE %s", self.checkpoint, vae)


# ---- handlers (no Gradio): the UI's top bar and the /switch_model endpoint --------------------------


def switch_model(ctx: "Context", checkpoint: str = "", vae: str = "") -> str:
    """Serve another checkpoint and/or VAE ("Automatic" = the checkpoint's own) from the models folder, between
    requests; "" keeps the current one. Returns a status line; a name that fails to load is an error saying
    why, and the previous model keeps serving."""
    return ctx.models.switch(ctx, checkpoint or None, vae or None)


def model_choices(ctx: "Context") -> tuple[list[str], str, list[str], str]:
    """(checkpoints, current checkpoint, VAEs, current VAE), the folder rescanned (the refresh button)."""
    m = ctx.models
    return m.checkpoints(), m.checkpoint, m.vaes(), m.vae
