"""ControlNet in the web UI (no Gradio here): the accordion's unit values -> validated `ldm.ControlUnit`s for a
task, a unit's control-map preview, and an infotext's "ControlNet N" entries -> the accordion's values.

A generation handler decorated with `takes_units` gets, for each unit i < UNITS, the API parameters
`cn{i}_enabled`, `cn{i}_model` ("name [hash]" or "name" from the models folder's ControlNet/), `cn{i}_image`,
`cn{i}_preprocessor` (a name of `ldm.PREPROCESSORS`), `cn{i}_setting_a`/`cn{i}_setting_b` (the preprocessor's
settings in order, A1111's threshold_a/b; None = its default, any other value is checked against its range by
ldm), `cn{i}_weight`, `cn{i}_start`, `cn{i}_end`,
`cn{i}_control_mode` (a name of `ldm.CONTROL_MODES`) and `cn{i}_resize` (a key of `ldm.RESIZE_MODES`).
Every one has a default, so API calls that do not use ControlNet are unchanged. On img2img and inpaint a unit
without an image uses the tab's image, as A1111's extension does.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from PIL import Image

import ldm
from ldm import metadata
from ldm.controlnet import parse_unit_infotext

from .controlnets import unloaded
from .convert import load_upload
from .state import Context

UNITS = 3  # units in each tab's accordion (A1111's default)
_UNIT_DEFAULTS = {f.name: f.default for f in fields(ldm.ControlUnit) if f.default is not MISSING}


@dataclass(frozen=True)
class UnitValues:
    """One unit's widget (or API) values, as the user gave them."""

    enabled: bool = False
    model: str | None = None
    image: Any = None
    preprocessor: str = _UNIT_DEFAULTS["preprocessor"]
    setting_a: float | None = None  # None: the preprocessor's default
    setting_b: float | None = None
    weight: float = _UNIT_DEFAULTS["weight"]
    start: float = _UNIT_DEFAULTS["start"]
    end: float = _UNIT_DEFAULTS["end"]
    control_mode: str = next(iter(ldm.CONTROL_MODES))  # "Balanced"
    resize: str = _UNIT_DEFAULTS["resize"]


FIELDS = tuple(f.name for f in fields(UnitValues))
_TYPES = {"enabled": "bool", "model": "str | None", "image": "Any", "preprocessor": "str",
          "setting_a": "float | None", "setting_b": "float | None", "weight": "float", "start": "float", "end": "float",
          "control_mode": "str",
          "resize": "str"}  # the API listing's types


def param(i: int, name: str) -> str:
    return f"cn{i}_{name}"


def param_names() -> list[str]:
    return [param(i, name) for i in range(UNITS) for name in FIELDS]


def pasted_names() -> tuple[str, ...]:
    """The parameters an infotext fills in (PNG info, send-to): all but the images."""
    return tuple(p for p in param_names() if not p.endswith("_image"))


def takes_units(handler: Callable) -> Callable:
    """Publish the units' parameters in `handler`'s signature (it receives them as `**controlnet`), before its
    keyword-only plumbing; `ui.endpoints` turns that signature into the named API endpoint's parameters."""
    sig = inspect.signature(handler)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    unit_params = [inspect.Parameter(param(i, f.name), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                     annotation=_TYPES[f.name]) for i in range(UNITS) for f in fields(UnitValues)]
    keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    handler.__signature__ = sig.replace(parameters=positional + unit_params + keyword_only)
    return handler


def unit_values(given: Mapping[str, Any]) -> list[UnitValues]:
    """`**controlnet` of a handler -> one UnitValues per unit; a name that is no unit parameter is refused."""
    unknown = sorted(set(given) - set(param_names()))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; ControlNet units take cn0_... to "
                         f"cn{UNITS - 1}_... followed by one of: {', '.join(FIELDS)}")
    return [UnitValues(**{f: given[param(i, f)] for f in FIELDS if param(i, f) in given}) for i in range(UNITS)]


