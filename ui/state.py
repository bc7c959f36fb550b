"""What the web UI holds for its lifetime: the loaded pipelines, the app's options, and the
`Context` every handler receives (created once in `ui.layout.build`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .controlnets import ControlNets
from .backend import Backend, InProcess
from .jobs import Jobs
from .models import Models
from .saving import Saver
from .turns import Queues


@dataclass
class Pipes:
    """The loaded pipelines. `inpaint` / `upscale` are optional dedicated models."""

    base: Any
    inpaint: Any = None
    upscale: Any = None
    # Dedicated models the app chose for one checkpoint (the demo model's own inpainting and x4 models) serve
    # only with it: a real checkpoint switched to must not inpaint or upscale through the demo's tiny models.
    # `paired` names those fields ("inpaint", "upscale"); models the user named serve with every checkpoint.
    paired_with: str | None = None
    paired: tuple[str, ...] = ()
    parked: dict[str, Any] = field(default_factory=dict, repr=False)  # the paired models while another serves

    def follow(self, checkpoint: str) -> None:
        """Called on every checkpoint switch (ui.models): park or restore the paired dedicated models."""
        if checkpoint == self.paired_with:
            for kind, pipe in self.parked.items():
                setattr(self, kind, pipe)
            self.parked = {}
        elif self.paired and not self.parked:
            self.parked = {kind: getattr(self, kind) for kind in self.paired}
            for kind in self.paired:
                setattr(self, kind, None)


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
    # Checkpoint switching (ui.models): model_loader(name) -> pipeline (None: VAE switching only), the
    # start-up model's --model value, and how many checkpoints stay loaded.
    model_loader: Callable[[str], Any] | None = None
    model_spec: str | None = None
    max_loaded_models: int = 1
    backend: Backend | None = None  # where generations run (ui.backend); None: in this process
    # Several --auth users: each user's images in outputs/<user>/, and only theirs in their history.
    per_user_outputs: bool = False
    save_format: str = "png"  # png, jpeg or webp (ui.saving.SAVE_FORMATS); JPEG/WebP carry infotext in EXIF

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Context:
    """Everything the handlers share."""

    pipes: Pipes
    options: Options = field(default_factory=Options)
    jobs: Jobs = field(default_factory=Jobs)
    saver: Saver | None = None
    queues: Queues | None = None  # one queue per model, shared by the UI and the REST API (ui.turns)
    models: Models | None = None  # checkpoint/VAE switching of pipes.base (ui.models); default: from options
    controlnets: ControlNets = field(default_factory=ControlNets)  # loaded lazily; the UI's and the API's

    def __post_init__(self) -> None:
        self.backend: Backend = self.options.backend or InProcess()
        if self.models is None:
            o = self.options
            self.models = Models(self.pipes.base, loader=o.model_loader, spec=o.model_spec, max_loaded=o.max_loaded_models)
        if self.queues is None:
            self.queues = Queues(self.options.queue_size, slots=self.backend.slots)
        if self.saver is None:
            o = self.options
            self.saver = Saver(o.outputs, temp_max_age=o.cache_max_age, per_user=o.per_user_outputs,
                               save_format=o.save_format)
