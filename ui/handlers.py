"""Plain functions behind the web UI: widget values -> one `ldm` call -> values for the outputs.

No Gradio here, so everything is testable without a server or a browser. Parameter names are the
`ldm` keyword names, because `ui.layout` publishes these signatures as the HTTP API.

Generation handlers are generators: they yield `Step`s (progress, occasionally a cheap latent
preview) while the model runs in a worker thread, then one `Output`. `run(...)` drains one.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import ldm
from ldm import metadata, samplers
from ldm.images import load_image
from ldm.latents import preview as latent_preview
from ldm.params import MAX_SEED

from . import choices

MAX_BATCH_COUNT = 100


class Unavailable(ValueError):
    """A feature whose ldm part is not in this build (or whose model is not loaded)."""


# ---- state created once per app -------------------------------------------------------------


@dataclass
class Pipes:
    """The loaded pipelines. `inpaint` / `upscale` are optional dedicated models."""

    base: Any
    inpaint: Any = None
    upscale: Any = None


@dataclass
class Options:
    outputs: Path | None = Path("outputs")  # None: do not save (images still get a temp PNG with infotext)
    max_upload_mb: float = 20.0
    preview_every: int = 5  # steps between live previews; 0 = no previews
    queue_size: int = 16
    # A run nobody has read progress from for this long is abandoned (a cancel that Gradio could not
    # deliver, e.g. one arriving as the run starts) and stops at its next step.
    abandon_after: float = 30.0
    # Uploads, Gradio's cached results and temp PNGs older than this many seconds are deleted
    # (checked every half of it, at most every 10 min); 0 keeps them until the server stops.
    cache_max_age: float = 3600.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Jobs:
    """Cancel flags of the running generations, by session, so the Stop button reaches the worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, set()).add(flag)
        return flag

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            self._flags.get(session, set()).discard(flag)

    def cancel(self, session: str) -> int:
        """Ask every run of this session to stop at its next step; returns how many were asked."""
        with self._lock:
            flags = [f for f in self._flags.get(session, ()) if not f.is_set()]
        for f in flags:
            f.set()
        return len(flags)

    def active(self) -> int:
        """Runs not yet asked to stop, over all sessions (forgetting those that were)."""
        with self._lock:
            for session in list(self._flags):
                self._flags[session] = {f for f in self._flags[session] if not f.is_set()}
                if not self._flags[session]:
                    del self._flags[session]
            return sum(len(flags) for flags in self._flags.values())


