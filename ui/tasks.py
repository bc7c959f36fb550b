"""The task handlers behind the web UI: widget values -> one `ldm` call -> values for the outputs.

No Gradio here, so everything is testable without a server or a browser. Parameter names are the
`ldm` keyword names, because `ui.layout` publishes these signatures as the HTTP API.

Generation handlers are generators: they yield `Step`s (progress, occasionally a cheap latent
preview) while the model runs in a worker thread, then one `Output`. `streaming.run(...)` drains one.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

import ldm
from ldm import metadata, samplers
from ldm.extensions.refiner import check_base
from ldm.params import MAX_SEED, Range

from . import choices, control
from .backend import Call
from .convert import as_int, load_upload, size_or_none
from .models import NO_REFINER
from .state import Context
from .streaming import Output, Step, StepCallback, previewer, stream_call

MAX_BATCH_COUNT = 100
BATCH_COUNT = Range(1, MAX_BATCH_COUNT)  # batches run one after another by `generate`
RESIZE_SCALE = Range(0, 8, open_low=True)  # the Upscale tab's plain resizes
MAX_INFOTEXT_CHARS = 64 * 1024  # at most this much of a user's `parameters` chunk is shown or copied


class Unavailable(ValueError):
    """A feature whose model is not loaded (e.g. the x4 upscaler without --upscale-model)."""


def sampling(steps, guidance_scale, sampler, schedule, clip_skip=1) -> dict[str, Any]:
    """The sampler settings every generation takes, in ldm's names and types."""
    return {
        "steps": as_int("steps", steps),
        "guidance_scale": float(guidance_scale),
        "sampler": sampler,
        "schedule": schedule,
        "clip_skip": as_int("clip_skip", clip_skip),
    }


def first_seed(seed: Any, images: int) -> int:
    """-1 -> one random seed for the whole run, so batch k starts at seed + k * batch_size."""
    seed = as_int("seed", seed)
    if seed == -1:
        return random.randint(0, max(0, MAX_SEED - images + 1))
    return seed


# ---- the batch loop -------------------------------------------------------------------------


def generate(ctx: Context, task: str, call: Callable[[int, StepCallback], Any], *, prompt: str, seed: Any,
             batch_size: Any, batch_count: Any, session: str, pipe: Any = None,
             user: str | None = None) -> Iterator[Step | Output]:
    """Run `call(seed, callback)` `batch_count` times with consecutive seeds, save every image,
    yield progress, then one Output. Stop keeps the batches that finished. The run waits for its
    turn on the model's queue (`pipe`, default the base model), shared with the REST API. `user`: the
    logged-in user (with per-user outputs their folder gets the images, ui.saving)."""
    batch_size = as_int("batch_size", batch_size)
    batch_count = as_int("batch_count", batch_count)
    if batch_count not in BATCH_COUNT:
        raise ValueError(f"batch_count must be from {BATCH_COUNT.text()}, got {batch_count}")
    seed0 = first_seed(seed, batch_size * batch_count)
    out = Output([], [], [])
    cancel = ctx.jobs.start(session)
    pipe = ctx.pipes.base if pipe is None else pipe
    turn = None
    try:
        turn = ctx.queues.enter(pipe, cancel, "ui")  # None: stopped while waiting (the loop sees the flag)
        draw = previewer(pipe) if ctx.options.preview_every and turn is not None else None
        for k in range(batch_count):
            if cancel.is_set():
                out.stopped = True
                break
            seed_k = seed0 + k * batch_size
            try:
                stream = stream_call(lambda cb, s=seed_k: call(s, cb), cancel, ctx.options.preview_every,
                                     ctx.options.abandon_after, draw=draw)
                for item in stream:
                    if isinstance(item, Step):
                        item.batch, item.batch_count = k, batch_count
                        if turn is not None:
                            turn.update(item.step, item.total, k, batch_count, item.preview)
                        yield item
                    else:
                        _collect(ctx, out, item, task, prompt, user)
                        if k + 1 < batch_count:  # on screen at once: a Stop (which closes this) keeps them
                            yield Output(list(out.images), list(out.infotexts), list(out.seeds),
                                         list(out.warnings), partial=True)
            except ldm.Cancelled:
                out.stopped = True
                break
    finally:
        ctx.queues.leave(pipe, turn)
        ctx.jobs.finish(session, cancel)
    yield out


def _collect(ctx: Context, out: Output, result, task: str, prompt: str, user: str | None) -> None:
    for image, seed, info in zip(result.images, result.seeds, result.infotexts):
        saved, warning = ctx.saver.save(image, info, seed=seed, prompt=prompt, task=task, user=user)
        out.images.append(saved)
        out.infotexts.append(info)
        out.seeds.append(seed)
        if warning and warning not in out.warnings:
            out.warnings.append(warning)


# ---- tasks ----------------------------------------------------------------------------------


