"""What a model's U-Net predicts: the noise (epsilon) or v (Salimans & Ho's velocity).

The scheduler has to know; guessing wrong gives noise or washed-out images. A diffusers folder says
so in its scheduler config. A single file usually does not: SD 2.x comes as a 512px epsilon model
and a 768px v-prediction model with identical keys and shapes. The order of evidence
(`single_file.load_single_file`): the caller's `prediction_type`, the `v_pred` marker some trainers
add, a `config=` folder's scheduler, and for SD 2.x on the bundled configs, `predicts_v` below.

Why A1111's test and not diffusers' guess: diffusers' single-file loader calls an SD 2.x checkpoint
epsilon only when its pickle says `global_step == 875000` (the official 512-base .ckpt) and v
otherwise, so every .safetensors file, including fine-tunes of the 512 model, becomes v-prediction.
A1111 (`modules/sd_models_config.py`, `is_using_v_parameterization_for_sd2`) looks at what the
weights do, which works for fine-tunes and for any file format.
"""
from __future__ import annotations

from enum import Enum

import torch


class PredictionType(str, Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"

    @classmethod
    def parse(cls, value: "str | PredictionType | None") -> "PredictionType | None":
        """None or "auto" = decide from the model; else one of the values, or a ValueError naming them."""
        if value is None or value == "auto":
            return None
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(["auto", *(p.value for p in cls)])
            raise ValueError(f"prediction_type must be one of {allowed}; got {value!r}") from None


def predicts_v(unet: torch.nn.Module) -> bool:
    """A1111's test: at t = 999 the input is nearly pure noise. Fed a constant latent (0.5) and constant text
    conditioning (0.5), an epsilon U-Net returns about its input (the noise it sees), a v U-Net returns about
    -x0, far below it: the mean of (output - input) is below -1 for v models (A1111's threshold).
    One U-Net call on an 8x8 latent: well under a second for SD 2.x on a CPU."""
    param = next(unet.parameters())
    kwargs = {"device": param.device, "dtype": param.dtype}
    latents = torch.full((1, unet.config.in_channels, 8, 8), 0.5, **kwargs)
    text = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, **kwargs)
    with torch.inference_mode():
        out = unet(latents, torch.tensor([999], device=param.device), encoder_hidden_states=text).sample
    return (out.float() - latents.float()).mean().item() < -1