class Saver:
    """Writes PNGs with infotext as `outputs/<task>/00012-<seed>-<slug>.png`.

    If the outputs folder is unwritable the image goes to a temp folder instead (the caller warns),
    so the user always gets a PNG that carries its parameters.
    """

    def __init__(self, folder: Path | None, temp_max_age: float = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._temp = Path(tempfile.mkdtemp(prefix="ldm-ui-"))
        self._lock = threading.Lock()
        self._next: dict[Path, int] = {}
        self.temp_max_age = temp_max_age  # temp PNGs older than this are deleted (0 = kept)
        self._pruned = time.monotonic()

    def save(self, image: Image.Image, infotext: str | None, *, seed: int | None, prompt: str, task: str) -> tuple[str | Image.Image, str | None]:
        """-> (file path or, if even the temp write failed, the image itself; warning or None)."""
        warning = None
        if self.folder is not None:
            try:
                return str(self._write(self.folder / task, image, infotext, seed, prompt)), None
            except OSError as exc:
                warning = f"could not save to {self.folder / task}: {exc.strerror or exc}; the image is only in this page"
        self._prune_temp()
        try:
            return str(self._write(self._temp, image, infotext, seed, prompt)), warning
        except OSError as exc:
            return image, warning or f"could not write a temporary PNG: {exc}"

    def _prune_temp(self) -> None:
        """--no-save and unwritable outputs put every image in the temp folder: keep it bounded."""
        if not self.temp_max_age or time.monotonic() - self._pruned < min(self.temp_max_age / 2, 600):
            return
        self._pruned = time.monotonic()
        cutoff = time.time() - self.temp_max_age
        for path in self._temp.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    def _write(self, folder: Path, image: Image.Image, infotext: str | None, seed: int | None, prompt: str) -> Path:
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            number = self._next.get(folder)
            if number is None:
                number = next_file_number(folder)
            path = folder / safe_filename(number, seed, prompt)
            while path.exists():  # another process writes here too
                number += 1
                path = folder / safe_filename(number, seed, prompt)
            self._next[folder] = number + 1
            if infotext:
                metadata.save_png(image, path, infotext)
            else:
                image.save(path, format="PNG")
            return path


@dataclass
class Context:
    """Everything the handlers share; created once in `ui.layout.build`."""

    pipes: Pipes
    options: Options = field(default_factory=Options)
    jobs: Jobs = field(default_factory=Jobs)
    saver: Saver | None = None

    def __post_init__(self) -> None:
        if self.saver is None:
            self.saver = Saver(self.options.outputs, temp_max_age=self.options.cache_max_age)


# ---- file names -----------------------------------------------------------------------------

_NUMBERED = re.compile(r"^(\d{5,})-")


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe excerpt of a prompt: ASCII letters/digits joined by '-', never a path."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    out = "-".join(words)[:max_len].strip("-")
    return out or "image"


def safe_filename(number: int, seed: int | None, prompt: str) -> str:
    parts = [f"{number:05d}"] + ([str(seed)] if seed is not None else []) + [slug(prompt)]
    return "-".join(parts) + ".png"


def next_file_number(folder: Path) -> int:
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


# ---- progress streaming ---------------------------------------------------------------------


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

    @property
    def info(self) -> str:
        return self.infotexts[0] if self.infotexts else ""


StepCallback = Callable[[int, int, Any], bool]


PREVIEW_SIDE = 128  # latents are 1/4..1/8 of the image; enlarge small previews so they are visible


def preview_image(latents) -> Image.Image:
    """Cheap latent -> RGB of the first image in the batch (no VAE), enlarged by a whole factor."""
    image = Image.fromarray(latent_preview(latents[:1])[0].numpy())
    factor = max(1, PREVIEW_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def stream_call(call: Callable[[StepCallback], Any], cancel: threading.Event, preview_every: int,
                abandon_after: float | None = None) -> Iterator[Step | Any]:
    """Run `call(callback)` in a worker thread; yield `Step`s as it progresses, then its return value.

    The callback returns the cancel flag, which is how ldm stops between steps. The flag is set
    when the consumer closes this generator (Stop, closed tab) or stops reading from it for
    `abandon_after` seconds (a cancel that never reached the generator).
    """
    cond = threading.Condition()
    state: dict[str, Any] = {"step": None, "preview": None, "done": False, "result": None, "error": None,
                             "read": time.monotonic()}

    def callback(step: int, total: int, latents) -> bool:
        # Previews only every few steps, and never on the last (the decoded image follows).
        image = preview_image(latents) if preview_every and step % preview_every == 0 and step < total else None
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
    return f"Stopped: {what}" if out.stopped else f"Done: {what}"


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


# ---- small conversions ----------------------------------------------------------------------


def as_int(name: str, value: Any) -> int:
    """Sliders and JSON deliver 20.0 for 20; anything not whole is the user's error."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def size_or_none(name: str, value: Any) -> int | None:
    """0 / None / empty = "take it from the image" (img2img, inpaint)."""
    return None if value in (None, "", 0, 0.0) else as_int(name, value)


def load_upload(ctx: Context, source: Any, what: str = "image", mode: str | None = "RGB") -> Image.Image:
    if source is None or source == "":
        raise ValueError(f"no {what}: upload one first")
    if isinstance(source, dict) and "path" in source:  # a gradio FileData passed through as a dict
        source = source["path"]
    return load_image(source, max_bytes=ctx.options.max_upload_bytes, mode=mode)


def module_function(module: str, name: str, feature: str) -> Callable:
    """The ldm function behind a feature, looked up when used: other modules land independently."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise Unavailable(f"{feature} is not available in this build ({module}.{name} is missing)") from None


def accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


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
             batch_size: Any, batch_count: Any, session: str) -> Iterator[Step | Output]:
    """Run `call(seed, callback)` `batch_count` times with consecutive seeds, save every image,
    yield progress, then one Output. Stop keeps the batches that finished."""
    batch_size = as_int("batch_size", batch_size)
    batch_count = as_int("batch_count", batch_count)
    if not 1 <= batch_count <= MAX_BATCH_COUNT:
        raise ValueError(f"batch_count must be from 1 to {MAX_BATCH_COUNT}, got {batch_count}")
    seed0 = first_seed(seed, batch_size * batch_count)
    out = Output([], [], [])
    cancel = ctx.jobs.start(session)
    try:
        for k in range(batch_count):
            if cancel.is_set():
                out.stopped = True
                break
            seed_k = seed0 + k * batch_size
            try:
                stream = stream_call(lambda cb, s=seed_k: call(s, cb), cancel, ctx.options.preview_every,
                                     ctx.options.abandon_after)
                for item in stream:
                    if isinstance(item, Step):
                        item.batch, item.batch_count = k, batch_count
                        yield item
                    else:
                        _collect(ctx, out, item, task, prompt)
            except ldm.Cancelled:
                out.stopped = True
                break
    finally:
        ctx.jobs.finish(session, cancel)
    yield out


def _collect(ctx: Context, out: Output, result, task: str, prompt: str) -> None:
    for image, seed, info in zip(result.images, result.seeds, result.infotexts):
        saved, warning = ctx.saver.save(image, info, seed=seed, prompt=prompt, task=task)
        out.images.append(saved)
        out.infotexts.append(info)
        out.seeds.append(seed)
        if warning and warning not in out.warnings:
            out.warnings.append(warning)


# ---- tasks ----------------------------------------------------------------------------------


def txt2img(ctx: Context, prompt: str = "", negative_prompt: str = "", sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0,
            width: int | None = None, height: int | None = None, seed: int = -1, batch_size: int = 1,
            batch_count: int = 1, clip_skip: int = 1, hires_scale: float = 1.0, hires_strength: float = 0.5,
            fast: bool = False, *, session: str = "") -> Iterator[Step | Output]:
    pipe = ctx.pipes.base
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(width=size_or_none("width", width), height=size_or_none("height", height),
                    batch_size=as_int("batch_size", batch_size), negative_prompt=negative_prompt)
    if fast:  # ldm's opt-in fast preset (deep-feature reuse + guidance truncation)
        settings["fast"] = True
    if hires_scale and float(hires_scale) > 1:
        if not _has_hires(pipe):
            raise Unavailable("hires fix is not available in this build (txt2img has no hires_scale yet)")
        settings.update(hires_scale=float(hires_scale), hires_strength=float(hires_strength))

    def call(seed: int, callback: StepCallback):
        return pipe.txt2img(prompt, seed=seed, callback=callback, **settings)

    return generate(ctx, "txt2img", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session)


def _has_hires(pipe) -> bool:
    return "hires_scale" in inspect.signature(pipe.txt2img).parameters or "hires_scale" in ldm.GenerationParams.field_names()


def img2img(ctx: Context, image: Any = None, prompt: str = "", negative_prompt: str = "", strength: float = 0.75,
            sampler: str = samplers.DEFAULT_SAMPLER, schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20,
            guidance_scale: float = 7.0, width: int | None = 0, height: int | None = 0, seed: int = -1,
            batch_size: int = 1, batch_count: int = 1, clip_skip: int = 1, *, session: str = "") -> Iterator[Step | Output]:
    pipe = ctx.pipes.base
    picture = load_upload(ctx, image)
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(width=size_or_none("width", width), height=size_or_none("height", height),
                    batch_size=as_int("batch_size", batch_size), negative_prompt=negative_prompt, strength=float(strength))

    def call(seed: int, callback: StepCallback):
        return pipe.img2img(picture, prompt, seed=seed, callback=callback, **settings)

    return generate(ctx, "img2img", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session)


def inpaint(ctx: Context, image: Any = None, mask: Any = None, prompt: str = "", negative_prompt: str = "",
            strength: float = 0.75, mask_blur: int = 4, inpaint_area: str = "whole", padding: int = 32,
            masked_content: str = "original", invert_mask: bool = False, sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0,
            width: int | None = 0, height: int | None = 0, seed: int = -1, batch_size: int = 1,
            batch_count: int = 1, clip_skip: int = 1, *, session: str = "") -> Iterator[Step | Output]:
    """mask: white = repaint; an alpha channel that varies counts with transparent = repaint."""
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    module_function("ldm.inpaint", "inpaint", "inpainting")
    picture = load_upload(ctx, image)
    mask_image = load_upload(ctx, mask, "mask", mode=None)  # keep alpha: ldm reads it
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(
        negative_prompt=negative_prompt, strength=float(strength), mask_blur=as_int("mask_blur", mask_blur),
        inpaint_area=inpaint_area, padding=as_int("padding", padding), masked_content=masked_content,
        invert_mask=bool(invert_mask), width=size_or_none("width", width), height=size_or_none("height", height),
        batch_size=as_int("batch_size", batch_size),
    )

    def call(seed: int, callback: StepCallback):
        return pipe.inpaint(picture, mask_image, prompt, seed=seed, callback=callback, **settings)

    return generate(ctx, "inpaint", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session)


def outpaint(ctx: Context, image: Any = None, prompt: str = "", negative_prompt: str = "", left: int = 0,
             right: int = 0, top: int = 0, bottom: int = 0, strength: float = 1.0, mask_blur: int = 4,
             masked_content: str = "fill", sampler: str = samplers.DEFAULT_SAMPLER,
             schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0, seed: int = -1,
             batch_size: int = 1, batch_count: int = 1, clip_skip: int = 1, *, session: str = "") -> Iterator[Step | Output]:
    pipe = ctx.pipes.inpaint or ctx.pipes.base
    fn = module_function("ldm.inpaint", "outpaint", "outpainting")
    picture = load_upload(ctx, image)
    settings = sampling(steps, guidance_scale, sampler, schedule, clip_skip)
    settings.update(negative_prompt=negative_prompt, batch_size=as_int("batch_size", batch_size),
                    **{side: as_int(side, v) for side, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom))})
    # Optional knobs are passed only if this build's outpaint takes them.
    extras = {"strength": float(strength), "mask_blur": as_int("mask_blur", mask_blur), "masked_content": masked_content}
    settings.update({k: v for k, v in extras.items() if accepts(fn, k)})

    def call(seed: int, callback: StepCallback):
        return pipe.outpaint(picture, prompt, seed=seed, callback=callback, **settings)

    return generate(ctx, "outpaint", call, prompt=prompt, seed=seed, batch_size=batch_size,
                    batch_count=batch_count, session=session)


