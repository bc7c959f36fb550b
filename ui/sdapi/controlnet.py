"""A1111's ControlNet extension API on this server: the units of `alwayson_scripts.controlnet.args`
(txt2img, img2img, inpaint) -> `ldm.ControlUnit`s for the ldm call, and the extension's own routes
(`/controlnet/version`, `model_list`, `module_list`, `control_types`, `detect`).

A unit's fields, as the extension names them: `enabled` (default true; disabled units are skipped),
`image` (base64, a data: URL, or {"image": ..., "mask": ...}; older clients: `input_image`; img2img
without one uses the init image), `module` (a preprocessor of `ldm.PREPROCESSORS`), `model` ("name" or
"name [hash]" from the models folder's ControlNet/), `weight`, `guidance_start`, `guidance_end`,
`control_mode` (0/1/2 or A1111's names, in `ldm.CONTROL_MODES` order), `resize_mode` (0 Just Resize,
1 Crop and Resize, 2 Resize and Fill, or those names; `ldm.RESIZE_MODES` order), `threshold_a`/`threshold_b`
(the module's settings in order; -1, the extension's "unset", or null = the module's default; any other value
outside the setting's range is refused, where the extension quietly used the default for any negative one).
`processor_res` is checked (-1 or null, or `ldm.control_preprocess.RESOLUTION`) and not used, as `pixel_perfect`,
`low_vram` and `hr_option`: maps are always made at the generation size (pixel perfect; /controlnet/detect: at
the images' sizes), and with `enable_hr` the units guide both passes (the extension's "Both"), the second at
the hires size.

Everything is checked before any model work (weights loaded only for valid units); ControlNets are
loaded lazily with `ldm.load_controlnet(path, base=pipe)` and kept per pipeline and file.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Body
from PIL import Image

import ldm
from ldm.control_preprocess import check_resolution, preprocess

from ..controlnets import ControlNets, titles, unloaded

API_VERSION = 2  # the extension's /controlnet/version


def library_of(ctx: Any, pipe: Any):
    return pipe.library if pipe.library is not None else ctx.pipes.base.library


def preprocessor(module: Any):
    name = "none" if module in (None, "", "None") else module
    if not isinstance(name, str) or name not in ldm.PREPROCESSORS:
        raise ValueError(f"unknown ControlNet module {module!r}; choose one of: {', '.join(ldm.PREPROCESSORS)}")
    return ldm.PREPROCESSORS[name]


UNSET = -1  # the extension's value for "the module's default" (threshold_a/b, processor_res)


def unset(value: Any) -> Any:
    """The extension's UNSET -> None (ldm's "default"); any other value as given, for ldm to check."""
    return None if value is None or (value == UNSET and not isinstance(value, bool)) else value


def settings_of(pre: Any, a: Any, b: Any) -> dict:
    """threshold_a/threshold_b -> the preprocessor's settings in order (UNSET or None: its default)."""
    return {setting.name: unset(value) for setting, value in zip(pre.settings, (a, b))}


def resolution(value: Any, name: str) -> None:
    """processor_res: UNSET, None or ldm's RESOLUTION (maps are made at the size they are used at)."""
    check_resolution(unset(value), name)


def control_mode(value: Any) -> str:
    names = list(ldm.CONTROL_MODES)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in names:
        return value
    raise ValueError(f"unknown ControlNet control_mode {value!r}; choose 0-{len(names) - 1} or one of: {', '.join(names)}")


def resize_mode(value: Any) -> str:
    names = list(ldm.RESIZE_MODES)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and (value in names or value in ldm.RESIZE_MODES.values()):
        return value
    raise ValueError(f"unknown ControlNet resize_mode {value!r}; choose 0-{len(names) - 1} or one of: "
                     f"{', '.join(ldm.RESIZE_MODES.values())}")