@control.takes_units
def txt2img(ctx: Context, prompt: str = "", negative_prompt: str = "", sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0,
            width: int | None = None, height: int | None = None, seed: int = -1, batch_size: int = 1,
            batch_count: int = 1, clip_skip: int = 1, hires_scale: float = 1.0, hires_strength: float = 0.5,
            hires_upscaler: str = "latent", hires_steps: int = 0, fast: bool = False, refiner: str = NO_REFINER,
            refiner_switch_at: float = 0.8, *, session: str = "", user: str | None = None,
            **controlnet) -> Iterator[Step | Output]:
    """hires_upscaler: a key of ldm.HIRES_UPSCALERS; hires_steps 0 = as many as the first pass."""
    pipe = ctx.pipes.base
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(width=None if width is None else as_int("width", width),  # 0 is refused by ldm
                    height=None if height is None else as_int("height", height),
                    batch_size=as_int("batch_size", batch_size), negative_prompt=negative_prompt)
    if fast:  # ldm's opt-in fast preset (deep-feature reuse + guidance truncation)
        settings["fast"] = True
    if float(hires_scale) != 1:  # 1 = off; ldm refuses less than 1 (a typed 0.5 is not "off" in silence)
        second = as_int("hires_steps", hires_steps)  # 0 = as many as the first pass (ldm: None); ldm checks the rest
        settings.update(hires_scale=float(hires_scale), hires_strength=float(hires_strength),
                        hires_upscaler=hires_upscaler, hires_steps=second or None)
    if refiner and refiner != NO_REFINER:  # an SDXL checkpoint runs the last steps; what ldm refuses, before it loads
        check_base(pipe, float(refiner_switch_at), hires="hires_scale" in settings,
                   control=any(u.enabled for u in control.unit_values(controlnet)))
        settings.update(refiner=ctx.models.refiner(refiner), refiner_switch_at=float(refiner_switch_at))
    settings.update(control.keywords(ctx, pipe, controlnet))

    def call(seed: int, callback: StepCallback):
        return ctx.backend.run(pipe, Call("txt2img", (prompt,), {"seed": seed, **settings}), callback)

    return generate(ctx, "txt2img", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session, user=user)


@control.takes_units
def img2img(ctx: Context, image: Any = None, prompt: str = "", negative_prompt: str = "", strength: float = 0.75,
            sampler: str = samplers.DEFAULT_SAMPLER, schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20,
            guidance_scale: float = 7.0, width: int | None = 0, height: int | None = 0, seed: int = -1,
            batch_size: int = 1, batch_count: int = 1, clip_skip: int = 1, *, session: str = "", user: str | None = None,
            **controlnet) -> Iterator[Step | Output]:
    pipe = ctx.pipes.base
    picture = load_upload(ctx, image)
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(width=size_or_none("width", width), height=size_or_none("height", height),
                    batch_size=as_int("batch_size", batch_size), negative_prompt=negative_prompt, strength=float(strength))
    settings.update(control.keywords(ctx, pipe, controlnet, init_image=picture))

    def call(seed: int, callback: StepCallback):
        return ctx.backend.run(pipe, Call("img2img", (picture, prompt), {"seed": seed, **settings}), callback)

    return generate(ctx, "img2img", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session, user=user)


@control.takes_units
def inpaint(ctx: Context, image: Any = None, mask: Any = None, prompt: str = "", negative_prompt: str = "",
            strength: float = 0.75, mask_blur: int = 4, inpaint_area: str = "whole", padding: int = 32,
            masked_content: str = "original", invert_mask: bool = False, sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0,
            width: int | None = 0, height: int | None = 0, seed: int = -1, batch_size: int = 1,
            batch_count: int = 1, clip_skip: int = 1, *, session: str = "", user: str | None = None,
            **controlnet) -> Iterator[Step | Output]:
    """mask: white = repaint; an alpha channel that varies counts with transparent = repaint."""
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    picture = load_upload(ctx, image)
    mask_image = load_upload(ctx, mask, "mask", mode=None)  # keep alpha: ldm reads it
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(
        negative_prompt=negative_prompt, strength=float(strength), mask_blur=as_int("mask_blur", mask_blur),
        inpaint_area=inpaint_area, padding=as_int("padding", padding), masked_content=masked_content,
        invert_mask=bool(invert_mask), width=size_or_none("width", width), height=size_or_none("height", height),
        batch_size=as_int("batch_size", batch_size),
    )
    settings.update(control.keywords(ctx, pipe, controlnet, init_image=picture))

    def call(seed: int, callback: StepCallback):
        return ctx.backend.run(pipe, Call("inpaint", (picture, mask_image, prompt), {"seed": seed, **settings}), callback)

    return generate(ctx, "inpaint", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session, pipe=pipe, user=user)