def upscale(ctx: Context, image: Any = None, method: str = "lanczos", scale: float = 2.0, prompt: str = "",
            negative_prompt: str = "", tile_size: int = 0, tile_overlap: int = 32, noise_level: int = 20,
            strength: float = 0.5, upscaler: str = "lanczos", sampler: str = samplers.DEFAULT_SAMPLER,
            schedule: str = samplers.DEFAULT_SCHEDULE, steps: int = 20, guidance_scale: float = 7.0, seed: int = -1,
            *, session: str = "") -> Iterator[Step | Output]:
    """method: "x4 model" (a loaded x4 upscaler), "hires fix" (redraw with the base model), or a resize."""
    picture = load_upload(ctx, image)
    if method in choices.RESIZE_METHODS:
        return _resize(ctx, picture, image, method, scale)
    if method not in (choices.UPSCALE_X4, choices.UPSCALE_HIRES):
        raise ValueError(f"unknown upscale method {method!r}; choose one of: {', '.join(choices.UPSCALE_METHODS)}")
    settings = sampling(steps, guidance_scale, sampler, schedule)
    settings.pop("clip_skip")
    settings["negative_prompt"] = negative_prompt
    if method == choices.UPSCALE_X4:
        module_function("ldm.upscale", "upscale", "the x4 upscaler")
        pipe = ctx.pipes.upscale
        if pipe is None:
            raise Unavailable("no x4 upscale model is loaded; start the app with --upscale-model")
        tile = as_int("tile_size", tile_size)
        settings.update(noise_level=as_int("noise_level", noise_level), tile_size=tile or None,
                        tile_overlap=as_int("tile_overlap", tile_overlap))

        def call(seed: int, callback: StepCallback):
            return pipe.upscale(picture, prompt, seed=seed, callback=callback, **settings)
    else:
        module_function("ldm.upscale", "hires_fix", "hires fix")
        pipe = ctx.pipes.base
        settings.update(scale=float(scale), strength=float(strength), upscaler=upscaler)

        def call(seed: int, callback: StepCallback):
            return pipe.hires_fix(picture, prompt, seed=seed, callback=callback, **settings)

    return generate(ctx, "upscale", call, prompt=prompt, seed=seed, batch_size=1, batch_count=1, session=session)


