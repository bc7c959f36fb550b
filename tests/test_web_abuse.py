"""Issue 16, round 2 of abuse cases through the real server: request-body and file-count limits,
image headers checked before any decode, the infotext cap on /upscale, headers reflected by ranged
file responses, login backoff, readable errors everywhere, temp folders and file numbering.
Tiny model, CPU, loopback; the limits are set small so every case is quick."""
from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from conftest import free_port
from test_web_input import GENERIC, bomb_png, call_raw, rss_mb
from test_web_security import raw

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "ann", "pw-abuse"
MAX_REQUEST_MB, MAX_FILES, MAX_UPLOAD_MB = 2, 4, 1


class Server:
    def __init__(self, demo, port, outputs, backoff):
        self.demo, self.port, self.outputs, self.backoff = demo, port, outputs, backoff
        self.url = f"http://127.0.0.1:{port}/"
        self.ctx = demo.ldm_context
        self.cookie = login(port, PASSWORD)[2]

    def client(self):
        from gradio_client import Client

        return Client(self.url, auth=(USER, PASSWORD), verbose=False)

    def get(self, method, target, body=None, headers=None):
        return raw(self.port, method, target, body, {"Cookie": self.cookie, **(headers or {})})


def login(port: int, password: str) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/login", body=f"username={USER}&password={password}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        resp.read()
        cookies = "; ".join(v.split(";")[0] for k, v in resp.getheaders() if k.lower() == "set-cookie")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, cookies
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(base_pipe, tmp_path_factory):
    from ui import build
    from ui.limits import LoginBackoff
    from ui.security import launch_kwargs
    from ui.state import Options, Pipes

    outputs = tmp_path_factory.mktemp("abuse-outputs")
    demo = build(Pipes(base_pipe), Options(outputs=outputs, preview_every=0, max_upload_mb=MAX_UPLOAD_MB))
    backoff = LoginBackoff(free_failures=3, base_delay=0.3, max_delay=0.6)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(auth=[(USER, PASSWORD)], max_upload_mb=MAX_UPLOAD_MB, outputs=outputs,
                                max_request_mb=MAX_REQUEST_MB, max_files=MAX_FILES, login_backoff=backoff))
    yield Server(demo, port, outputs, backoff)
    demo.close()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "b" + uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def send_head_only(port: int, target: str, headers: dict, cookie: str) -> bytes:
    """Send the request line and headers, never the body; -> whatever the server answers within 5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        lines = [f"POST {target} HTTP/1.1", "Host: 127.0.0.1", f"Cookie: {cookie}"] + [f"{k}: {v}" for k, v in headers.items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
                if b"}" in answer:  # the end of the JSON detail
                    break
        except TimeoutError:
            pass
        return answer or b"(no answer: the server is waiting for the body)"


# ---- item 2: request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("target, ctype", [("/gradio_api/upload", "multipart/form-data; boundary=x"),
                                           ("/gradio_api/queue/join", "application/json"),
                                           ("/gradio_api/call/txt2img", "application/json")])
def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(server, target, ctype):
    answer = send_head_only(server.port, target, {"Content-Type": ctype, "Content-Length": str(100 * 1024 * 1024)},
                            server.cookie)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"limit is 2 MB" in answer


def test_a_chunked_body_is_counted_as_it_streams(server):
    part = b"\x00" * (3 * 1024 * 1024 // 4)  # each file under the per-file limit (1 MB), three over the total
    body, ctype = multipart([("a.png", part), ("b.png", part), ("c.png", part)])

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/gradio_api/upload", body=chunks(), encode_chunked=True,
                     headers={"Content-Type": ctype, "Cookie": server.cookie, "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()[:200]
    finally:
        conn.close()


def test_too_many_files_in_one_upload_are_refused(server):
    body, ctype = multipart([(f"{i}.png", b"\x89PNG tiny") for i in range(MAX_FILES + 1)])
    status, _, data = server.get("POST", "/gradio_api/upload", body, {"Content-Type": ctype})
    assert status == 413 and b"files" in data, (status, data[:200])
    body, ctype = multipart([(f"{i}.png", b"\x89PNG tiny") for i in range(MAX_FILES)])
    status, _, data = server.get("POST", "/gradio_api/upload", body, {"Content-Type": ctype})
    assert status == 200 and len(json.loads(data)) == MAX_FILES


def test_normal_requests_still_work_under_the_limits(server, tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (16, 16)).save(path)
    client = server.client()
    assert client.predict(image=handle_file(str(path)), api_name="/png_info") == ""
    assert client.predict(prompt="x", steps=1, seed=1, api_name="/txt2img")[3].startswith("Done")


# ---- item 3: every image input checked from its header --------------------------------------------


def test_every_image_input_refuses_a_bomb_from_its_header(server, tmp_path):
    """One mechanism for all image inputs: the mask-upload widget (type="pil"), the editor and the
    API's filepath images all refuse a 9000x9000 PNG of a few hundred bytes before Gradio decodes it."""
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.components.gallery import GalleryData, GalleryImage
    from gradio.data_classes import FileData, ImageData

    bomb = bomb_png(tmp_path / "bomb.png", 9000, 9000)
    inputs = [b for b in server.demo.blocks.values() if isinstance(b, (gr.Image, gr.ImageEditor)) and b.interactive is not False]
    galleries = [b for b in server.demo.blocks.values() if isinstance(b, gr.Gallery)]  # inputs of "Send to"
    mask_upload = [b for b in inputs if getattr(b, "label", None) == "Mask"]
    assert mask_upload and len(inputs) >= 6
    before = rss_mb()
    for block in inputs:
        payload = (EditorData(background=FileData(path=str(bomb))) if isinstance(block, gr.ImageEditor)
                   else ImageData(path=str(bomb), orig_name="bomb.png"))
        with pytest.raises(gr.Error) as err:
            block.preprocess(payload)
        assert "9000x9000 pixels" in str(err.value.message) and "limit" in str(err.value.message), block
    for block in galleries:
        with pytest.raises(gr.Error, match="9000x9000 pixels"):
            block.preprocess(GalleryData(root=[GalleryImage(image=ImageData(path=str(bomb)))]))
    assert rss_mb() - before < 100, "a bomb was decoded"
    small = tmp_path / "small.png"
    Image.new("L", (32, 32), 255).save(small)
    assert mask_upload[0].preprocess(ImageData(path=str(small))).size == (32, 32)


