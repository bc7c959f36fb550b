"""Everything that reaches into Gradio beyond its public API: one module to revisit on a Gradio upgrade.

Written for and tested with gradio==6.31.0 (requirements.txt). Nothing else in `ui/` patches Gradio
objects or reads Gradio internals; on an upgrade, check each entry below against the new version
(tests/test_web_input.py and tests/test_web_security.py exercise every one of them).

Patches (replace a method on one Gradio component instance):

* `readable_errors(component, name)` replaces `component.preprocess`. Gradio checks API inputs before
  our handler runs; its messages quote the raw value inside a gr.Error, which the page renders as
  HTML (a Radio given "<img onerror=...>"), and anything else it raises (a file that is not an
  image, a decompression bomb, text for a number, `Infinity` for a seed: OverflowError) reaches the
  caller as `{"error": null}`. All become a message naming the field: plain text without a toast
  for API clients, escaped in a toast for image uploads (`_input_error`).
* `library_range(slider, unset)` gives a Slider a `preprocess` without Gradio's range check (by making it a
  subclass that the page still renders as a Slider: Gradio rebuilds an updated component from its class), for
  values whose range the library checks (every slider `ui.ranges` makes: sizes, steps, CFG, batch, strength,
  ...; `ldm` refuses width 7 as "not a multiple of 8", as it refuses 100). Gradio's check would refuse 7
  on a slider starting at 8 before our handler runs, with no word in the page. The page's side: Gradio 6.31's Slider sets a typed value to its range
  when the number box loses focus (clicking Generate does that), silently; `ui.page`'s script stops
  that blur from reaching the box of sliders with the `ldm-library-range` class (`LIBRARY_RANGE`).
* `check_image_headers(component)` replaces the `preprocess` of every `gr.Image`, `gr.ImageEditor`
  and `gr.Gallery` (`ui.layout.build` applies it to all of them: one mechanism for every image input,
  API or UI only; a gallery is an input of the "Send to" buttons). Gradio decodes uploads inside `preprocess` for `type="pil"` / `"numpy"` inputs and for the
  editor (whole PNG, `getexif()`, RGBA conversion), before any handler runs; a 560 KB PNG declaring
  12000x12000 pixels cost ~325 MB per request through the mask-upload widget. The patch reads each
  file's header (PIL's lazy open: size only) and refuses more than ldm's pixel limit first.

Response rewrite (the access gate applies it to Gradio's `/` route):

* `strip_api_info(page)`: Gradio 6.31 embeds the whole API description (endpoints, parameters,
  choices, code samples) as `window.gradio_api_info` in the page it serves at `/`, the login page
  included, while `/gradio_api/info` itself needs a session. The gate replaces it with an empty
  description for visitors who are not logged in.

Gradio behaviours the middlewares work around (no patch; re-check on an upgrade):

* Ranged (206) responses of the file route are built from a copy of the request's headers
  (`route_utils`: `headers = dict(request.headers)`): the gate keeps only file headers
  (`ui.security.FILE_HEADERS`) and checks every content-type.
* `/gradio_api/upload` parses up to 1,000 files, and JSON bodies are read whole whatever their
  size: `ui.limits.RequestLimits` bounds both.

Internals read (attributes of Gradio's FastAPI `App`, used by `ui.security.AccessGate`):

* `session_user(app, scope)`: the session cookies Gradio sets at /login (`access-token-<cookie_id>`,
  `access-token-unsecure-<cookie_id>`) and its token table `app.tokens`. Gradio's `auth=` leaves a
  dozen routes open without a session; the gate checks the same cookies on every request.
* `auth_enabled(app)`, `custom_auth(app)`: `app.auth` and `app.auth_dependency`.
* `starting(app, path)`: `app.startup_events_triggered`; launch() calls /gradio_api/startup-events
  once, without a session, to start the queue.

Page assets without launch():

* `blocks(css=, head=, **kwargs)`: Gradio 6 moved `css`/`head` from the Blocks constructor to
  `launch()`, but still accepts them in the constructor (with a warning) and uses them when
  launch() is given none. The UI's styles and keyboard script (`ui.page`) go there, so every
  launch (app.py, tests, users' scripts) gets them; the warning is silenced.

API description rewrite (the listing gradio_client users read; calls are unchanged):

* `describe_api(demo, docs)` wraps `demo.get_api_info` (what `/gradio_api/info` and the page's
  "Use via API" serve): return values named (`images`, `infotext`, `status`, ... instead of the
  page's labels or `value_41`), the handlers' integer parameters typed `int` (a Slider says
  float), image parameters marked required (Gradio lists them as optional: their default is None), and
  the ControlNet settings' default None (Gradio lists the widget's value; a Slider's value is never None).

Attribute added:

* `attach_context(demo, ctx)` sets `demo.ldm_context`, so app.py and the tests reach the handlers'
  `Context` from the Blocks that `ui.build` returns. Gradio never reads it.
"""
from __future__ import annotations