def _resize(ctx: Context, picture: Image.Image, source: Any, method: str, scale: float) -> Iterator[Output]:
    resize = getattr(ldm, "upscale_image", None) or module_function("ldm.upscale", "upscale_image", "resizing")
    scale = float(scale)
    if not 0 < scale <= 8:
        raise ValueError(f"scale must be in (0, 8], got {scale}")
    image = resize(picture, scale, method=method)
    info = _infotext_of(ctx, source) or ""  # keep the original's parameters on the bigger copy
    saved, warning = ctx.saver.save(image, info, seed=None, prompt=f"{method}-x{scale:g}", task="upscale")
    yield Output([saved], [info], [], [warning] if warning else [])


# ---- PNG info and send-to -------------------------------------------------------------------


def _infotext_of(ctx: Context, source: Any) -> str | None:
    try:
        return metadata.read_infotext(load_upload(ctx, source, mode=None))
    except (ValueError, OSError):
        return None


MAX_INFOTEXT_CHARS = 64 * 1024  # PNG info shows at most this much of a `parameters` chunk


def png_info(ctx: Context, image: Any = None) -> str:
    """The A1111 parameters text of an image, or a sentence saying there are none ("" for no image:
    the UI calls this when the picture is cleared). Longer texts are cut at MAX_INFOTEXT_CHARS."""
    if image is None or image == "":
        return ""
    text = metadata.read_infotext(load_upload(ctx, image, mode=None))
    if not text:
        return "No generation parameters found in this image."
    return truncate(text, MAX_INFOTEXT_CHARS)


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[… truncated: showing the first {limit:,} of {len(text):,} characters]"


