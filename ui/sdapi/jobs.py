"""Generation jobs of the REST API: queued on the model's shared queue (`ui.turns`), run batch by
batch through `ui.streaming.stream_call`, kept with their results for `ttl` seconds after they end.

The synchronous A1111 routes (`/sdapi/v1/txt2img`, `img2img`) are jobs run in the request's own
thread; `/api/v1/jobs` runs them in a thread of their own and answers at once with the id.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ldm

from ..backend import ReplicaDied
from ..state import Context
from ..streaming import Step, previewer, stream_call
from ..turns import Turn
from .convert import Plan, encode_png, info

log = logging.getLogger(__name__)
STATES = ("queued", "running", "done", "failed", "cancelled")
USER_FACING = (ldm.OutOfMemory, ldm.DecodeError, ReplicaDied)  # runtime errors whose message says what to change


@dataclass(eq=False)
class Job:
    id: str
    plan: Plan
    parameters: dict[str, Any]
    turn: Turn
    state: str = "queued"
    created: float = field(default_factory=time.time)
    finished_at: float | None = None  # monotonic
    images: list[str] = field(default_factory=list)  # base64 PNGs with infotext
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    error: str | None = None
    status_code: int = 200  # what a synchronous route answers
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class Jobs:
    """Every API job by id; finished ones are forgotten `ttl` seconds after they end."""

    def __init__(self, ctx: Context, ttl: float = 3600.0, max_finished: int = 256) -> None:
        self.ctx, self.ttl, self.max_finished = ctx, ttl, max_finished
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    def submit(self, plan: Plan, parameters: dict[str, Any], origin: str = "api") -> Job:
        """Queue a job (ui.turns.QueueFull when too many wait); run it with `run` or `start`."""
        self.prune()
        job = Job(uuid.uuid4().hex, plan, parameters, Turn(origin))
        self.ctx.queues.join(plan.pipe, job.turn)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def start(self, job: Job) -> None:
        threading.Thread(target=self.run, args=(job,), daemon=True, name=f"ldm-job-{job.id[:8]}").start()

    def run(self, job: Job) -> Job:
        """Wait for the model, run every batch, keep the results; never raises (errors go in the job)."""
        plan, turn, queues = job.plan, job.turn, self.ctx.queues
        try:
            if not queues.wait(plan.pipe, turn):
                job.state = "cancelled"
                return job
            job.state = "running"
            self._batches(job)
            job.state = "cancelled" if turn.cancel.is_set() else "done"
        except ValueError as exc:  # ldm's checks that need the model (prompt tokens, LoRA names, ...)
            self._fail(job, 422, str(exc))
        except USER_FACING as exc:
            self._fail(job, 500, str(exc))
        except Exception as exc:  # noqa: BLE001 - logged; the caller gets the type, the server keeps serving
            log.error("API job %s failed", job.id, exc_info=exc)
            self._fail(job, 500, f"internal error ({type(exc).__name__}): {exc}"[:500])
        finally:
            queues.leave(plan.pipe, turn)
            job.finished_at = time.monotonic()
            job.done.set()
        return job

    def _batches(self, job: Job) -> None:
        plan, turn = job.plan, job.turn
        draw = previewer(plan.pipe) if self.ctx.options.preview_every else None
        for k in range(plan.n_iter):
            if turn.cancel.is_set():
                break
            flag = threading.Event()  # this batch's stop: set by skip (this batch) or interrupt (all)
            turn.current = flag
            if turn.cancel.is_set():
                flag.set()
            seed_k = plan.seed + k * plan.batch_size
            try:
                for item in stream_call(lambda cb, s=seed_k: plan.call(s, cb), flag, self.ctx.options.preview_every,
                                        draw=draw):
                    if isinstance(item, Step):
                        turn.update(item.step, item.total, k, plan.n_iter, item.preview)
                    else:
                        self._collect(job, item)
            except ldm.Cancelled:
                if turn.cancel.is_set():
                    break  # interrupted: keep the batches that finished; skipped: on to the next

    def _collect(self, job: Job, result) -> None:
        plan = job.plan
        for image, seed, text in zip(result.images, result.seeds, result.infotexts):
            if plan.save:
                _, warning = self.ctx.saver.save(image, text, seed=seed, prompt=plan.prompt, task=plan.task,
                                                 user=plan.user)
                if warning and warning not in plan.notes:
                    plan.notes.append(warning)
            job.images.append(encode_png(image, text))
            job.seeds.append(seed)
            job.infotexts.append(text)

    @staticmethod
    def _fail(job: Job, code: int, message: str) -> None:
        job.state, job.status_code, job.error = "failed", code, message

    # ---- lookup and control ------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        self.prune()
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None and not job.finished:
            job.turn.interrupt()
        return job

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            finished = sorted((j for j in self._jobs.values() if j.finished_at is not None), key=lambda j: j.finished_at)
            expired = [j for j in finished if now - j.finished_at > self.ttl]
            expired += finished[len(expired):][:max(0, len(finished) - len(expired) - self.max_finished)]
            for j in expired:
                self._jobs.pop(j.id, None)

    # ---- answers -----------------------------------------------------------------------------

    def response(self, job: Job) -> dict[str, Any]:
        """A1111's {"images", "parameters", "info"} for a finished job."""
        images = job.images if job.plan.send_images else []
        return {"images": images, "parameters": job.parameters,
                "info": json.dumps(info(job.plan, job.seeds, job.infotexts, job.plan.pipe))}

    def status(self, job: Job, *, results: bool = True, preview: bool = True) -> dict[str, Any]:
        """GET /api/v1/jobs/{id}: state, queue position, step/total, ETA, preview, results when done."""
        turn = job.turn
        position = self.ctx.queues.of(job.plan.pipe).position(turn) if not job.finished else None
        out: dict[str, Any] = {
            "id": job.id, "task": job.plan.task, "state": job.state,
            "queue_position": position,  # 0 = running, n = n-th waiting, None = finished
            "step": turn.step, "total": turn.total, "batch": turn.batch, "batch_count": turn.batch_count,
            "progress": 1.0 if job.state == "done" else round(turn.progress(), 4),
            "eta": None if job.finished else turn.eta(), "created": job.created, "error": job.error,
        }
        if preview:
            out["preview"] = encode_png(turn.preview, None) if turn.preview is not None and not job.finished else None
        if results and job.finished:
            out["result"] = self.response(job) if job.images or job.state != "failed" else None
        return out