import html
import re
import warnings
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ldm.images import DEFAULT_MAX_PIXELS

GRADIO_VERSION = "6.31.0"  # the version the entries above were written for


# ---- patches ------------------------------------------------------------------------------------


def readable_errors(component, name: str):
    """`component` with its input check's errors turned into messages naming the field (`_input_error`)."""
    if getattr(component, "_readable_errors", False):
        return component
    check = component.preprocess
    what = component.label or name
    error = _input_error(component)

    def preprocess(payload):
        try:
            return check(payload)
        except gr.Error as exc:
            raise error(f"{what}: {exc.message}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise error(f"{what}: the image is too large to open ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            name = getattr(payload, "orig_name", None) or "the file"
            raise error(f"{what}: {name} is not a readable image ({type(exc).__name__})") from None
        except (TypeError, ValueError, ArithmeticError):  # Infinity for an integer: OverflowError
            raise error(f"{what}: {type(payload).__name__} is not a valid value here") from None
        except Exception as exc:  # noqa: BLE001 - anything else is still a message, never {"error": null}
            raise error(f"{what}: could not read the value ({type(exc).__name__})") from None

    component.preprocess = preprocess
    component._readable_errors = True
    return component


LIBRARY_RANGE = "ldm-library-range"  # the elem_class of sliders whose range the library checks


class _LibraryRangeSlider(gr.Slider):
    """A Slider passing values outside its range on (rounded as Gradio does) for the library to judge. A
    class, not a patched instance: after an update of its props (a ControlNet setting's label and range)
    Gradio 6.31 rebuilds the component for that session from its constructor arguments
    (`Blocks.postprocess_data`), which would bring back Gradio's own check."""

    accepts_unset = False  # (no __init__ of its own: Gradio filters an update's props by __init__'s signature)

    def get_block_name(self) -> str:  # the page's Slider
        return "slider"

    def get_block_class(self) -> str:
        return "slider"

    @classmethod
    def get_component_class_id(cls) -> str:  # the page loads a component's code by this id
        return gr.Slider.get_component_class_id()

    def preprocess(self, payload):
        if payload is None and self.accepts_unset:
            return None
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):  # as Gradio's check fails
            raise TypeError(f"not a number: {type(payload).__name__}")
        return gr.Number.round_to_precision(payload, self.precision)


class _UnsetLibraryRangeSlider(_LibraryRangeSlider):
    accepts_unset = True


def library_range(slider: gr.Slider, unset: bool = False) -> gr.Slider:
    """`slider` passing values outside its range on for the library to judge; marked with `LIBRARY_RANGE` so
    the page does not set them to the range either. unset: None passes too (an API client's "the default",
    e.g. a ControlNet preprocessor's setting)."""
    slider.__class__ = _UnsetLibraryRangeSlider if unset else _LibraryRangeSlider
    if LIBRARY_RANGE not in (slider.elem_classes or []):
        slider.elem_classes = [*(slider.elem_classes or []), LIBRARY_RANGE]
    return slider


def _input_error(component):
    """text -> gr.Error for an input check of `component`. Images: escaped, shown as a toast (the
    page has no other place for an upload's error; a toast renders HTML). Other fields: plain text
    for API clients and no toast (the page's own widgets cannot send such values)."""
    if isinstance(component, IMAGE_INPUTS):
        return lambda text: gr.Error(html.escape(text))
    return lambda text: gr.Error(text, visible=False)


IMAGE_INPUTS = (gr.Image, gr.ImageEditor, gr.Gallery)
_NESTED = ("root", "image", "background", "layers", "composite")  # GalleryData, GalleryImage, EditorData


def check_image_headers(component, max_pixels: int = DEFAULT_MAX_PIXELS):
    """`component` (any gr.Image / gr.ImageEditor / gr.Gallery; others are returned as they are)
    refusing, from the header, any file of more than `max_pixels` before its own preprocess decodes anything."""
    if not isinstance(component, IMAGE_INPUTS) or getattr(component, "_checks_headers", False):
        return component
    check = component.preprocess
    what = component.label or "image"

    def preprocess(payload):
        for path in _image_paths(payload):
            width, height = image_size(path, what)
            if width * height > max_pixels:
                raise gr.Error(html.escape(f"{what}: the image is too large: {width}x{height} pixels; "
                                           f"the limit is {max_pixels:,} pixels"))
        return check(payload)

    component.preprocess = preprocess
    component._checks_headers = True
    return component