def settings_of(preprocessor: str, a: Any, b: Any) -> dict:
    """setting_a/setting_b -> the preprocessor's settings in order (None: its default; ldm checks the rest)."""
    pre = ldm.PREPROCESSORS.get(preprocessor) if isinstance(preprocessor, str) else None
    if pre is None:
        raise ValueError(f"unknown preprocessor {preprocessor!r}; choose one of: {', '.join(ldm.PREPROCESSORS)}")
    return {setting.name: value for setting, value in zip(pre.settings, (a, b))}


def keywords(ctx: Context, pipe: Any, given: Mapping[str, Any], *, init_image: Image.Image | None = None) -> dict:
    """The enabled units as ldm's `control=` keyword ({} when none is on). Every unit is checked (model name,
    image, preprocessor settings, weight, start < end) before any ControlNet is loaded; errors name the unit."""
    todo = [(i, v) for i, v in enumerate(unit_values(given)) if v.enabled]
    if not todo:
        return {}
    library = ctx.models.library if pipe.library is None else pipe.library
    if library is None:
        raise ValueError("ControlNet needs a models folder: start the app with --models-dir and put ControlNets "
                         "in its ControlNet/ folder")
    checked = []
    for i, v in todo:
        what = f"ControlNet unit {i}"
        if not v.model:
            raise ValueError(f"{what}: choose a model (or turn the unit off)")
        try:
            entry = library.find("controlnets", str(v.model))
            if v.image in (None, ""):
                if init_image is None:
                    raise ValueError("no control image: upload one (or turn the unit off)")
                image = init_image
            else:
                image = load_upload(ctx, v.image, "control image")
            unit = ldm.ControlUnit.a1111(
                unloaded(entry), image, control_mode=v.control_mode, weight=v.weight, start=v.start, end=v.end,
                preprocessor=v.preprocessor, resize=v.resize,
                settings=settings_of(v.preprocessor, v.setting_a, v.setting_b)).validate()
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        checked.append((entry, unit))
    return {"control": [replace(unit, model=ctx.controlnets.get(pipe, entry)) for entry, unit in checked]}


def preview(ctx: Context, image: Any, preprocessor: str = "none", setting_a: float | None = None,
            setting_b: float | None = None,
            resize: str = "crop", width: Any = 0, height: Any = 0) -> Image.Image:
    """The control map a unit would give the ControlNet, at width x height (0: the image's own size)."""
    picture = load_upload(ctx, image, "control image")
    w = int(width) if width else picture.width
    h = int(height) if height else picture.height
    unit = ldm.ControlUnit(ldm.ControlNet(None, "preview"), picture, preprocessor=preprocessor, resize=resize,
                           settings=settings_of(preprocessor, setting_a, setting_b)).validate()
    return unit.control_map(w, h)


def infotext_values(text: str) -> dict[str, Any]:
    """An infotext's "ControlNet N" entries -> the units' values (all but the image: PNG info and send-to); units
    it does not name are turned off. {} for an empty text. The model is its "name [hash]" title as written."""
    if not text or not text.strip():
        return {}
    info = metadata.parse_infotext(text)
    out: dict[str, Any] = {}
    for i in range(UNITS):
        raw = info.get(f"ControlNet {i}")
        out[param(i, "enabled")] = raw is not None
        if raw is None:
            continue
        u = parse_unit_infotext(raw)
        if "model_title" in u:
            out[param(i, "model")] = u["model_title"]
        for name in ("preprocessor", "weight", "start", "end", "control_mode", "resize"):
            if name in u:
                out[param(i, name)] = u[name]
        pre = ldm.PREPROCESSORS.get(u.get("preprocessor"))
        given = u.get("settings", {})
        for slot, setting in zip(("setting_a", "setting_b"), pre.settings if pre is not None else ()):
            out[param(i, slot)] = given.get(setting.name, setting.default)  # one it does not give: the default, shown
    return out

