"""The web server's exposure: every route behind --auth, file-route traversal and SSRF, served file
types, the open-host warning and pinned versions. Real app on loopback with tiny models."""
from __future__ import annotations

import http.client
import json
import os
import re
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gradio_client")

USER, PASSWORD = "ann", "s3cret-pw"
SECRET_MARKERS = ("Sampling steps", "txt2img", "Denoising strength")  # the app's own UI text


def raw(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict, bytes]:
    """One raw request: the target goes out byte for byte (no client-side normalising of ../ or %2e)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read(65536) if resp.status != 200 or "event-stream" not in resp.getheader("content-type", "") else b""
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def walk_routes(routes, prefix: str = ""):
    """(path, methods) of every route of the FastAPI app, including routers included into it."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from walk_routes(inner.routes, prefix + getattr(route.include_context, "prefix", ""))
            continue
        sub = getattr(route, "routes", None)  # a Mount
        if sub is not None and not getattr(route, "methods", None):
            yield from walk_routes(sub, prefix + getattr(route, "path", ""))
            continue
        yield prefix + route.path, sorted(getattr(route, "methods", None) or {"GET"})


def concrete(path: str) -> str:
    """A request target for a route pattern: every {param} filled with something plausible."""
    def fill(m):
        name = m.group(1).split(":")[0]
        return {"size": "192", "component_id": "1", "path_or_url": "x.png"}.get(name, "x")
    return re.sub(r"\{([^}]+)\}", fill, path)


@pytest.fixture(scope="module")
def authed(launch_web_app, base_pipe):
    from ui.state import Pipes

    app = launch_web_app(Pipes(base_pipe), auth=[(USER, PASSWORD)], preview_every=0)
    (app.outputs / "txt2img").mkdir(parents=True, exist_ok=True)
    (app.outputs / "txt2img" / "00000-1-secret.png").write_bytes(b"\x89PNG private picture")
    return app


@pytest.fixture(scope="module")
def open_app(launch_web_app, base_pipe):
    from ui.state import Pipes

    return launch_web_app(Pipes(base_pipe), preview_every=0)