def _image_paths(payload: Any):
    """The files in an image input's payload: ImageData/FileData (`path`), EditorData (background,
    layers, composite), GalleryData (root -> image), or the same as dicts."""
    if payload is None or isinstance(payload, (str, bytes)):
        return
    if isinstance(payload, (list, tuple)):
        for item in payload:
            yield from _image_paths(item)
        return
    get = payload.get if isinstance(payload, dict) else (lambda key: getattr(payload, key, None))
    if isinstance(get("path"), str):
        yield get("path")
        return
    for key in _NESTED:
        yield from _image_paths(get(key))


def image_size(path: str, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header; nothing is decoded. Unreadable files are a gr.Error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:  # reads the header only
                return im.size
        except Image.DecompressionBombError as exc:  # over twice PIL's own guard
            raise gr.Error(html.escape(f"{what}: the image is too large to open ({exc})")) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise gr.Error(html.escape(f"{what}: the upload is not a readable image ({type(exc).__name__})")) from None


# ---- response rewrite ---------------------------------------------------------------------------

_API_INFO = re.compile(rb"<script>\s*window\.gradio_api_info\s*=.*?</script>", re.DOTALL)
EMPTY_API_INFO = b'<script>window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


def strip_api_info(page: bytes) -> bytes:
    return _API_INFO.sub(lambda _: EMPTY_API_INFO, page)


# ---- internals read -----------------------------------------------------------------------------


def _cookies(scope: dict) -> dict[str, str]:
    """name -> value from the Cookie headers. Parsed by hand: http.cookies gives up on the whole
    header at the first cookie it dislikes (another app's on the same host), which would log users out."""
    jar: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            name, sep, val = part.strip().partition("=")
            if sep and name and name not in jar:
                jar[name] = val.strip().strip('"')
    return jar


def session_user(app: Any, scope: dict) -> str | None:
    """The user of the request's Gradio session cookie, or None (same cookies Gradio sets at /login)."""
    tokens = getattr(app, "tokens", None) or {}
    cookie_id = getattr(app, "cookie_id", None)
    if not cookie_id:
        return None
    jar = _cookies(scope)
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = jar.get(name)
        if token and token in tokens:
            return tokens[token]
    return None


def starting(app: Any, path: str) -> bool:
    """launch() itself calls /gradio_api/startup-events once, without a session, to start the queue."""
    return path == "/gradio_api/startup-events" and not getattr(app, "startup_events_triggered", True)


def auth_enabled(app: Any) -> bool:
    return getattr(app, "auth", None) is not None


def custom_auth(app: Any) -> bool:
    """launch(auth_dependency=...): someone else decides who is logged in; the gate stands aside."""
    return getattr(app, "auth_dependency", None) is not None


# ---- attribute added ----------------------------------------------------------------------------


def blocks(*, css: str, head: str, **kwargs) -> gr.Blocks:
    """A gr.Blocks carrying `css` and `head` for whichever launch() serves it (see the notes above)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameters have been moved from the Blocks constructor")
        return gr.Blocks(css=css, head=head, **kwargs)


def attach_context(demo: gr.Blocks, ctx: Any) -> gr.Blocks:
    demo.ldm_context = ctx
    return demo


def describe_api(demo: gr.Blocks, docs: dict[str, tuple[set[str], tuple[str, ...]]],
                 optional_images: tuple[str, ...] = (), unset_defaults: tuple[str, ...] = ()) -> gr.Blocks:
    """docs: api name -> (integer parameter names, return value names); see the notes above.
    optional_images: image parameters that stay optional (e.g. ControlNet units' images).
    unset_defaults: parameters whose default is None, whatever their widget shows (a ControlNet unit's
    settings: None is the preprocessor's own default)."""
    original = demo.get_api_info

    def get_api_info(*args, **kwargs):
        info = original(*args, **kwargs)
        for name, endpoint in (info or {}).get("named_endpoints", {}).items():
            ints, returns = docs.get(name.lstrip("/"), (set(), ()))
            for param in endpoint.get("parameters", []):
                if param.get("parameter_name") in ints:
                    param["type"] = {**(param.get("type") or {}), "type": "integer"}
                    param["python_type"] = {**param.get("python_type", {}), "type": "int"}
                if param.get("component") == "Image" and param.get("parameter_name") not in optional_images:
                    param["parameter_has_default"], param["parameter_default"] = False, None
                if param.get("parameter_name") in unset_defaults:
                    param["parameter_has_default"], param["parameter_default"] = True, None
            if len(returns) == len(endpoint.get("returns", [])):
                for value, label in zip(endpoint["returns"], returns):
                    value["label"] = label
        return info

    demo.get_api_info = get_api_info
    return demo