def test_an_unexpected_error_in_any_handler_is_readable(server, tmp_path, monkeypatch):
    """Not only ValueErrors: anything a handler raises reaches the caller as a message, never as
    Gradio's {"error": null}; and every function wired to an event is wrapped that way."""
    from ldm import metadata

    def broken(image):
        raise RuntimeError("a library bug")

    monkeypatch.setattr(metadata, "read_infotext", broken)
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(AppError) as err:
        server.client().predict(image=handle_file(str(path)), api_name="/png_info")
    assert GENERIC not in str(err.value) and "RuntimeError" in str(err.value), err.value
    fns = [fn.fn for fn in server.demo.fns.values() if fn.fn is not None]
    unwrapped = [getattr(f, "__name__", f) for f in fns if not getattr(f, "readable_errors", False)]
    assert not unwrapped, unwrapped


# ---- item 5: infotext cap on /upscale ---------------------------------------------------------------


def test_upscale_caps_the_infotext_it_copies(server, tmp_path):
    from ui.tasks import MAX_INFOTEXT_CHARS

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt " * 100_000)  # 900 KB, uncompressed
    path = tmp_path / "chatty.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    assert path.stat().st_size < MAX_UPLOAD_MB * 1024 * 1024
    gallery, text, _, status = server.client().predict(image=handle_file(str(path)), method="lanczos", scale=2,
                                                       api_name="/upscale")
    assert status.startswith("Done") and len(text) < MAX_INFOTEXT_CHARS + 200 and "truncated" in text
    assert Path(gallery[0]["image"]).stat().st_size < MAX_INFOTEXT_CHARS + 20_000


# ---- item 6: ranged file responses ------------------------------------------------------------------


def test_ranged_file_responses_reflect_no_request_headers(server):
    png = server.outputs / "r.png"
    Image.new("RGB", (8, 8)).save(png)
    status, headers, data = server.get("GET", f"/gradio_api/file={png}", headers={
        "Range": "bytes=0-7", "Content-Type": "text/html", "X-Probe": "reflected", "Content-Disposition": "inline"})
    assert status == 206 and data == png.read_bytes()[:8]
    assert "x-probe" not in headers and "cookie" not in headers and "range" not in headers, headers
    assert headers["content-type"] in ("image/png", "application/octet-stream"), headers
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", f"/gradio_api/file={png}", headers={"Range": "bytes=0-7", "Content-Type": "text/html",
                                                                 "Cookie": server.cookie})
        resp = conn.getresponse()
        resp.read()
        types = [v for k, v in resp.getheaders() if k.lower() == "content-type"]
        names = [k.lower() for k, _ in resp.getheaders()]
    finally:
        conn.close()
    assert len(types) == 1 and "html" not in types[0] and "cookie" not in names and "set-cookie" not in names