def login_cookie(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/login", body=f"username={USER}&password={PASSWORD}",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    cookies = [v.split(";")[0] for k, v in resp.getheaders() if k.lower() == "set-cookie"]
    conn.close()
    assert cookies
    return "; ".join(cookies)


# ---- 15: every route needs the session ---------------------------------------------------------


def test_every_route_refuses_requests_without_a_session(authed):
    from ui.security import is_public

    routes = list(walk_routes(authed.demo.server_app.routes if hasattr(authed.demo, "server_app") else authed.demo.app.routes))
    assert len(routes) > 50  # the gradio_api router was walked, not just the top level
    paths = {p for p, _ in routes}
    for must in ("/gradio_api/upload", "/gradio_api/queue/join", "/gradio_api/queue/data", "/monitoring",
                 "/gradio_api/file={path_or_url:path}", "/config", "/gradio_api/info"):
        assert must in paths, must
    leaks, checked = [], 0
    for path, methods in routes:
        for method in methods:
            if method == "HEAD":
                continue
            target = concrete(path)
            body = b"{}" if method in ("POST", "PUT", "PATCH", "DELETE") else None
            status, headers, data = raw(authed.port, method, target, body, {"Content-Type": "application/json"}, timeout=5)
            checked += 1
            if is_public(target):
                # The login page and its static files only: none of the app's UI, config or files.
                assert not any(m.encode() in data for m in SECRET_MARKERS), (method, target, data[:200])
                continue
            if status not in (401, 403):
                leaks.append((method, target, status, data[:100]))
    assert not leaks, f"answered without a session: {leaks}"
    assert checked > 50


def test_specific_sensitive_requests_without_a_session(authed):
    out_file = authed.outputs / "txt2img" / "00000-1-secret.png"
    probes = [
        ("GET", "/config", None), ("GET", "/gradio_api/info", None), ("GET", "/gradio_api/openapi.json", None),
        ("GET", f"/gradio_api/file={out_file}", None), ("GET", f"/gradio_api/file/{out_file}", None),
        ("POST", "/gradio_api/queue/join", json.dumps({"data": ["x"], "fn_index": 0, "session_hash": "abc"}).encode()),
        ("GET", "/gradio_api/queue/data?session_hash=abc", None), ("GET", "/gradio_api/heartbeat/abc", None),
        ("POST", "/gradio_api/cancel", json.dumps({"session_hash": "abc", "event_id": "e"}).encode()),
        ("POST", "/gradio_api/call/txt2img", json.dumps({"data": []}).encode()),
        ("GET", "/monitoring", None), ("GET", "/monitoring/summary", None), ("GET", "/openapi.json", None),
        ("GET", "/gradio_api/token", None), ("GET", "/gradio_api/user", None), ("GET", "/gradio_api/app_id", None),
    ]
    for method, target, body in probes:
        status, _, data = raw(authed.port, method, target, body, {"Content-Type": "application/json"})
        assert status in (401, 403), (method, target, status, data[:200])
        assert b"private picture" not in data
    # An upload (multipart) is refused before it is stored.
    boundary = "b" + uuid.uuid4().hex
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode() + b"x" * 1000 + f"\r\n--{boundary}--\r\n".encode()
    status, _, _ = raw(authed.port, "POST", "/gradio_api/upload", payload,
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 401
    # A forged cookie is no session.
    status, _, _ = raw(authed.port, "GET", "/config", headers={"Cookie": "access-token-x=abc; access-token-unsecure-x=abc"})
    assert status == 401
    # The login page itself loads (that is how a browser gets in) but carries none of the app.
    status, _, page = raw(authed.port, "GET", "/")
    assert status == 200 and b"auth_required" in page and b"Sampling steps" not in page


def test_with_a_session_everything_works(authed):
    cookie = login_cookie(authed.port)
    for target in ("/config", "/gradio_api/info", "/"):
        status, _, data = raw(authed.port, "GET", target, headers={"Cookie": cookie})
        assert status == 200, (target, data[:200])
    status, _, data = raw(authed.port, "GET", "/config", headers={"Cookie": cookie})
    assert b"Sampling steps" in data
    # Other sites' cookies on the same host (JSON, spaces, brackets) do not hide the session.
    status, _, _ = raw(authed.port, "GET", "/config", headers={"Cookie": 'pref={"a": [1, 2]}; x=y z; ' + cookie})
    assert status == 200
    status, headers, data = raw(authed.port, "GET", f"/gradio_api/file={authed.outputs / 'txt2img' / '00000-1-secret.png'}",
                                 headers={"Cookie": cookie})
    assert status == 200 and data == b"\x89PNG private picture" and headers["x-content-type-options"] == "nosniff"
    # gradio_client logs in the same way and can generate.
    gallery, info, _, status_line = authed.client().predict(prompt="x", steps=1, seed=5, api_name="/txt2img")
    assert status_line.startswith("Done") and "Seed: 5" in info
    # After logout the cookie is dead.
    raw(authed.port, "GET", "/logout", headers={"Cookie": cookie})
    assert raw(authed.port, "GET", "/config", headers={"Cookie": cookie})[0] == 401


def test_wrong_password_gets_no_session(authed):
    status, headers, _ = raw(authed.port, "POST", "/login", body=f"username={USER}&password=nope".encode(),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "set-cookie" not in headers
    from gradio_client import Client

    with pytest.raises(Exception):
        Client(authed.url, auth=(USER, "nope"), verbose=False)


def test_without_auth_the_gate_only_adds_headers(open_app):
    status, headers, data = raw(open_app.port, "GET", "/config")
    assert status == 200 and b"Sampling steps" in data and headers["x-content-type-options"] == "nosniff"
    assert raw(open_app.port, "GET", "/openapi.json")[0] == 404  # FastAPI's route list is switched off


def test_open_host_without_auth_warns_before_loading_anything(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import app

    def no_models(args):
        raise SystemExit("stop here")

    monkeypatch.setattr(app, "load_pipelines", no_models)
    monkeypatch.delenv("LDM_AUTH", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", tempfile.gettempdir() + "/gradio"))
    for argv, warned in ((["--host", "0.0.0.0"], True), (["--host", "192.168.1.5"], True), (["--share"], True),
                         (["--host", "0.0.0.0", "--auth", "a:b"], False), (["--host", "127.0.0.1"], False),
                         (["--host", "::1"], False)):
        with pytest.raises(SystemExit):
            app.main(argv)
        assert ("WITHOUT --auth" in capsys.readouterr().err) is warned, argv


def test_app_py_passes_its_limits_to_launch(monkeypatch, tmp_path):
    """app.py hands --max-upload-mb, --outputs and --auth-file to launch() through ui.security."""
    sys.path.insert(0, str(ROOT))
    import app
    import ui.layout

    seen = {}

    class FakeDemo:
        def launch(self, **kwargs):
            seen.update(kwargs)

        def block_thread(self):
            seen["served"] = True

    monkeypatch.setattr(app, "load_pipelines", lambda args: object())
    monkeypatch.setattr(app, "mount_api", lambda demo, args, auth, backoff: seen.update(api_auth=auth, backoff=backoff))  # tests/test_sdapi.py
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))  # where app.py puts its own temp folder
    monkeypatch.setattr(ui.layout, "build", lambda pipes, options: (seen.update(options=options), FakeDemo())[1])
    (tmp_path / "users").write_text("ann:pw\n")
    app.main(["--max-upload-mb", "3", "--outputs", str(tmp_path / "out"), "--auth-file", str(tmp_path / "users"),
              "--max-request-mb", "5", "--max-files", "2"])
    assert seen["max_file_size"] == 3 * 1024 * 1024 and seen["options"].max_upload_mb == 3
    limits = next(m for m in seen["app_kwargs"]["middleware"] if m.cls.__name__ == "RequestLimits")
    assert limits.kwargs == {"max_bytes": 5 * 1024 * 1024, "max_files": 2}
    assert {m.cls.__name__ for m in seen["app_kwargs"]["middleware"]} == {"AccessGate", "RequestLimits", "LoginThrottle"}
    with pytest.raises(SystemExit, match="max-request-mb"):
        app.main(["--max-upload-mb", "30", "--max-request-mb", "20"])
    assert seen["auth"] == [("ann", "pw")] and seen["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert seen["api_auth"] == [("ann", "pw")] and seen["prevent_thread_lock"] and seen["served"]  # REST API, same users
    assert str((tmp_path / "users").resolve()) in seen["blocked_paths"]
    assert seen["ssr_mode"] is False and seen["show_error"] is False and seen["share"] is False
    assert seen["app_kwargs"]["openapi_url"] is None and seen["server_name"] == "127.0.0.1"
    # Gradio's uploads go to a folder of the app's own (the sweeper empties it; never the shared one).
    assert os.environ["GRADIO_TEMP_DIR"].startswith(str(tmp_path) + "/ldm-webui-")


def test_sweep_deletes_old_temp_files_only(tmp_path):
    from ui.tempfiles import sweep

    old_dir = tmp_path / "abc"
    old_dir.mkdir()
    old, new = old_dir / "old.png", tmp_path / "new.png"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(old_dir, (past, past))
    assert sweep(tmp_path, 3600) == 1
    assert not old.exists() and new.exists()
    os.utime(old_dir, (past, past))
    sweep(tmp_path, 3600)
    assert not old_dir.exists() and tmp_path.exists()  # empty folders go too, never the root


# ---- 16: the file route ------------------------------------------------------------------------


TRAVERSALS = [
    "/gradio_api/file=../../../../etc/passwd",
    "/gradio_api/file=/etc/passwd",
    "/gradio_api/file=%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/gradio_api/file=..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/gradio_api/file=%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=file:///etc/passwd",
    "/gradio_api/file/etc/passwd",
    "/gradio_api/file/../../../../etc/passwd",
    "/gradio_api/file=http://169.254.169.254/latest/meta-data/",
    "/gradio_api/file=http%3A%2F%2F169.254.169.254%2Flatest%2Fmeta-data%2F",
    "/gradio_api/file=http://[::ffff:169.254.169.254]/latest/meta-data/",
    "/gradio_api/file=http://127.0.0.1:{port}/config",
    "/gradio_api/file={root}/app.py",
    "/gradio_api/file={root}/weights",
    "/gradio_api/file={outputs}/../../../../etc/passwd",
    "/gradio_api/file={outputs}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_file_route_refuses_traversal_and_ssrf(open_app, target):
    target = target.format(port=open_app.port, root=ROOT, outputs=open_app.outputs)
    status, headers, data = raw(open_app.port, "GET", target, timeout=20)
    assert status != 200, (target, data[:200])
    assert b"root:" not in data and b"Sampling steps" not in data and b"import" not in data


def test_blocked_paths_win_inside_allowed_ones(launch_web_app, base_pipe, tmp_path):
    """Even with --outputs pointing at a folder that holds the password file, it is not served."""
    from ui.security import launch_kwargs

    users = tmp_path / "users.txt"
    users.write_text("ann:pw\n")
    kwargs = launch_kwargs(auth=None, max_upload_mb=1, outputs=tmp_path, auth_file=str(users))
    assert str(users.resolve()) in kwargs["blocked_paths"] and str(ROOT / "app.py") in kwargs["blocked_paths"]
    # Gradio's own check, as the file route runs it:
    from gradio import utils

    assert utils.is_allowed_file(users.resolve(), kwargs["blocked_paths"], kwargs["allowed_paths"], [])[0] is False
    assert utils.is_allowed_file((tmp_path / "a.png").resolve(), kwargs["blocked_paths"], kwargs["allowed_paths"], [])[0]


def upload(port: int, name: str, content: bytes, ctype: str, cookie: str | None = None) -> str:
    boundary = "b" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if cookie:
        headers["Cookie"] = cookie
    status, _, data = raw(port, "POST", "/gradio_api/upload", body, headers)
    assert status == 200, data
    return json.loads(data)[0]


ACTIVE = {
    "page.html": (b"<html><script>alert(1)</script></html>", "text/html"),
    "pic.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>', "image/svg+xml"),
    "page.xhtml": (b'<html xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script></html>', "application/xhtml+xml"),
    "x.js": (b"alert(1)", "text/javascript"),
}


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_uploaded_active_content_is_only_ever_a_download(open_app, name):
    content, ctype = ACTIVE[name]
    path = upload(open_app.port, name, content, ctype)
    status, headers, data = raw(open_app.port, "GET", f"/gradio_api/file={path}")
    if status == 200:
        assert headers["content-disposition"].startswith("attachment"), headers
        assert headers["content-type"] == "application/octet-stream" and headers["x-content-type-options"] == "nosniff"
    else:
        assert status in (403, 404)
    # Range requests take another code path in Gradio.
    status, headers, _ = raw(open_app.port, "GET", f"/gradio_api/file={path}", headers={"Range": "bytes=0-5"})
    if status in (200, 206):
        assert headers["content-disposition"].startswith("attachment") and "html" not in headers["content-type"]


def test_active_content_in_the_outputs_folder_is_a_download_too(open_app):
    """Gradio serves files under allowed_paths inline whatever their type; the gate makes them downloads."""
    page = open_app.outputs / "evil.html"
    page.write_bytes(ACTIVE["page.html"][0])
    status, headers, _ = raw(open_app.port, "GET", f"/gradio_api/file={page}")
    assert status == 200 and headers["content-disposition"].startswith("attachment")
    assert headers["content-type"] == "application/octet-stream"
    png = open_app.outputs / "ok.png"
    png.write_bytes(b"\x89PNG\r\n")
    status, headers, _ = raw(open_app.port, "GET", f"/gradio_api/file={png}")
    assert status == 200 and headers["content-type"] == "image/png"  # pictures still show in the gallery


def test_a_payload_cannot_name_a_server_file(open_app):
    """An API call whose image is a path on the server (not an upload) is refused, not read."""
    from gradio_client.exceptions import AppError

    client = open_app.client()
    for path in ("/etc/passwd", str(ROOT / "app.py")):
        with pytest.raises((AppError, ValueError)) as err:
            client.predict(image={"path": path, "meta": {"_type": "gradio.FileData"}}, api_name="/png_info")
        assert "root:" not in str(err.value)


# ---- 17: versions with the known fixes ---------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def test_pinned_and_installed_versions_have_the_security_fixes():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    minimum = {"gradio": (6, 20), "torch": (2, 6), "pillow": (10, 3)}  # torch<2.6: torch.load RCE; gradio<6.20: file-route/SSRF fixes
    for name, low in minimum.items():
        assert name in pins, f"{name} is not pinned in requirements.txt"
        assert _version(pins[name]) >= low, f"requirements.txt pins {name}=={pins[name]}, need >= {low}"
        installed = metadata.version(name)
        assert _version(installed) >= low, f"installed {name} {installed} is older than {low}"


@pytest.mark.browser
def test_a_browser_can_still_log_in_through_the_gate(authed):
    """The login page works with what the gate lets through (static files, /login), then the app loads."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(authed.url)
            page.wait_for_selector("input[type=password]", timeout=60_000)
            page.fill("input[type=text]", USER)
            page.fill("input[type=password]", PASSWORD)
            page.keyboard.press("Enter")
            page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
            assert page.locator("#txt2img-generate").is_visible()
        finally:
            browser.close()
