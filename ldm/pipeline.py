"""`Pipeline`: a loaded model plus the tasks users run on it (each one a module in ldm/tasks/)."""
from __future__ import annotations

import os
from dataclasses import replace

from .approx_decoder import DECODER_FILES, ApproxDecodeVAE, find_approx_decoder, load_approx_decoder
from .controlnet import with_control
from .denoise import StepCallback
from .engine import Model, Result
from .extensions import FastPreset
from .extensions.refiner import RefinerSwitch, check_refiner
from .previews import Previewer, previewer
from .tasks import generate, hires, inpaint, upscale_x4
from .vae_files import load_vae


class Pipeline(Model):
    """txt2img, img2img, inpaint, outpaint, upscale and hires_fix on one loaded model.

    `fast=True` on any task adds the fast preset (ldm.extensions.fast): ~2x fewer U-Net FLOPs for a
    slightly different image. Run one call at a time per pipeline (see `ldm.engine.Model`)."""

    def with_options(self, **changes) -> "Pipeline":
        """A pipeline on the same weights with other per-call options (sizes, VAE tiling, memory budget)."""
        return Pipeline(self.components, self.options.changed(**changes), self.accel, library=self.library)

    def with_vae(self, name: str | None) -> "Pipeline":
        """A pipeline on the same weights with the VAE `name` from the models folder's VAE/ (A1111's "SD VAE"),
        or the checkpoint's own with "Automatic"/None. The infotext then says `VAE hash: ..., VAE: name`."""
        own = self.components.own_vae or self.components.vae
        if name is None or name in ("Automatic", "None"):
            components = replace(self.components, vae=own, vae_name=None, vae_hash=None, own_vae=None)
        else:
            if self.library is None:
                raise ValueError(f"VAE {name!r} needs a models folder: load the model with ldm.load(..., models_dir=DIR)")
            entry = self.library.find("vaes", name)
            components = replace(self.components, vae=load_vae(entry.path, like=own), vae_name=entry.name,
                                 vae_hash=self.library.short_hash(entry), own_vae=own)
        return Pipeline(components, self.options, self.accel, library=self.library)

    def with_approx_decode(self, decoder: str | os.PathLike | None = None) -> "Pipeline":
        """A pipeline on the same weights whose images are decoded by a TAESD decoder (`ldm.approx_decoder`):
        opt-in, several times faster than the VAE, slightly softer. `decoder`: a file or AutoencoderTiny folder,
        or None for the family's decoder in the models folder's VAE-approx/. Encoding still uses the full VAE."""
        if decoder is None:
            found = find_approx_decoder(self.library.root, self.family.name) if self.library is not None else None
            if found is None:
                raise ValueError("no approximate decoder: put taesd_decoder.safetensors (SDXL: taesdxl_decoder.safetensors) in "
                                 "the models folder's VAE-approx/ and load with models_dir=..., or pass its path")
            decoder = found
        vae = self.components.vae
        tiny = load_approx_decoder(decoder, device=vae.device, dtype=vae.dtype)
        components = replace(self.components, vae=ApproxDecodeVAE(vae, tiny), vae_name=f"approx {os.path.basename(decoder)}",
                             vae_hash=None, own_vae=self.components.own_vae or vae)
        return Pipeline(components, self.options, self.accel, library=self.library)

    def previewer(self) -> Previewer:
        """How live previews of this model are drawn (`ldm.previews`): its own VAE when that is small, else its
        family's TAESD decoder from the models folder's VAE-approx/, else a linear map fitted now. Once per model."""
        found = None
        if self.library is not None and self.family.name in DECODER_FILES:
            found = find_approx_decoder(self.library.root, self.family.name)
        vae = self.components.vae
        return previewer(vae, load_approx_decoder(found, device=vae.device, dtype=vae.dtype) if found else None)

    def warmup(self, width: int | None = None, height: int | None = None, steps: int = 2) -> None:
        """Pay torch.compile / allocator warm-up for this size now instead of on the first request
        (the guided batch shape that normal generations use)."""
        self.txt2img("warmup", width=width, height=height, steps=steps, seed=0, guidance_scale=7.0)

    def txt2img(self, prompt: str = "", *, callback: StepCallback | None = None, fast: bool = False,
                hires_scale: float | None = None, hires_strength: float = 0.5, hires_upscaler: str = "latent",
                hires_steps: int | None = None, control=(), refiner: "Pipeline | None" = None,
                refiner_switch_at: float = 0.8, **settings) -> Result:
        """Generate images from text. Settings are `GenerationParams` fields (width, steps, sampler, ...).
        hires_scale > 1: A1111's hires fix, a second pass at that scale (see `ldm.tasks.hires`).
        control: `ldm.ControlUnit`s (ControlNet; see `ldm.controlnet`); with the hires fix they guide both passes,
        the second with each unit's image fitted to the hires size (as A1111's extension, "Both").
        refiner: an SDXL refiner pipeline that runs the steps after `refiner_switch_at` (see `ldm.extensions.refiner`)."""
        second = None
        extensions = _fast(fast)
        if refiner is not None:  # validated now, before any model work
            check_refiner(self, refiner, refiner_switch_at, hires=hires_scale is not None, control=bool(control))
            extensions += (RefinerSwitch(refiner, generate.txt2img_params(self, prompt, settings), refiner_switch_at),)
        if hires_scale is not None:  # validated now, before the first pass
            first = generate.txt2img_params(self, prompt, settings)
            second = hires.plan(self, first, scale=hires_scale, upscaler=hires_upscaler, strength=hires_strength,
                                steps=hires_steps)
        result = generate.txt2img(self, prompt, callback=callback, extensions=extensions, control=control, **settings)
        if second is None or second.scale == 1:
            return result
        # The units again for the second pass: control maps at the hires size, the first pass's seed (shuffle).
        _, extensions = with_control(self, replace(second.params, seed=result.seeds[0]), control, _fast(fast))
        return second.run(self, result, callback, extensions)

    def img2img(self, image, prompt: str = "", *, strength: float = 0.75, callback: StepCallback | None = None,
                fast: bool = False, control=(), **settings) -> Result:
        """Redraw an image. width/height default to the image's size rounded down to the size step."""
        return generate.img2img(self, image, prompt, strength=strength, callback=callback, extensions=_fast(fast),
                                control=control, **settings)

    def inpaint(self, image, mask, prompt: str = "", *, fast: bool = False, **kwargs) -> Result:
        """Repaint the masked (white) part of an image; see `ldm.tasks.inpaint.inpaint`."""
        return inpaint.inpaint(self, image, mask, prompt, extensions=_fast(fast), **kwargs)

    def outpaint(self, image, prompt: str = "", *, fast: bool = False, **kwargs) -> Result:
        """Extend the canvas on chosen sides and paint the new area; see `ldm.tasks.inpaint.outpaint`."""
        return inpaint.outpaint(self, image, prompt, extensions=_fast(fast), **kwargs)

    def upscale(self, image, prompt: str = "", *, fast: bool = False, **kwargs) -> Result:
        """x4 upscaler models; see `ldm.tasks.upscale_x4.upscale`."""
        return upscale_x4.upscale(self, image, prompt, extensions=_fast(fast), **kwargs)

    def hires_fix(self, image_or_result, prompt: str = "", *, fast: bool = False, **kwargs) -> Result:
        """Upscale (latents or pixels) and redraw at a denoising strength; see `ldm.tasks.hires.hires_fix`."""
        return hires.hires_fix(self, image_or_result, prompt, extensions=_fast(fast), **kwargs)


def _fast(fast: bool) -> tuple:
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be True or False, got {fast!r}")
    return (FastPreset(),) if fast else ()