def infotext_fields(infotext: str) -> dict[str, Any]:
    """Parsed infotext -> txt2img parameter values (keys are txt2img's parameter names)."""
    if not infotext or not infotext.strip():
        return {}
    fields = metadata.infotext_to_kwargs(metadata.parse_infotext(infotext))
    if "sampler" in fields:
        try:  # old combined names ("DPM++ 2M Karras") split into sampler + schedule
            fields["sampler"], fields["schedule"] = samplers.resolve(fields["sampler"], fields.get("schedule"))
        except ValueError:
            fields.pop("sampler")
            fields.pop("schedule", None)
    fields.pop("strength", None)  # txt2img has no denoising strength
    return fields


def selected_image(gallery: list | None, index: int | None) -> str | None:
    """The file of the selected (or first) gallery item; gallery values are paths or (path, caption)."""
    if not gallery:
        return None
    i = index if isinstance(index, int) and 0 <= index < len(gallery) else 0
    item = gallery[i]
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("path") or item.get("image", {}).get("path")
    return item


def selected(values: list | None, index: int | None, default: Any = None) -> Any:
    if not values:
        return default
    return values[index] if isinstance(index, int) and 0 <= index < len(values) else values[0]


# ---- inpaint editor -------------------------------------------------------------------------


def editor_to_image_and_mask(editor: dict | None, mask_upload: Any = None) -> tuple[Image.Image, Image.Image]:
    """An ImageEditor value (background + painted layers) -> (RGB image, "L" mask, 255 = repaint).

    Strokes are opaque paint on transparent layers; ldm would read a varying alpha as
    transparent = repaint, the opposite, so the layers become an explicit white-on-black mask.
    An uploaded mask wins over the drawing.
    """
    image = editor_image(editor)
    if mask_upload is not None:
        return image, load_image(mask_upload, mode=None)  # alpha kept: ldm reads it
    painted = np.zeros((image.height, image.width), dtype=bool)
    for layer in (editor or {}).get("layers") or []:
        layer = _as_pil(layer)
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").getchannel("A"))
        if alpha.shape != painted.shape:  # a canvas bigger than the picture: scale to it
            alpha = np.asarray(layer.convert("RGBA").getchannel("A").resize(image.size, Image.Resampling.NEAREST))
        painted |= alpha > 0
    if not painted.any():
        raise ValueError("no mask: paint over the area to repaint, or upload a mask")
    return image, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def editor_image(editor: dict | None) -> Image.Image:
    """The picture in an ImageEditor value, as RGB (what outpainting starts from)."""
    background = (editor or {}).get("background")
    if background is None:
        raise ValueError("no image: upload one in the inpaint editor first")
    return _flatten(_as_pil(background))


def _as_pil(value: Any) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return load_image(value, mode=None)


def _flatten(image: Image.Image) -> Image.Image:
    """RGBA -> RGB over white (what the editor shows); other modes converted."""
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
