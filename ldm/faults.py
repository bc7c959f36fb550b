"""Turning resource failures into clear errors that leave the pipeline usable.

An out-of-memory error that escapes as-is keeps its traceback, and the traceback keeps every frame of
the failed call alive: activations, latents, embeddings. A server that logs or stores the exception
then holds that memory and every later request fails too. `guard_out_of_memory` catches the error
where the call ends, clears those frames, collects, empties the CUDA cache and raises `OutOfMemory`,
whose message says what to change.
"""
from __future__ import annotations

import functools
import gc
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch

ADVICE = ("try a smaller width/height or batch size, enable VAE tiling (ldm.load(..., vae_tiling=True)), "
          "or offload the model (ldm.load(..., offload='model'))")

# Markers of allocation failures that torch reports as plain RuntimeError (CPU allocator, MPS).
_OOM_TEXT = ("out of memory", "can't allocate memory", "failed to allocate")

F = TypeVar("F", bound=Callable)


class OutOfMemory(RuntimeError):
    """A generation ran out of memory. What it held has been released; the pipeline can run the next request."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def free_memory() -> None:
    """Collect now rather than at some later allocation, and hand cached CUDA blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemoryGuard:
    """Re-raise an out-of-memory error inside the block as `OutOfMemory`, after releasing its frames."""

    def __init__(self, detail: str = ""):
        self.detail = detail

    def __enter__(self) -> "OutOfMemoryGuard":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, OutOfMemory) or not is_out_of_memory(exc):
            return False
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        traceback.clear_frames(tb)  # drops the locals of every finished frame of the failed call
        exc.__traceback__ = None
        del exc, tb  # this frame ends up in the new error's traceback: it must not keep the old one alive
        free_memory()
        where = f" ({self.detail})" if self.detail else ""
        raise OutOfMemory(f"out of memory during generation{where}: {ADVICE}. [{reason}]") from None


def guard_out_of_memory(fn: F) -> F:
    """Decorator form: the wrapped call's own frame has finished when the error arrives, so it is freed too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with OutOfMemoryGuard(_describe(args)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _describe(args: tuple) -> str:
    """'512x768, batch 2' from the first argument that looks like GenerationParams."""
    for a in args:
        if all(hasattr(a, k) for k in ("width", "height", "batch_size")):
            return f"{a.width}x{a.height}, batch {a.batch_size}"
    return ""