def unit_args(scripts: Any) -> list:
    """The `args` of `alwayson_scripts` "controlnet" (any case, as A1111 matches script titles); [] if absent."""
    if not isinstance(scripts, dict):
        return []
    found = [v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"]
    if not found:
        return []
    value = found[0]
    args = value.get("args") if isinstance(value, dict) else value
    if args is None:
        return []
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise ValueError("alwayson_scripts.controlnet.args must be a list of ControlNet units (JSON objects)")
    return args


def enabled_units(scripts: Any) -> list[dict]:
    return [a for a in unit_args(scripts) if a.get("enabled", True) is not False]


def parse_units(ctx: Any, pipe: Any, scripts: Any, decode: Callable[[Any, str], Image.Image], *,
                init_image: Image.Image | None = None, cache: ControlNets | None = None) -> tuple[list, list[str]]:
    """`alwayson_scripts` -> ([ldm.ControlUnit], notes). Every unit is validated (ldm's checks) before any
    ControlNet is loaded; unknown model names raise ValueError with close names (ldm.Library.find)."""
    args = enabled_units(scripts)
    if not args:
        return [], []
    library = library_of(ctx, pipe)
    if library is None:
        raise ValueError("ControlNet needs a models folder: start the app with --models-dir (ControlNets go in its ControlNet/)")
    notes: list[str] = []
    checked = []
    for i, arg in enumerate(args):
        what = f"ControlNet unit {i}"
        model = arg.get("model")
        if model in (None, "", "None"):
            raise ValueError(f"{what}: no model; choose one of /controlnet/model_list")
        entry = library.find("controlnets", str(model))
        pre = preprocessor(arg.get("module"))
        image = arg.get("image", arg.get("input_image"))
        if isinstance(image, dict):
            if image.get("mask"):
                notes.append(f"{what}: the unit mask is ignored")
            image = image.get("image")
        if arg.get("mask") or arg.get("mask_image"):
            notes.append(f"{what}: the unit mask is ignored")
        if image in (None, ""):
            if init_image is None:
                raise ValueError(f"{what}: no image (send it base64-encoded in \"image\")")
            image = init_image
        else:
            image = decode(image, f"{what} image")
        resolution(arg.get("processor_res"), f"{what}: processor_res")
        fields = dict(weight=arg.get("weight", 1.0), start=arg.get("guidance_start", 0.0),
                      end=arg.get("guidance_end", 1.0), preprocessor=pre.name,
                      resize=resize_mode(arg.get("resize_mode", 1)),
                      settings=settings_of(pre, arg.get("threshold_a"), arg.get("threshold_b")))
        mode = control_mode(arg.get("control_mode", 0))
        checked.append((entry, ldm.ControlUnit.a1111(unloaded(entry), image, control_mode=mode, **fields).validate()))
    cache = cache or ControlNets()
    return [replace(unit, model=cache.get(pipe, entry)) for entry, unit in checked], notes


# ---- the extension's routes ------------------------------------------------------------------


def add_routes(router: APIRouter, ctx: Any, decode: Callable[[Any, str], Image.Image],
               encode: Callable[[Image.Image], str], checked: Callable[[Callable], Any]) -> None:
    """GET /controlnet/version, model_list, module_list, control_types; POST /controlnet/detect.
    `checked(make)` runs `make` answering its ValueErrors with 422 (413 for images over the limit)."""

    def models() -> list[str]:
        return titles(ctx.pipes.base.library)

    def detail(pre) -> dict:
        sliders = [{"name": s.label, "value": s.default, "min": s.minimum, "max": s.maximum, "step": s.step}
                   for s in pre.settings]
        return {"model_free": True, "sliders": sliders}

    @router.get("/controlnet/version", tags=["controlnet"])
    def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/controlnet/model_list", tags=["controlnet"])
    def model_list(update: bool = True) -> dict:
        """The ControlNets in the models folder's ControlNet/ (rescanned each time), as "name [hash]"."""
        return {"model_list": models()}

    @router.get("/controlnet/module_list", tags=["controlnet"])
    def module_list(alias_names: bool = False) -> dict:
        """The preprocessors (all model-free; depth/pose/normal maps made elsewhere go through "none")."""
        names = list(ldm.PREPROCESSORS)
        return {"module_list": names, "module_detail": {n: detail(p) for n, p in ldm.PREPROCESSORS.items()}}

    @router.get("/controlnet/control_types", tags=["controlnet"])
    def control_types() -> dict:
        return {"control_types": {"All": {"module_list": list(ldm.PREPROCESSORS), "model_list": ["None", *models()],
                                          "default_option": "none", "default_model": "None"}}}

    @router.post("/controlnet/detect", tags=["controlnet"])
    def detect(controlnet_module: str = Body("none"), controlnet_input_images: list[str] = Body([]),
               controlnet_images: list[str] = Body([]), controlnet_processor_res: int | None = Body(UNSET),
               controlnet_threshold_a: float | None = Body(UNSET), controlnet_threshold_b: float | None = Body(UNSET),
               controlnet_masks: list[str] = Body([]), low_vram: bool = Body(False)) -> dict:
        """Run a preprocessor on each image; the maps come back base64 PNG at the images' sizes."""
        images = controlnet_input_images or controlnet_images  # webuiapi sends the older name

        def run() -> list[Image.Image]:
            pre = preprocessor(controlnet_module)
            resolution(controlnet_processor_res, "controlnet_processor_res")
            if not images:
                raise ValueError("no image: send controlnet_input_images (base64)")
            settings = pre.resolve(settings_of(pre, controlnet_threshold_a, controlnet_threshold_b))
            return [preprocess(decode(text, f"controlnet_input_images[{i}]"), pre.name, settings)
                    for i, text in enumerate(images)]

        maps = checked(run)
        return {"info": "Success", "images": [encode(m) for m in maps]}
