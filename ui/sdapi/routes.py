"""The FastAPI router: A1111's `/sdapi/v1/*` routes and the asynchronous `/api/v1/jobs`.

Every route sits behind `basic_auth` (HTTP Basic when the app has users; Gradio's own login does
not cover added routes, and the access gate lets these paths through to it). Bad input is refused
with 422 (pydantic's own checks, or ldm's message) before any model work; an image over the upload
limit with 413; a full queue with 503; generation errors with 500 and their message.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import math

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import ValidationError

import ldm
from ldm import metadata, samplers

from .. import tasks
from ..limits import LoginBackoff
from ..models import AUTOMATIC, TITLE, LoadFailed, switch_model
from ..state import Context
from ..turns import QueueFull
from . import controlnet, convert
from .convert import Plan, TooLarge
from .jobs import Jobs
from .models import (ExtraSingleImageRequest, ExtraSingleImageResponse, GenerationResponse, Img2ImgRequest, JobCreated, JobRequest, PngInfoRequest, PngInfoResponse,
                     ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest, UpscalerItem)

PREFIX = "/sdapi/v1"
JOBS = "/api/v1/jobs"
TASKS = ("txt2img", "img2img")


@dataclass
class Settings:
    auth: Sequence[tuple[str, str]] = ()  # no users: the API is open (as the UI is without --auth)
    job_ttl: float = 3600.0  # seconds a finished job's results are kept
    cmd_flags: dict[str, Any] = field(default_factory=dict)  # what /cmd-flags shows (no secrets)
    event_interval: float = 0.5  # seconds between server-sent progress events
    backoff: LoginBackoff = field(default_factory=LoginBackoff)  # shared with the UI's login (app.py)


def basic_auth(users: Sequence[tuple[str, str]], backoff: LoginBackoff) -> Callable:
    """A dependency: 401 with `WWW-Authenticate: Basic` unless the request carries one of `users`; after
    repeated failures from one client address, 429 until its backoff has passed (as the UI's login)."""
    scheme = HTTPBasic(auto_error=False)
    pairs = [(u.encode(), p.encode()) for u, p in users]

    def check(request: Request, credentials: HTTPBasicCredentials | None = Depends(scheme)) -> None:
        if not pairs:
            return
        client = request.client.host if request.client else "unknown"
        wait = backoff.wait(client)
        if wait > 0:
            seconds = math.ceil(wait)
            raise HTTPException(429, f"too many failed logins: try again in {seconds} s",
                                headers={"Retry-After": str(seconds)})
        if credentials is not None:
            user, password = credentials.username.encode(), credentials.password.encode()
            ok = False
            for u, p in pairs:  # every pair compared, in constant time each
                ok |= secrets.compare_digest(u, user) & secrets.compare_digest(p, password)
            if ok:
                backoff.succeeded(client)
                request.state.user = credentials.username  # whose outputs folder (ui.saving per-user outputs)
                return
            backoff.failed(client)  # a request without credentials is a question, not a guess
        raise HTTPException(401, "Not authenticated: use HTTP Basic with the API's user and password",
                            headers={"WWW-Authenticate": 'Basic realm="ldm API"'})

    return check


def api_user(request: Request) -> str | None:
    """The HTTP Basic user `basic_auth` let in (None when the API has no users)."""
    return getattr(request.state, "user", None)


def planned(make: Callable[[], Plan]) -> Plan:
    try:
        return make()
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def build_router(ctx: Context, settings: Settings) -> tuple[APIRouter, Jobs]:
    router = APIRouter(dependencies=[Depends(basic_auth(settings.auth, settings.backoff))])
    jobs = Jobs(ctx, ttl=settings.job_ttl)

    def serving():
        """The model serving now: read per request, since the UI may switch checkpoints (ui.models)."""
        if ctx.pipes.base is None:
            raise HTTPException(503, "a model is loading after a checkpoint switch; try again in a moment")
        return ctx.pipes.base

    options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1}
    controlnets = ctx.controlnets  # loaded on first use, shared by the routes, jobs and the page

    def submit(plan: Plan, parameters: dict, origin: str):
        try:
            return jobs.submit(plan, parameters, origin)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None

    def run_now(plan: Plan, parameters: dict) -> dict:
        job = jobs.run(submit(plan, parameters, "api"))
        if job.state == "failed":
            raise HTTPException(job.status_code, job.error)
        return jobs.response(job)

    # ---- generation ------------------------------------------------------------------------

    @router.post(f"{PREFIX}/txt2img", response_model=GenerationResponse, tags=["sdapi"])
    def txt2img(req: Txt2ImgRequest, request: Request) -> dict:
        serving()  # 503 while a checkpoint switch loads the next model
        plan = planned(lambda: convert.plan_txt2img(ctx, req, options, controlnets=controlnets))
        plan.user = api_user(request)
        return run_now(plan, convert.parameters(req))

    @router.post(f"{PREFIX}/img2img", response_model=GenerationResponse, tags=["sdapi"])
    def img2img(req: Img2ImgRequest, request: Request) -> dict:
        serving()
        plan = planned(lambda: convert.plan_img2img(ctx, req, options, controlnets=controlnets))
        plan.user = api_user(request)
        return run_now(plan, convert.parameters(req))

    @router.post(f"{PREFIX}/png-info", response_model=PngInfoResponse, tags=["sdapi"])
    def png_info(req: PngInfoRequest) -> dict:
        try:
            image = convert.decode_image(ctx, req.image, "image", mode=None)
        except TooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        text = metadata.read_infotext(image) or ""
        text = tasks.truncate(text, tasks.MAX_INFOTEXT_CHARS) if text else text
        return {"info": text, "items": {"parameters": text} if text else {},
                "parameters": metadata.parse_infotext(text) if text else {}}

    @router.post(f"{PREFIX}/extra-single-image", response_model=ExtraSingleImageResponse, tags=["sdapi"])
    def extra_single_image(req: ExtraSingleImageRequest) -> dict:
        """Resize with a classic resampler (ldm.upscale_image); the image keeps its infotext."""
        pipe = serving()
        try:
            if req.resize_mode != 0:
                raise ValueError(f"resize_mode {req.resize_mode} is not supported; use 0 (scale by upscaling_resize)")
            method = convert.resampler(req.upscaler_1)
            source = convert.decode_image(ctx, req.image, "image", mode=None)
            text = metadata.read_infotext(source)
            image = ldm.upscale_image(source, req.upscaling_resize, method, max_size=pipe.options.max_upscale_size)
        except TooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        text = tasks.truncate(text, tasks.MAX_INFOTEXT_CHARS) if text else None
        return {"html_info": "", "image": convert.encode_png(image, text)}

    @router.post(f"{PREFIX}/interrupt", tags=["sdapi"])
    def interrupt() -> dict:
        ctx.queues.interrupt()
        return {}

    @router.post(f"{PREFIX}/skip", tags=["sdapi"])
    def skip() -> dict:
        ctx.queues.skip()
        return {}

    @router.get(f"{PREFIX}/progress", response_model=ProgressResponse, tags=["sdapi"])
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        running = ctx.queues.running()
        state = ProgressState(job_count=ctx.queues.job_count())
        if not running:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=state)
        turn = running[0]
        state.job = f"{turn.origin} {turn.number}"
        state.job_no, state.sampling_step, state.sampling_steps = turn.batch, turn.step, turn.total
        state.interrupted = turn.cancel.is_set()
        image = None
        if not skip_current_image and turn.preview is not None:
            image = convert.encode_png(turn.preview, None)
        return ProgressResponse(progress=round(turn.progress(), 4), eta_relative=round(turn.eta() or 0.0, 2),
                                state=state, current_image=image,
                                textinfo=f"Step {turn.step}/{turn.total}, batch {turn.batch + 1}/{turn.batch_count}")

    # ---- listings --------------------------------------------------------------------------

    @router.get(f"{PREFIX}/samplers", response_model=list[SamplerItem], tags=["sdapi"])
    def sampler_list() -> list[dict]:
        return [{"name": n, "aliases": [], "options": {}} for n in samplers.sampler_names()]

    @router.get(f"{PREFIX}/schedulers", response_model=list[SchedulerItem], tags=["sdapi"])
    def scheduler_list() -> list[dict]:
        return [{"name": n.lower().replace(" ", "_"), "label": n, "aliases": None} for n in samplers.schedule_names()]

    @router.get(f"{PREFIX}/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
    def upscaler_list() -> list[dict]:
        """The resamplers extra-single-image takes (hr_upscaler takes those of ldm.HIRES_UPSCALERS)."""
        return [{"name": "None", "scale": None}] + [{"name": k.capitalize(), "scale": None} for k in ldm.RESAMPLERS]

    @router.get(f"{PREFIX}/latent-upscale-modes", tags=["sdapi"])
    def latent_modes() -> list[dict]:
        return [{"name": label} for label in ldm.HIRES_UPSCALERS.values() if label.lower().startswith("latent")]

    @router.get(f"{PREFIX}/sd-models", response_model=list[SDModelItem], tags=["sdapi"])
    def sd_models() -> list[dict]:
        """The serving checkpoint first, then the models folder's; titles "name [hash]" once a hash is known
        (ui.models hashes the serving one in the background)."""
        pipe, current = serving(), ctx.models.checkpoint
        items = [{"title": title, "model_name": name, "hash": (m := TITLE.match(title)) and m.group(2), "sha256": None,
                  "filename": str(pipe.components.path) if name == current else name, "config": None}
                 for title, name in ctx.models.titled()]
        return sorted(items, key=lambda item: item["model_name"] != current)

    @router.get(f"{PREFIX}/sd-vae", tags=["sdapi"])
    def sd_vae() -> list[dict]:
        pipe = serving()
        if pipe.library is None:
            return []
        return [{"model_name": e.name, "filename": str(e.path)} for e in pipe.library.list("vaes")]

    @router.get(f"{PREFIX}/loras", tags=["sdapi"])
    def loras() -> list[dict]:
        pipe = serving()
        if pipe.library is None:
            return []
        return [{"name": e.stem, "alias": e.stem, "path": str(e.path), "metadata": {}} for e in pipe.library.list("loras")]

    @router.get(f"{PREFIX}/embeddings", tags=["sdapi"])
    def embeddings() -> dict:
        pipe = serving()
        found = pipe.library.list("embeddings") if pipe.library is not None else []
        return {"loaded": {e.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                    "vectors": None} for e in found}, "skipped": {}}

    @router.get(f"{PREFIX}/scripts", tags=["sdapi"])
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @router.post(f"{PREFIX}/refresh-checkpoints", tags=["sdapi"])
    def refresh_checkpoints() -> None:
        return None  # /sd-models rescans the models folder on every call

    @router.post(f"{PREFIX}/refresh-vae", tags=["sdapi"])
    def refresh_vae() -> None:
        return None

    @router.get(f"{PREFIX}/cmd-flags", tags=["sdapi"])
    def cmd_flags() -> dict:
        return dict(settings.cmd_flags)

    @router.get(f"{PREFIX}/memory", tags=["sdapi"])
    def memory() -> dict:
        return memory_report()

    controlnet.add_routes(router, ctx, lambda text, what: convert.decode_image(ctx, text, what),
                          lambda image: convert.encode_png(image, None), planned)

    # ---- options ---------------------------------------------------------------------------

    def current_options() -> dict:
        pipe = serving()
        outputs = ctx.options.outputs
        m = ctx.models
        return {"sd_model_checkpoint": m.title(m.checkpoint), "sd_checkpoint_hash": None, "sd_vae": m.vae,
                "CLIP_stop_at_last_layers": options["CLIP_stop_at_last_layers"], "samples_save": outputs is not None,
                "samples_format": "png", "outdir_samples": str(outputs or ""), "live_previews_enable": bool(ctx.options.preview_every),
                "show_progress_every_n_steps": ctx.options.preview_every, "sd_model_name": str(pipe.name)}

    @router.get(f"{PREFIX}/options", tags=["sdapi"])
    def get_options() -> dict:
        return current_options()

    @router.post(f"{PREFIX}/options", tags=["sdapi"])
    def set_options(req: dict[str, Any] = Body(...)) -> None:
        """Partial or whole (as GET gave it); honoured: CLIP_stop_at_last_layers, sd_model_checkpoint and sd_vae
        (a switch as the UI's checkpoint/VAE dropdowns make it: between requests, the old model released; a name,
        title "name [hash]" or hash from /sd-models; "Automatic"/"None" = the checkpoint's own VAE); other keys
        are accepted and ignored."""
        pipe = serving()
        m = ctx.models
        checkpoint = m.resolve(req["sd_model_checkpoint"]) if req.get("sd_model_checkpoint") else m.checkpoint
        vae = req.get("sd_vae") or m.vae
        vae = AUTOMATIC if vae == "None" else str(vae)
        if "CLIP_stop_at_last_layers" in req:
            clip = req["CLIP_stop_at_last_layers"]
            limit = pipe.limits.max_clip_skip
            if not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= limit:
                raise HTTPException(422, f"CLIP_stop_at_last_layers must be a whole number from 1 to {limit}, got {clip!r}")
            options["CLIP_stop_at_last_layers"] = clip
        if (checkpoint, vae) != (m.checkpoint, m.vae):  # posting GET's dict back switches nothing, waits for nothing
            try:
                switch_model(ctx, checkpoint, vae)
            except LoadFailed as exc:  # found but failed to load: the previous model serves
                raise HTTPException(500, str(exc)) from None
            except ValueError as exc:  # an unknown name (close names listed), switching off
                raise HTTPException(422, str(exc)) from None
        return None

    # ---- jobs ------------------------------------------------------------------------------

    @router.post(JOBS, status_code=202, response_model=JobCreated, tags=["jobs"])
    def create_job(req: JobRequest, request: Request) -> dict:
        """The body of /sdapi/v1/txt2img or /img2img plus "task"; images are saved as the UI saves them
        unless "save_images" is false. Answers at once with the job's id."""
        if req.task not in TASKS:
            raise HTTPException(422, f"task must be one of: {', '.join(TASKS)}; got {req.task!r}")
        body = req.model_dump()
        try:
            model = (Txt2ImgRequest if req.task == "txt2img" else Img2ImgRequest).model_validate(body)
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_input=False, include_url=False)) from None
        save = body.get("save_images", True) is not False
        make = convert.plan_txt2img if req.task == "txt2img" else convert.plan_img2img
        serving()
        plan = planned(lambda: make(ctx, model, options, save=save, controlnets=controlnets))
        plan.user = api_user(request)
        job = submit(plan, convert.parameters(model), "job")
        jobs.start(job)
        return {"id": job.id}

    def find(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept {settings.job_ttl:g} s)")
        return job

    @router.get(JOBS + "/{job_id}", tags=["jobs"])
    def job_status(job_id: str) -> dict:
        return jobs.status(find(job_id))

    @router.delete(JOBS + "/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str) -> dict:
        find(job_id)
        return jobs.status(jobs.cancel(job_id), results=False)

    @router.get(JOBS + "/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: `progress` (the job's status) whenever it changes, then one `end`."""
        job = find(job_id)

        async def stream():
            last = None
            while True:
                status = jobs.status(job, results=False, preview=False)
                key = (status["state"], status["step"], status["batch"], status["queue_position"])
                if job.finished:
                    yield f"event: end\ndata: {json.dumps(status)}\n\n"
                    return
                if key != last:
                    last = key
                    yield f"event: progress\ndata: {json.dumps(status)}\n\n"
                await asyncio.sleep(settings.event_interval)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router, jobs


def memory_report() -> dict:
    """A1111's /memory shape: RAM from /proc (or psutil), CUDA from torch when there is a GPU."""
    ram: dict[str, Any] = {}
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    except ImportError:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        ram = {"total": pages * size}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total = torch.cuda.mem_get_info()
    return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total},
                                 "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}}
