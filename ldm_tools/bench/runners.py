"""One timed generation per call, for our pipeline and for diffusers', measured the same way."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import measure


@dataclass(frozen=True)
class Settings:
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = "blurry, low quality"
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str = "DPM++ 2M"
    guidance_scale: float = 7.0
    seed: int = 1


@dataclass
class Sample:
    seconds: float  # end to end: prompt encoding, loop, VAE decode, PIL conversion
    cpu_seconds: float  # process CPU time of the same span (all threads): steadier than wall time on a shared machine
    step_seconds: list[float]  # wall time between consecutive step callbacks
    decode_seconds: float
    peak_bytes: int | None
    rss_before: int | None
    image: Image.Image = field(repr=False)

    @property
    def per_step(self) -> float:
        """Mean step time, excluding the first (it also pays for prompt encoding and set-up)."""
        return statistics.fmean(self.step_seconds) if self.step_seconds else float("nan")


class _DecodeTimer:
    """Wraps vae.decode on the instance (both pipelines call it) and adds up its wall time."""

    def __init__(self, vae, device: torch.device):
        self.vae, self.device, self.total = vae, device, 0.0
        self.original = vae.decode

    def __enter__(self) -> "_DecodeTimer":
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = self.original(*args, **kwargs)
            measure.sync(self.device)
            self.total += time.perf_counter() - t
            return out

        self.vae.decode = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.vae.decode  # back to the class method


def _timed(run: Callable[[Callable[[], None]], Image.Image], vae, device: torch.device) -> Sample:
    """`run(tick)` generates one image and calls tick() at the end of every step."""
    marks: list[float] = []

    def tick() -> None:
        measure.sync(device)
        marks.append(time.perf_counter())

    measure.sync(device)
    before = measure.rss_bytes()
    measure.reset_peak(device)
    with _DecodeTimer(vae, device) as dec:
        t, c = time.perf_counter(), time.process_time()
        image = run(tick)
        measure.sync(device)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return Sample(seconds, cpu, steps, dec.total, measure.peak_bytes(device), before, image)


def run_ours(pipe, s: Settings, *, fast: bool = False, extensions: tuple = ()) -> Sample:
    from ldm.extensions import FastPreset
    from ldm.tasks import generate

    def run(tick):
        def callback(step, total, latents):
            tick()

        exts = ((FastPreset(),) if fast else ()) + tuple(extensions)
        r = generate.txt2img(pipe, s.prompt, negative_prompt=s.negative_prompt, width=s.width, height=s.height, steps=s.steps,
                             sampler=s.sampler, guidance_scale=s.guidance_scale, seed=s.seed, callback=callback, extensions=exts)
        return r.images[0]

    return _timed(run, pipe.vae, pipe.device)


def diffusers_pipeline(ours, s: Settings):
    """diffusers' StableDiffusionPipeline on the very same module objects (same weights, same memory)."""
    from diffusers import StableDiffusionPipeline

    from ldm.samplers import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=make_scheduler(s.sampler, "Automatic", ours.scheduler_config, seeds=[s.seed]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, s: Settings) -> Sample:
    def run(tick):
        def on_step_end(_pipe, step, timestep, kwargs):
            tick()
            return kwargs

        out = pipe(s.prompt, negative_prompt=s.negative_prompt, width=s.width, height=s.height,
                   num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                   generator=[torch.Generator("cpu").manual_seed(s.seed)], callback_on_step_end=on_step_end)
        return out.images[0]

    return _timed(run, pipe.vae, pipe.unet.device)
