"""One first-come-first-served queue per loaded model, shared by the web UI and the REST API.

Gradio's queue orders the UI's own events, but API routes bypass it; both paths therefore take a
`Turn` on the model's `ModelQueue` before calling ldm (ldm runs one call at a time per pipeline).
A turn carries what everyone else may want to see or do to it: where it came from, its progress
and latest preview, and the flags that stop it (`interrupt` ends the run, `skip` only the current
batch), whoever started it.

    turn = queues.join(pipe, Turn("api", cancel))   # QueueFull when too many are waiting
    if queues.wait(turn):                            # False: cancelled while waiting
        ... run, calling turn.update(step, total, batch, batch_count, preview) ...
    queues.leave(turn)

A queue runs `slots()` turns at once: 1 for a model in this process, one per replica when the
backend is Ray Serve (ui.backend), so the waiting line and its size limit cover the whole service.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count(1)


class QueueFull(RuntimeError):
    """Too many requests are already waiting for this model."""


@dataclass(eq=False)
class Turn:
    origin: str  # "ui", "api", "job"
    cancel: threading.Event = field(default_factory=threading.Event)  # the whole run
    number: int = field(default_factory=lambda: next(_ids))
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    step: int = 0
    total: int = 0
    batch: int = 0
    batch_count: int = 1
    preview: Any = None  # latest cheap latent preview (PIL image) or None
    # The current batch's stop flag; `skip` sets only this one. Runs without batches of their own
    # (the UI) leave it as `cancel`, so for them skip stops the run like interrupt.
    current: threading.Event | None = None

    def __post_init__(self) -> None:
        if self.current is None:
            self.current = self.cancel

    def update(self, step: int, total: int, batch: int = 0, batch_count: int = 1, preview: Any = None) -> None:
        self.step, self.total, self.batch, self.batch_count = step, total, batch, batch_count
        if preview is not None:
            self.preview = preview

    def progress(self) -> float:
        """Share of the run done, 0..1 (every batch assumed as long as the current one)."""
        if not self.total:
            return 0.0
        return min(1.0, (self.batch * self.total + self.step) / (self.batch_count * self.total))

    def eta(self) -> float | None:
        """Seconds left, from the pace so far; None before the first step."""
        done = self.progress()
        if self.started_at is None or done <= 0:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed / done * (1 - done)

    def interrupt(self) -> None:
        self.cancel.set()
        self.current.set()

    def skip(self) -> None:
        self.current.set()


class ModelQueue:
    """The turns waiting for, and the ones running on, one model (FIFO; `slots()` run at once)."""

    def __init__(self, max_waiting: int, slots: Callable[[], int] = lambda: 1) -> None:
        self.max_waiting = max_waiting
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: deque[Turn] = deque()
        self._running: list[Turn] = []

    @property
    def running(self) -> Turn | None:
        """The longest-running turn (None: none runs)."""
        with self._cond:
            return self._running[0] if self._running else None

    def runners(self) -> list[Turn]:
        with self._cond:
            return list(self._running)

    def join(self, turn: Turn, *, limit: bool = True) -> Turn:
        with self._cond:
            if limit and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting); try again later")
            self._waiting.append(turn)
            self._cond.notify_all()
        return turn

    def wait(self, turn: Turn) -> bool:
        """Block until `turn` runs (True) or is cancelled while waiting (False, and it leaves the queue)."""
        with self._cond:
            while len(self._running) >= max(1, self.slots()) or self._waiting[0] is not turn:
                if turn.cancel.is_set():
                    self._waiting.remove(turn)
                    self._cond.notify_all()
                    return False
                self._cond.wait(0.25)
            self._waiting.popleft()
            self._running.append(turn)
            turn.started_at = time.monotonic()
            return True

    def leave(self, turn: Turn) -> None:
        with self._cond:
            if turn in self._running:
                self._running.remove(turn)
            elif turn in self._waiting:
                self._waiting.remove(turn)
            self._cond.notify_all()

    def waiting(self) -> list[Turn]:
        with self._cond:
            return list(self._waiting)

    def position(self, turn: Turn) -> int | None:
        """0 = running, n = n-th in line, None = not in this queue."""
        with self._cond:
            if turn in self._running:
                return 0
            return next((i + 1 for i, t in enumerate(self._waiting) if t is turn), None)


class Queues:
    """A `ModelQueue` per loaded pipeline (by identity), created on first use; `slots(pipe)`: how many
    of its turns run at once (the backend's, ui.backend)."""

    def __init__(self, max_waiting: int = 16, slots: Callable[[Any], int] = lambda pipe: 1) -> None:
        self.max_waiting = max_waiting
        self.slots = slots
        self._lock = threading.Lock()
        self._queues: dict[int, tuple[Any, ModelQueue]] = {}

    def of(self, pipe: Any) -> ModelQueue:
        with self._lock:
            entry = self._queues.get(id(pipe))
            if entry is None or entry[0] is not pipe:
                entry = self._queues[id(pipe)] = (pipe, ModelQueue(self.max_waiting, lambda: self.slots(pipe)))
            return entry[1]

    def all(self) -> list[ModelQueue]:
        with self._lock:
            return [q for _, q in self._queues.values()]

    def forget(self, pipe: Any) -> bool:
        """Drop `pipe`'s queue (and so this object's reference to the model) if nobody runs or waits on it."""
        with self._lock:
            entry = self._queues.get(id(pipe))
            if entry is None or entry[0] is not pipe:
                return True
            queue = entry[1]
            if queue.running is not None or queue.waiting():
                return False
            del self._queues[id(pipe)]
            return True

    def join(self, pipe: Any, turn: Turn, *, limit: bool = True) -> Turn:
        return self.of(pipe).join(turn, limit=limit)

    def wait(self, pipe: Any, turn: Turn) -> bool:
        return self.of(pipe).wait(turn)

    def enter(self, pipe: Any, cancel: threading.Event, origin: str = "ui") -> Turn | None:
        """join (no size limit: Gradio's queue limits the UI) + wait; None if cancelled while waiting."""
        turn = self.join(pipe, Turn(origin, cancel), limit=False)
        return turn if self.wait(pipe, turn) else None

    def leave(self, pipe: Any, turn: Turn | None) -> None:
        if turn is not None:
            self.of(pipe).leave(turn)

    def running(self) -> list[Turn]:
        return [t for q in self.all() for t in q.runners()]

    def job_count(self) -> int:
        """Running plus waiting turns over all models."""
        return sum(len(q.runners()) + len(q.waiting()) for q in self.all())

    def interrupt(self) -> int:
        """Stop every running turn (whoever started it); returns how many."""
        turns = self.running()
        for t in turns:
            t.interrupt()
        return len(turns)

    def skip(self) -> int:
        turns = self.running()
        for t in turns:
            t.skip()
        return len(turns)
