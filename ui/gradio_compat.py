"""Everything that reaches into Gradio beyond its public API: one module to revisit on a Gradio upgrade.

Written for and tested with gradio==6.31.0 (requirements.txt). Nothing else in `ui/` patches Gradio
objects or reads Gradio internals; on an upgrade, check each entry below against the new version
(tests/test_web_input.py and tests/test_web_security.py exercise every one of them).

Patches (replace a method on one Gradio component instance):

* `readable_errors(component, name)` replaces `component.preprocess`. Gradio checks API inputs before
  our handler runs; its messages quote the raw value inside a gr.Error, which the page renders as
  HTML (a Radio given "<img onerror=...>"), and anything else it raises (a file that is not an
  image, a decompression bomb, text for a number) reaches the caller as a generic "the app raised an
  exception". Both become an escaped message naming the field.
* `limit_editor_pixels(editor)` replaces `ImageEditor.convert_and_format_image`. The inpaint editor
  (type="pil", RGBA) makes Gradio decode and convert every uploaded layer before our handler sees
  it, in unqueued UI steps; a small PNG declaring 9000x9000 pixels would cost ~300 MB per request.
  The patch reads each image's header first and refuses more than ldm's pixel limit.

Response rewrite (the access gate applies it to Gradio's `/` route):

* `strip_api_info(page)`: Gradio 6.31 embeds the whole API description (endpoints, parameters,
  choices, code samples) as `window.gradio_api_info` in the page it serves at `/`, the login page
  included, while `/gradio_api/info` itself needs a session. The gate replaces it with an empty
  description for visitors who are not logged in.

Internals read (attributes of Gradio's FastAPI `App`, used by `ui.security.AccessGate`):

* `session_user(app, scope)`: the session cookies Gradio sets at /login (`access-token-<cookie_id>`,
  `access-token-unsecure-<cookie_id>`) and its token table `app.tokens`. Gradio's `auth=` leaves a
  dozen routes open without a session; the gate checks the same cookies on every request.
* `auth_enabled(app)`, `custom_auth(app)`: `app.auth` and `app.auth_dependency`.
* `starting(app, path)`: `app.startup_events_triggered`; launch() calls /gradio_api/startup-events
  once, without a session, to start the queue.

Attribute added:

* `attach_context(demo, ctx)` sets `demo.ldm_context`, so app.py and the tests reach the handlers'
  `Context` from the Blocks that `ui.build` returns. Gradio never reads it.
"""
from __future__ import annotations

import html
import io
import re
import warnings
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ldm.images import DEFAULT_MAX_PIXELS

GRADIO_VERSION = "6.31.0"  # the version the entries above were written for


# ---- patches ------------------------------------------------------------------------------------


def readable_errors(component, name: str):
    """`component` with its input check's errors turned into escaped messages naming the field."""
    if getattr(component, "_readable_errors", False):
        return component
    check = component.preprocess
    what = component.label or name

    def preprocess(payload):
        try:
            return check(payload)
        except gr.Error as exc:
            raise gr.Error(html.escape(str(exc.message))) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise gr.Error(html.escape(f"{what}: the image is too large to open ({exc})")) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            name = getattr(payload, "orig_name", None) or "the file"
            raise gr.Error(html.escape(f"{what}: {name} is not a readable image ({type(exc).__name__})")) from None
        except (TypeError, ValueError):
            raise gr.Error(html.escape(f"{what}: {type(payload).__name__} is not a valid value here")) from None

    component.preprocess = preprocess
    component._readable_errors = True
    return component


def limit_editor_pixels(editor: gr.ImageEditor, max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.ImageEditor:
    """`editor` refusing, from the header, any layer of more than `max_pixels` (as ldm.images does)."""
    convert = editor.convert_and_format_image

    def checked(file, *args, **kwargs):
        if file is not None:
            source = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else getattr(file, "path", None)
            if source is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    try:
                        with Image.open(source) as im:  # reads the header only
                            width, height = im.size
                    except Image.DecompressionBombError as exc:
                        raise gr.Error(html.escape(f"the image is too large to open ({exc})")) from None
                    except (UnidentifiedImageError, OSError, SyntaxError):
                        raise gr.Error("the upload is not a readable image") from None
                if width * height > max_pixels:
                    raise gr.Error(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
        return convert(file, *args, **kwargs)

    editor.convert_and_format_image = checked
    return editor


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


def attach_context(demo: gr.Blocks, ctx: Any) -> gr.Blocks:
    demo.ldm_context = ctx
    return demo
