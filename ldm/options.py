"""Runtime options of a loaded pipeline: one frozen object given to `ldm.load` and visible as `pipe.options`.

Two kinds of field:
- load-time (`attention`, `compile`, `offload`, `channels_last`, `openvino`): applied to the weights once, by `ldm.load`;
- per-call behaviour (sizes, VAE tiling, memory budget): read by the tasks on every call, so
  `pipe.with_options(vae_tiling=True)` can give a second pipeline on the same weights with other values.

The tuples below are the one list of choices the app's flags and the UI read.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

ATTENTION = ("auto", "sdpa", "xformers", "chunked")  # see ldm.accel.select_attention
OFFLOAD = ("none", "model", "sequential")  # see ldm.accel.apply_offload
LOAD_TIME = ("attention", "compile", "offload", "channels_last", "openvino", "openvino_cache")


@dataclass(frozen=True)
class Options:
    max_size: int = 2048  # largest width/height of a generation, in pixels
    max_batch: int = 16  # largest batch_size
    max_upscale_size: int = 4096  # largest output side of the x4 upscaler and the classic resamplers
    max_prompt_tokens: int = 1200  # per prompt (16 chunks of 75): every chunk is encoded and attended over
    vae_tiling: bool = False  # encode/decode large images in overlapping tiles (memory grows with the tile)
    vae_tile_size: int = 64  # VAE tile, in latent pixels
    memory_budget_mb: float | None = None  # x4 upscaler working memory per tile; None: free GPU memory / a CPU default
    attention: str = "auto"
    compile: bool = False
    offload: str = "none"
    channels_last: bool | None = None  # None: on for CUDA, off elsewhere
    openvino: bool = False  # CPU: U-Net and VAE decoder through OpenVINO (ldm.openvino_backend); float32 weights
    openvino_cache: str | None = None  # folder for converted OpenVINO models; None: ~/.cache/ldm/openvino

    def validate(self) -> "Options":
        for name in ("max_size", "max_batch", "max_upscale_size", "max_prompt_tokens"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.vae_tiling, bool):
            raise ValueError(f"vae_tiling must be True or False, got {self.vae_tiling!r}")
        if not isinstance(self.vae_tile_size, int) or isinstance(self.vae_tile_size, bool) or self.vae_tile_size < 2:
            raise ValueError(f"vae_tile_size must be a whole number of latent pixels, at least 2; got {self.vae_tile_size!r}")
        mb = self.memory_budget_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0):
            raise ValueError(f"memory_budget_mb must be a positive number of megabytes or None; got {mb!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {self.attention!r}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}; got {self.offload!r}")
        if not isinstance(self.openvino, bool):
            raise ValueError(f"openvino must be True or False, got {self.openvino!r}")
        if self.openvino and self.compile:
            raise ValueError("openvino=True and compile=True both compile the U-Net: choose one")
        return self

    @property
    def vae_tile(self) -> int | None:
        """The VAE tile size when tiling is on, else None (what ldm.latents.encode/decode take)."""
        return self.vae_tile_size if self.vae_tiling else None

    def changed(self, **changes) -> "Options":
        """A copy with per-call fields changed; load-time fields cannot change on loaded weights."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        fixed = sorted(k for k in changes if k in LOAD_TIME and changes[k] != getattr(self, k))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} are applied when the weights load: pass them to ldm.load")
        return replace(self, **changes).validate()


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
