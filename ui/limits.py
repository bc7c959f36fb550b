"""What one client can make the server hold or try: request bodies, files per request, login attempts.

Two ASGI middlewares, installed by `ui.security.launch_kwargs` next to the access gate:

* `RequestLimits`: every request body at most `max_bytes`, every multipart body at most `max_files`
  parts. A declared `Content-Length` over the limit is answered 413 before any of the body is read;
  a chunked body is counted as it streams and refused (413) at the chunk that crosses the limit, the
  route behind seeing a disconnect. Gradio's own limits are per file (`max_file_size`) and 1,000
  files per upload; JSON bodies it reads whole, whatever their size.
* `LoginThrottle`: per client address, after `free_failures` failed logins each further attempt
  must wait `base_delay * 2**k` seconds (capped at `max_delay`), else it gets 429 with Retry-After;
  a successful login clears the count. Attempts from one address are handled one at a time, so a
  burst of parallel guesses cannot slip in before the first failures are counted.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MIB = 1024 * 1024
LOGIN_PATHS = frozenset({"/login", "/login/"})
DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_MAX_FILES = 10


async def answer(send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON error response {"detail": message}."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"), *headers,
    ]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name), None)


def multipart_boundary(content_type: str | None) -> bytes | None:
    if not content_type or not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


class BodyCounter:
    """Bytes and multipart parts of one body, fed chunk by chunk; `add` -> why it is refused, or None."""

    def __init__(self, max_bytes: int, max_files: int, boundary: bytes | None) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.delimiter = b"--" + boundary if boundary else None
        self.size = self.delimiters = 0
        self.tail = b""

    def too_big(self) -> str:
        return f"request too large: the limit is {self.max_bytes / MIB:g} MB per request"

    def add(self, chunk: bytes) -> str | None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            return self.too_big()
        if self.delimiter is not None:
            data = self.tail + chunk  # a delimiter split across two chunks is counted once
            self.delimiters += data.count(self.delimiter)
            self.tail = data[len(data) - len(self.delimiter) + 1:]
            if self.delimiters - 1 > self.max_files:  # n parts have n + 1 delimiters (the last closes)
                return f"too many files in one request: the limit is {self.max_files}"
        return None


class RequestLimits:
    """ASGI middleware: request bodies over `max_bytes`, or with more than `max_files` parts, get 413."""

    def __init__(self, app, max_bytes: int = int(DEFAULT_MAX_REQUEST_MB * MIB), max_files: int = DEFAULT_MAX_FILES) -> None:
        self.app, self.max_bytes, self.max_files = app, max_bytes, max_files

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counter = BodyCounter(self.max_bytes, self.max_files, multipart_boundary(_header(scope, b"content-type")))
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_bytes):
            return await answer(send, 413, counter.too_big())  # before reading any of the body
        state = {"refused": False, "started": False}

        async def counted_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and (problem := counter.add(message.get("body", b""))):
                state["refused"] = True
                if not state["started"]:
                    state["started"] = True
                    await answer(send, 413, problem)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if state["refused"]:
                return  # the route's own answer to the disconnect: ours went out already
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise  # else: the route failed on the disconnect we gave it; the client has its 413


@dataclass
class LoginBackoff:
    """Failed logins per client address -> how long that client must wait before the next attempt."""

    free_failures: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 10_000  # the oldest entries are forgotten beyond this
    _clients: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        failures, last = self._clients.get(client, (0, 0.0))
        if failures < self.free_failures:
            return 0.0
        delay = min(self.max_delay, self.base_delay * 2 ** min(failures - self.free_failures, 32))
        return max(0.0, last + delay - self.clock())

    def failed(self, client: str) -> None:
        failures, _ = self._clients.pop(client, (0, 0.0))
        self._clients[client] = (failures + 1, self.clock())
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)


class LoginThrottle:
    """ASGI middleware: POST /login goes through `backoff`, one attempt per client address at a time."""

    def __init__(self, app, backoff: LoginBackoff | None = None) -> None:
        self.app = app
        self.backoff = backoff or LoginBackoff()
        self._locks: dict[str, list] = {}  # client -> [lock, requests holding or awaiting it]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in LOGIN_PATHS:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        entry = self._locks.setdefault(client, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                await self._attempt(client, scope, receive, send)
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._locks.pop(client, None)

    async def _attempt(self, client: str, scope, receive, send) -> None:
        wait = self.backoff.wait(client)
        if wait > 0:
            seconds = math.ceil(wait)
            return await answer(send, 429, f"too many failed logins: try again in {seconds} s",
                                [(b"retry-after", str(seconds).encode())])
        status: dict[str, int] = {}

        async def watched(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watched)
        if status.get("code") == 200:
            self.backoff.succeeded(client)
        elif status.get("code") in (400, 401, 403):
            self.backoff.failed(client)