@control.takes_units
def outpaint(ctx: Context, image: Any = None, prompt: str = "", negative_prompt: str = "", left: int = 0,
             right: int = 0, top: int = 0, bottom: int = 0, strength: float = 1.0, mask_blur: int = 4,
             masked_content: str = "fill", sampler: str = samplers.DEFAULT_SAMPLER,
             schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0, seed: int = -1,
             batch_size: int = 1, batch_count: int = 1, clip_skip: int = 1, *, session: str = "", user: str | None = None,
             **controlnet) -> Iterator[Step | Output]:
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    picture = load_upload(ctx, image)
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(negative_prompt=negative_prompt, batch_size=as_int("batch_size", batch_size),
                    strength=float(strength), mask_blur=as_int("mask_blur", mask_blur), masked_content=masked_content,
                    **{side: as_int(side, v) for side, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom))})
    settings.update(control.keywords(ctx, pipe, controlnet, init_image=picture))

    def call(seed: int, callback: StepCallback):
        return ctx.backend.run(pipe, Call("outpaint", (picture, prompt), {"seed": seed, **settings}), callback)

    return generate(ctx, "outpaint", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session, pipe=pipe, user=user)


def upscale(ctx: Context, image: Any = None, method: str = "lanczos", scale: float = 2.0, prompt: str = "",
            negative_prompt: str = "", tile_size: int = 0, tile_overlap: int = 32, noise_level: int = 20,
            strength: float = 0.5, upscaler: str = "lanczos", sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0, seed: int = -1,
            *, session: str = "", user: str | None = None) -> Iterator[Step | Output]:
    """method: "x4 model" (a loaded x4 upscaler), "hires fix" (redraw with the base model), or a resize.
    With an empty prompt the hires fix redraws with the image's own prompts (from its infotext)."""
    picture = load_upload(ctx, image)
    if method in choices.RESIZE_METHODS:
        return _resize(ctx, picture, image, method, scale, user)
    if method not in (choices.UPSCALE_X4, choices.UPSCALE_HIRES):
        raise ValueError(f"unknown upscale method {method!r}; choose one of: {', '.join(choices.UPSCALE_METHODS)}")
    settings = sampling(steps, guidance_scale, sampler, schedule)
    settings.pop("clip_skip")
    settings["negative_prompt"] = negative_prompt
    if method == choices.UPSCALE_X4:
        pipe = ctx.pipes.upscale
        if pipe is None:
            raise Unavailable("no x4 upscale model is loaded; start the app with --upscale-model")
        tile = as_int("tile_size", tile_size)
        settings.update(noise_level=as_int("noise_level", noise_level), tile_size=tile or None,
                        tile_overlap=as_int("tile_overlap", tile_overlap))

        def call(seed: int, callback: StepCallback):
            return ctx.backend.run(pipe, Call("upscale", (picture, prompt), {"seed": seed, **settings}), callback)
    else:
        pipe = ctx.pipes.base
        settings.update(scale=float(scale), strength=float(strength), upscaler=upscaler)
        if not prompt.strip():  # the image's own prompts, as its infotext says, unless the user typed one
            own = metadata.parse_infotext(_infotext_of(ctx, image) or "")
            prompt = own.get("Prompt", "")
            settings["negative_prompt"] = negative_prompt or own.get("Negative prompt", "")

        def call(seed: int, callback: StepCallback):
            return ctx.backend.run(pipe, Call("hires_fix", (picture, prompt), {"seed": seed, **settings}), callback)

    return generate(ctx, "upscale", call, prompt=prompt, seed=seed, batch_size=1, batch_count=1, session=session,
                    pipe=pipe, user=user)


def _resize(ctx: Context, picture: Image.Image, source: Any, method: str, scale: float,
            user: str | None) -> Iterator[Output]:
    scale = float(scale)
    if not math.isfinite(scale) or scale not in RESIZE_SCALE:
        raise ValueError(f"scale must be in {RESIZE_SCALE.text()}, got {scale}")
    image = ldm.upscale_image(picture, scale, method, max_size=ctx.pipes.base.options.max_upscale_size)
    # As A1111: the original's parameters (Size now the new size) and what was done, as `postprocessing`.
    info = metadata.with_size(_infotext_of(ctx, source) or "", *image.size)
    post = metadata.postprocessing(scale, method.title())
    saved, warning = ctx.saver.save(image, info, seed=None, prompt=f"{method}-x{scale:g}", task="upscale",
                                    extra={"postprocessing": post}, user=user)
    yield Output([saved], [info], [], [warning] if warning else [])


# ---- PNG info -------------------------------------------------------------------------------


def user_infotext(ctx: Context, source: Any) -> str | None:
    """The parameters text of a user's image, cut at MAX_INFOTEXT_CHARS: every place that reads
    infotext from an upload (PNG info, the resize that keeps the original's parameters) goes
    through here, so a 15 MB chunk is never copied into outputs or responses."""
    text = metadata.read_infotext(load_upload(ctx, source, mode=None))
    return truncate(text, MAX_INFOTEXT_CHARS) if text else text


def _infotext_of(ctx: Context, source: Any) -> str | None:
    try:
        return user_infotext(ctx, source)
    except (ValueError, OSError):
        return None


def png_info(ctx: Context, image: Any = None) -> str:
    """The A1111 parameters text of an image (PNG chunk, or JPEG/WebP EXIF UserComment); "" when it
    has none or there is no image (the page's placeholder says so). Cut at MAX_INFOTEXT_CHARS."""
    if image is None or image == "":
        return ""
    return user_infotext(ctx, image) or ""


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[… truncated: showing the first {limit:,} of {len(text):,} characters]"
