"""Web-server hardening on top of Gradio's own: the access gate middleware and the launch() settings.

Gradio's `auth=` protects most of its routes, but in 6.31 a dozen answer without a session
(`/openapi.json`, `/gradio_api/user`, `/token`, `/app_id`, `/startup-events`, `/cancel`, `/reset`,
`/heartbeat/…`, `/stream/…/close`, the vibe-editor routes, …). `AccessGate` closes all of them:
with auth on, a request without a valid Gradio session cookie gets 401 unless it is the login page
or one of the static files that page loads. It also makes sure files served from
`/gradio_api/file…` can never render as a page in the browser (HTML, SVG, XML, scripts, anything
not a plain image: `Content-Disposition: attachment`, `application/octet-stream`), drops the request
headers Gradio copies into its ranged (206) file responses, and adds `X-Content-Type-Options:
nosniff` everywhere.

`launch_kwargs(...)` is what app.py (and the tests) pass to `demo.launch()`, so the settings that
matter for safety live in one place, including the other two middlewares (request-body limits and
the login backoff, `ui.limits`). What the gate knows of Gradio's internals (its session cookies,
its login page) is in `ui.gradio_compat`; the upload folder's sweeper is in `ui.tempfiles`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.middleware import Middleware

from . import gradio_compat
from .limits import DEFAULT_MAX_FILES, DEFAULT_MAX_REQUEST_MB, MIB, LoginBackoff, LoginThrottle, RequestLimits, answer
from .saving import user_dir

# What an unauthenticated browser needs to show the login form and log in: the page itself, the
# login POST, and static files (the Svelte bundle, fonts, theme, icons). None of these carries the
# app's config, components, files or queue.
PUBLIC_EXACT = frozenset({
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt",
    "/manifest.json",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# Served inline from /gradio_api/file…; every other type is downloaded, never rendered.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
# What a file response may carry. Gradio 6.31 builds its 206 (Range) responses from a copy of the
# request's headers (Cookie, Host, Content-Type, anything the client sent); only these survive.
FILE_HEADERS = frozenset({
    b"content-type", b"content-length", b"content-range", b"content-disposition", b"accept-ranges", b"etag",
    b"last-modified", b"date", b"server", b"cache-control", b"x-content-type-options", b"vary", b"content-encoding",
})


def is_public(path: str) -> bool:
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


# The REST API (ui.sdapi) checks HTTP Basic itself: no UI session cookie is asked for there. Every
# other protection of the gate (headers) still applies; without the API these paths are 404s.
API_PREFIXES = ("/sdapi/", "/api/v1/jobs", "/controlnet/")  # /controlnet/: the A1111 ControlNet extension's routes
API_EXACT = frozenset({"/docs"})


def is_api(path: str) -> bool:
    return path in API_EXACT or path.startswith(API_PREFIXES)


class AccessGate:
    """ASGI middleware for the Gradio app (installed through `launch(app_kwargs=...)`).

    Runs inside Gradio's own CORS/compression middleware and before any route. With auth off it only
    adds the response headers; the app behind it is `scope["app"]` (Gradio's FastAPI `App`).
    `per_user_outputs`: the outputs folder when each user has a folder in it (ui.saving): a file
    there is served only to its user (the folder is an allowed path, so Gradio alone would serve
    any user's file to anyone logged in who names its path).
    """

    def __init__(self, app, per_user_outputs: Path | None = None) -> None:
        self.app = app
        self.per_user_outputs = Path(per_user_outputs).resolve() if per_user_outputs else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")
        path = scope.get("path", "")
        if (gradio_app is not None and gradio_compat.auth_enabled(gradio_app) and not gradio_compat.custom_auth(gradio_app)
                and not is_public(path) and not is_api(path) and not gradio_compat.starting(gradio_app, path)
                and gradio_compat.session_user(gradio_app, scope) is None):
            return await self._refuse(scope, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if self.per_user_outputs is not None and path.startswith(FILE_ROUTES) and not self._owns(gradio_app, scope, path):
            return await answer(send, 404, "File not found")
        if (path == "/" and gradio_app is not None and gradio_compat.auth_enabled(gradio_app)
                and gradio_compat.session_user(gradio_app, scope) is None):
            # The login page must not carry the API description (see ui.gradio_compat.strip_api_info).
            send = _rewrite_body(send, gradio_compat.strip_api_info)
        request_headers = scope.get("headers", []) if path.startswith(FILE_ROUTES) else None

        async def send_hardened(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = _harden(list(message.get("headers", [])), request_headers)
            await send(message)

        await self.app(scope, receive, send_hardened)

    def _owns(self, gradio_app, scope, path: str) -> bool:
        """False for a file in someone else's outputs folder (or in the outputs root) than the session's user."""
        prefix = next(p for p in FILE_ROUTES if path.startswith(p))
        try:
            target = Path(unquote(path[len(prefix):])).resolve()
        except (OSError, ValueError):
            return False
        if not target.is_relative_to(self.per_user_outputs):
            return True  # Gradio's own rules apply
        user = gradio_compat.session_user(gradio_app, scope) if gradio_app is not None else None
        return user is not None and target.is_relative_to(self.per_user_outputs / user_dir(user))

    @staticmethod
    async def _refuse(scope, send) -> None:
        if scope["type"] == "websocket":  # closing before accept makes the server answer 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await answer(send, 401, "Not authenticated: log in first")


def _rewrite_body(send, rewrite):
    """A `send` that buffers one response and passes its body through `rewrite` (small pages only)."""
    state: dict[str, Any] = {"start": None, "chunks": []}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            state["start"] = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = rewrite(b"".join(state["chunks"]))
        start = dict(state["start"])
        start["headers"] = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        start["headers"].append((b"content-length", str(len(body)).encode()))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _harden(headers: list[tuple[bytes, bytes]], request_headers: list | None) -> list[tuple[bytes, bytes]]:
    """nosniff everywhere; on file routes (`request_headers` given) only FILE_HEADERS, none of them
    copied from the request, and anything but one plain-image type a download."""
    names = {k.lower() for k, _ in headers}
    if b"x-content-type-options" not in names:
        headers.append((b"x-content-type-options", b"nosniff"))
    if request_headers is None:
        return headers
    sent = {(k.lower(), v) for k, v in request_headers}
    headers = [(k, v) for k, v in headers if k.lower() in FILE_HEADERS
               and ((k.lower(), v) not in sent or k.lower() in (b"content-type", b"content-disposition"))]
    types = {v.decode("latin-1").split(";")[0].strip().lower() for k, v in headers if k.lower() == b"content-type"}
    dispositions = [v for k, v in headers if k.lower() == b"content-disposition"]
    # One content type, a plain image, and at most one disposition: else (text/html, image/svg+xml,
    # scripts, a type the client sent alongside Gradio's) a download, never a page.
    if len(types) == 1 and types <= INLINE_TYPES and len(dispositions) <= 1:
        return list(dict.fromkeys(headers))  # a type sent twice with the same value: once
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-disposition")]
    return kept + [(b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]


def blocked_paths(auth_file: str | None = None, extra: Iterable[str | Path] = ()) -> list[str]:
    """Never served, even inside an allowed folder: the password file and the folders with code and models."""
    root = Path(__file__).resolve().parents[1]
    paths = [root / name for name in ("app.py", "ldm", "ui", "tests", "weights", ".git")]
    if auth_file:
        paths.append(Path(auth_file))
    paths += [Path(p) for p in extra]
    return [str(p.resolve()) for p in paths]


def launch_kwargs(*, auth: Sequence[tuple[str, str]] | None, max_upload_mb: float, outputs: Path | None,
                  auth_file: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
                  max_files: int = DEFAULT_MAX_FILES, login_backoff: LoginBackoff | None = None,
                  per_user: bool = False) -> dict[str, Any]:
    """The security-relevant arguments for `gr.Blocks.launch` (app.py adds host, port, share).
    `per_user`: outputs are saved per user (several --auth users; ui.state.Options.per_user_outputs)."""
    middleware = [
        Middleware(AccessGate, per_user_outputs=outputs if per_user and outputs else None),
        # Bodies are limited for every route (Gradio limits only each uploaded file) ...
        Middleware(RequestLimits, max_bytes=int(max_request_mb * MIB), max_files=max_files),
        # ... and failed logins slow the next attempt from the same address.
        Middleware(LoginThrottle, backoff=login_backoff or LoginBackoff()),
    ]
    return {
        "auth": list(auth) if auth else None,
        # Gradio refuses bigger uploads at /gradio_api/upload (413) before storing them; the
        # handlers check the same limit again when they open a file (ldm.images.load_image).
        "max_file_size": int(max_upload_mb * MIB),
        # Only the outputs folder is served besides Gradio's own upload/cache folders.
        "allowed_paths": [str(Path(outputs).resolve())] if outputs else [],
        "blocked_paths": blocked_paths(auth_file),
        # FastAPI's /openapi.json lists every route to anyone; the API is described at /gradio_api/info.
        "app_kwargs": {"middleware": middleware, "openapi_url": None},
        "ssr_mode": False,  # no Node.js front server: one process, one set of routes to check
        "mcp_server": False,
        "show_error": False,  # tracebacks stay in the server log; our own messages are gr.Error (escaped)
    }
