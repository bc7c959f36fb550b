"""Loop extensions (see `ldm.denoise.Extension` for the hooks): each feature that changes what
happens inside the denoising loop is one small class here, never a branch in the loop."""
from .blend import KnownAreaBlend
from .control import ControlResiduals
from .fast import FastPreset
from .inputs import UNetInputs
from .tome import TokenMerging

__all__ = ["ControlResiduals", "FastPreset", "KnownAreaBlend", "TokenMerging", "UNetInputs"]
