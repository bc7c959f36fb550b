"""A1111's SDXL refiner: one sampler run whose last steps use another model's U-Net and conditioning.

`txt2img(..., refiner=<loaded SDXL refiner or SDXL model>, refiner_switch_at=0.8)`: the steps whose
timestep is at or above `(1 - switch_at)` of the training schedule run on the base model, the rest on
the refiner, with the refiner's own prompt encoding (a refiner's size ids carry the aesthetic score,
6.0 / 2.5 as diffusers). The split is diffusers' `denoising_end` / `denoising_start` cutoff, so the result
equals diffusers' base-then-refiner hand-off wherever the sampler keeps no history across it (Euler,
Euler a; diffusers restarts multistep samplers' history at the hand-off, one run does not).

The switch is a loop extension: it wraps the U-Net (`wrap_unet`) and, from the switch on, passes the
refiner's added conditioning (`unet_kwargs`, after the family's, so it wins). The loop does not change.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..denoise import Extension, StepInfo, step_embeds
from ..params import REFINER_SWITCH
from ..prompt_tags import extract_loras


def check_base(model, switch_at, *, hires: bool = False, control: bool = False) -> None:
    """What can be refused before a refiner is even loaded: the switch point, a model that is not SDXL, and
    what the refiner does not combine with yet (the hires fix, ControlNet)."""
    if hires or control:
        raise ValueError("the refiner with the hires fix or ControlNet is not supported yet")
    if not isinstance(switch_at, (int, float)) or isinstance(switch_at, bool) or switch_at not in REFINER_SWITCH:
        raise ValueError(f"refiner_switch_at must be a fraction of the steps between {REFINER_SWITCH.low:g} and "
                         f"{REFINER_SWITCH.high:g} (e.g. 0.8), got {switch_at!r}")
    _require_sdxl("the model", model)


def check_refiner(model, refiner, switch_at, *, hires: bool = False, control: bool = False) -> None:
    """Refuse what cannot work, before any model work: both models must be SDXL (one latent space)."""
    check_base(model, switch_at, hires=hires, control=control)
    _require_sdxl("the refiner", refiner)
    if refiner.vae_scale_factor != model.vae_scale_factor or refiner.unet.config.in_channels != 4:
        raise ValueError(f"the refiner {refiner.name!r} does not share the model's 4-channel latent space")


def _require_sdxl(what: str, m) -> None:
    family = getattr(getattr(m, "family", None), "name", None)
    if family != "sdxl":
        name = getattr(m, "name", type(m).__name__)
        kind = f"of the {family!r} family" if family else "not a loaded pipeline"
        raise ValueError(f"a refiner needs SDXL models, but {what} ({name!r}) is {kind}; pass refiner=<an SDXL "
                         "refiner or SDXL pipeline from ldm.load> with an SDXL model")


class RefinerSwitch(Extension):
    """Runs `refiner`'s U-Net with its conditioning for `params` on the steps after the switch."""

    def __init__(self, refiner, params, switch_at: float):
        self.refiner = refiner
        self.params = params
        self.switch_at = switch_at
        train = int(refiner.scheduler_config.get("num_train_timesteps", 1000))
        self.cutoff = int(round(train - switch_at * train))  # diffusers' discrete_timestep_cutoff
        self.step: StepInfo | None = None
        self.conditioning = None

    def refined(self, step: StepInfo) -> bool:
        return bool(step.timestep < self.cutoff)

    def wrap_unet(self, unet):
        # Called once per run, inside the run's inference mode: encode the prompts for the refiner now.
        # <lora:...> tags apply to the model, not the refiner; they are never encoded.
        self.conditioning = self.refiner.family.encode(replace(self.params, prompt=extract_loras(self.params.prompt)[0]))
        return _SwitchedUNet(unet, self)

    def unet_kwargs(self, step: StepInfo) -> dict:
        self.step = step  # the wrapped U-Net is called next, for this step
        if not self.refined(step):
            return {}
        kwargs: dict = {}
        for ext in self.conditioning.extensions:
            kwargs.update(ext.unet_kwargs(step))
        return kwargs

    def embeds(self, step: StepInfo) -> torch.Tensor:
        """The refiner's text conditioning for this step (a scheduled prompt's too)."""
        c = self.conditioning
        return step_embeds(step, c.extensions, torch.cat([c.uncond, c.cond]) if step.guided else c.cond)

    def infotext(self) -> dict:
        return {"Refiner": f"{self.refiner.name} [{self.refiner.model_hash}]", "Refiner switch at": self.switch_at}


class _SwitchedUNet:
    """Calls like the U-Net; after the switch, the refiner's U-Net with the refiner's text conditioning."""

    def __init__(self, unet, switch: RefinerSwitch):
        self.unet = unet
        self.switch = switch

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        step = self.switch.step
        if step is None or not self.switch.refined(step):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        unet = self.switch.refiner.unet
        embeds = self.switch.embeds(step).to(unet.dtype)
        return unet(sample.to(unet.dtype), timestep, encoder_hidden_states=embeds, **kwargs)
