"""Web-server hardening on top of Gradio's own: one ASGI middleware and the launch() settings.

Gradio's `auth=` protects most of its routes, but in 6.31 a dozen answer without a session
(`/openapi.json`, `/gradio_api/user`, `/token`, `/app_id`, `/startup-events`, `/cancel`, `/reset`,
`/heartbeat/…`, `/stream/…/close`, the vibe-editor routes, …). `AccessGate` closes all of them:
with auth on, a request without a valid Gradio session cookie gets 401 unless it is the login page
or one of the static files that page loads. It also makes sure files served from
`/gradio_api/file…` can never render as a page in the browser (HTML, SVG, XML, scripts, anything
not a plain image: `Content-Disposition: attachment`, `application/octet-stream`), and adds
`X-Content-Type-Options: nosniff` everywhere.

`launch_kwargs(...)` is what app.py (and the tests) pass to `demo.launch()`, so the settings that
matter for safety live in one place. What the gate knows of Gradio's internals (its session cookies,
its login page) is in `ui.gradio_compat`; the upload folder's sweeper is in `ui.tempfiles`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from starlette.middleware import Middleware

from . import gradio_compat

MIB = 1024 * 1024

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


def is_public(path: str) -> bool:
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


class AccessGate:
    """ASGI middleware for the Gradio app (installed through `launch(app_kwargs=...)`).

    Runs inside Gradio's own CORS/compression middleware and before any route. With auth off it only
    adds the response headers; the app behind it is `scope["app"]` (Gradio's FastAPI `App`).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")
        path = scope.get("path", "")
        if (gradio_app is not None and gradio_compat.auth_enabled(gradio_app) and not gradio_compat.custom_auth(gradio_app)
                and not is_public(path) and not gradio_compat.starting(gradio_app, path)
                and gradio_compat.session_user(gradio_app, scope) is None):
            return await self._refuse(scope, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if (path == "/" and gradio_app is not None and gradio_compat.auth_enabled(gradio_app)
                and gradio_compat.session_user(gradio_app, scope) is None):
            # The login page must not carry the API description (see ui.gradio_compat.strip_api_info).
            send = _rewrite_body(send, gradio_compat.strip_api_info)
        file_route = path.startswith(FILE_ROUTES)

        async def send_hardened(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = _harden(list(message.get("headers", [])), file_route)
            await send(message)

        await self.app(scope, receive, send_hardened)

    @staticmethod
    async def _refuse(scope, send) -> None:
        if scope["type"] == "websocket":  # closing before accept makes the server answer 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "Not authenticated: log in first"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
        ]})
        await send({"type": "http.response.body", "body": body})


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


def _harden(headers: list[tuple[bytes, bytes]], file_route: bool) -> list[tuple[bytes, bytes]]:
    names = {k.lower() for k, _ in headers}
    if b"x-content-type-options" not in names:
        headers.append((b"x-content-type-options", b"nosniff"))
    if not file_route:
        return headers
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").decode("latin-1")
    if ctype.split(";")[0].strip().lower() in INLINE_TYPES:
        return headers
    # Anything else (text/html, image/svg+xml, scripts, unknown) is a download, never a page.
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
                  auth_file: str | None = None) -> dict[str, Any]:
    """The security-relevant arguments for `gr.Blocks.launch` (app.py adds host, port, share)."""
    return {
        "auth": list(auth) if auth else None,
        # Gradio refuses bigger uploads at /gradio_api/upload (413) before storing them; the
        # handlers check the same limit again when they open a file (ldm.images.load_image).
        "max_file_size": int(max_upload_mb * MIB),
        # Only the outputs folder is served besides Gradio's own upload/cache folders.
        "allowed_paths": [str(Path(outputs).resolve())] if outputs else [],
        "blocked_paths": blocked_paths(auth_file),
        # FastAPI's /openapi.json lists every route to anyone; the API is described at /gradio_api/info.
        "app_kwargs": {"middleware": [Middleware(AccessGate)], "openapi_url": None},
        "ssr_mode": False,  # no Node.js front server: one process, one set of routes to check
        "mcp_server": False,
        "show_error": False,  # tracebacks stay in the server log; our own messages are gr.Error (escaped)
    }