# ---- item 9: readable seeds, temp folders, numbering after a full disk ------------------------------


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_seed_infinity_sent_raw_is_a_readable_error(server, value):
    # txt2img's inputs in order, each at its listed default but these (the list grows with features)
    params = server.client().view_api(print_info=False, return_format="dict")["named_endpoints"]["/txt2img"]["parameters"]
    given = {"prompt": "x", "sampler": "Euler", "steps": 1, "width": 32, "height": 32, "seed": "SEED"}
    data = [given.get(p["parameter_name"], p["parameter_default"]) for p in params]
    event, data = call_raw(server, "txt2img", json.dumps({"data": data}).replace('"SEED"', value),
                           headers={"Cookie": server.cookie})
    assert event == "error"
    message = (json.loads(data) or {}).get("error") or ""
    assert "Seed" in message or "seed" in message, message


def test_the_apps_temp_folder_is_removed_at_exit_and_stale_ones_swept(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ldm-ui-{int(dead.stdout)}-abc"  # a folder of a process that is gone
    stale.mkdir()
    (stale / "00001-1-x.png").write_bytes(b"x")
    mine = tmp_path / "ldm-ui-1-keep"  # pid 1 is alive: not ours to judge
    mine.mkdir()
    code = ("import sys; sys.path.insert(0, %r); from ui.saving import Saver; s = Saver(None); "
            "print(s._temp)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == tmp_path and not Path(out.stdout.strip()).exists()
    assert not stale.exists() and mine.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ldm-ui-")] == [mine.name]


def test_file_numbers_do_not_skip_after_a_full_disk(tmp_path, monkeypatch):
    from ldm import metadata
    from ui import saving

    saver = saving.Saver(tmp_path / "out")
    image = Image.new("RGB", (8, 8))
    real = metadata.save_png
    first, _ = saver.save(image, "a\nSteps: 1", seed=1, prompt="a", task="t")

    def full(image, path, infotext, extra=None):
        Path(path).write_bytes(b"\x89PNG half")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metadata, "save_png", full)
    _, warning = saver.save(image, "b\nSteps: 1", seed=2, prompt="b", task="t")
    assert "No space left" in warning
    monkeypatch.setattr(metadata, "save_png", real)
    third, _ = saver.save(image, "c\nSteps: 1", seed=3, prompt="c", task="t")
    assert Path(first).name.startswith("00000-") and Path(third).name.startswith("00001-"), third
    assert sorted(p.name for p in (tmp_path / "out" / "t").iterdir()) == [Path(first).name, Path(third).name]


# ---- item 10: login backoff -------------------------------------------------------------------------


def test_login_backoff_grows_per_client_and_resets(monkeypatch):
    from ui.limits import LoginBackoff

    now = [1000.0]
    b = LoginBackoff(free_failures=3, base_delay=1.0, max_delay=8.0, clock=lambda: now[0])
    for _ in range(3):
        assert b.wait("a") == 0
        b.failed("a")
    assert b.wait("a") == pytest.approx(1.0) and b.wait("b") == 0  # per client
    now[0] += 1.0
    assert b.wait("a") == 0
    b.failed("a")
    assert b.wait("a") == pytest.approx(2.0)
    for _ in range(10):
        now[0] += 100
        b.failed("a")
    assert b.wait("a") == pytest.approx(8.0)  # capped
    b.succeeded("a")
    assert b.wait("a") == 0


def test_fifty_wrong_passwords_are_slowed_down(server):
    statuses = [login(server.port, "wrong")[0] for _ in range(50)]
    assert statuses[:3] == [400] * 3 and statuses.count(429) >= 45, statuses
    status, headers, _ = login(server.port, PASSWORD)  # even the right password waits its turn
    assert status == 429 and 0 < float(headers["retry-after"]) <= 1
    time.sleep(0.7)
    status, _, cookie = login(server.port, PASSWORD)
    assert status == 200 and cookie
    assert [login(server.port, "wrong")[0] for _ in range(3)] == [400] * 3  # a success resets the count
    time.sleep(0.7)
    assert login(server.port, PASSWORD)[0] == 200
