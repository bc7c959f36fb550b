"""txt2img and img2img: the two plain starts of the loop."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .. import images as imgs
from ..components import ModelKind
from ..controlnet import with_control
from ..denoise import Extension, StepCallback
from ..engine import Model, Result, Start, params_for, require, run, size_from_image, strength_slice
from ..latents import encode, seeded_noise
from ..params import GenerationParams


def txt2img(model: Model, prompt: str = "", *, callback: StepCallback | None = None,
            extensions: Sequence[Extension] = (), control=(), **settings) -> Result:
    """Images from text, starting from seeded noise. Settings are `GenerationParams` fields;
    `control`: `ldm.ControlUnit`s (ControlNet), see `ldm.controlnet`."""
    p = txt2img_params(model, prompt, settings)
    p, extensions = with_control(model, p, control, extensions)

    def start(scheduler, gens):
        f = model.vae_scale_factor
        shape = (p.batch_size, model.unet.config.in_channels, p.height // f, p.width // f)
        noise = seeded_noise(shape, gens, dtype=model.dtype, device=model.device)
        return Start(noise * scheduler.init_noise_sigma, scheduler.timesteps)

    return run(model, p, start, callback, extensions)


def txt2img_params(model: Model, prompt: str, settings: dict) -> GenerationParams:
    """txt2img's validated parameters (the hires fix plans its second pass from them)."""
    require(model, ModelKind.BASE, "txt2img")
    return params_for(model, prompt, settings, strength=1.0)


def img2img(model: Model, image, prompt: str = "", *, strength: float = 0.75, callback: StepCallback | None = None,
            extensions: Sequence[Extension] = (), control=(), **settings) -> Result:
    """Redraw an image. width/height default to the image's size rounded down to the size step."""
    require(model, ModelKind.BASE, "img2img")
    image = imgs.load_image(image)
    p = params_for(model, prompt, size_from_image(model, image, settings), strength=strength)
    p, extensions = with_control(model, p, control, extensions)
    resized = image.resize((p.width, p.height), Image.LANCZOS) if image.size != (p.width, p.height) else image
    pixels = imgs.pil_to_tensor([resized])

    def start(scheduler, gens):
        timesteps = strength_slice(scheduler, p.steps, p.strength)
        init = encode(model.vae, pixels.repeat(p.batch_size, 1, 1, 1), gens, tile=model.options.vae_tile)
        noise = seeded_noise(init.shape, gens, dtype=model.dtype, device=model.device)
        return Start(scheduler.add_noise(init, noise, timesteps[:1].repeat(p.batch_size)), timesteps)

    return run(model, p, start, callback, extensions, extra_info={"Denoising strength": p.strength})
