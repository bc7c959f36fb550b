"""Hostile and broken input through the real server (gradio_client by keyword), and faults around a
generation: stop, full disk, two models, per-session state. Tiny models, CPU, loopback."""
from __future__ import annotations

import errno
import json
import re
import struct
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import tiny
from conftest import CHROMIUM, CHROMIUM_ARGS

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

MAX_SIZE = 256  # the app's --max-size for these tests
GENERIC = "has not enabled verbose error reporting"  # Gradio's text for an error it does not show
EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def pipe(base_model):
    import ldm

    # = app.py --max-size 256; the prompt limit is raised so the text-handling cases below (10k characters)
    # reach the model: the limit itself is tested in test_a_huge_prompt_is_refused_with_a_readable_message.
    return ldm.load(base_model, device="cpu", dtype="float32", max_size=MAX_SIZE, max_prompt_tokens=8000)


@pytest.fixture(scope="module")
def web(launch_web_app, pipe):
    from ui.state import Pipes

    return launch_web_app(Pipes(pipe), preview_every=0, max_upload_mb=1, abandon_after=10)


@pytest.fixture(scope="module")
def client(web):
    return web.client()


@pytest.fixture
def model_calls(pipe):
    """How often the text encoder and U-Net ran (proves "before any model work")."""
    calls = {"text": 0, "unet": 0}
    hooks = [pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.__setitem__("text", calls["text"] + 1)),
             pipe.unet.register_forward_pre_hook(lambda m, a: calls.__setitem__("unet", calls["unet"] + 1))]
    yield calls
    for hook in hooks:
        hook.remove()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web-in") / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def ok(client, **kwargs):
    gallery, info, _, status = client.predict(**{"prompt": "x", "steps": 1, "seed": 1, **kwargs}, api_name="/txt2img")
    assert status.startswith("Done: ") and gallery, status
    return gallery, info


def refused(client, api_name="/txt2img", **kwargs) -> str:
    with pytest.raises(AppError) as err:
        client.predict(**kwargs, api_name=api_name)
    message = str(err.value)
    assert message and GENERIC not in message, f"no clear message for {kwargs}: {message}"
    # Handlers' messages reach API clients as plain text (no toast: the page shows them in the status
    # line); Gradio's own input checks stay escaped (they can show as a toast, which renders HTML).
    assert "<" not in message or not any(e in message for e in ("&lt;", "&gt;", "&#x27;", "&quot;")), message
    return message


# ---- 5: out-of-range parameters --------------------------------------------------------------


BAD_TXT2IMG = [
    # sizes: ldm's range check is the one rule (ui.gradio_compat.library_range), for the page and the API
    ({"width": 0}, "width 0 is out of range"), ({"height": -8}, "height -8 is out of range"),
    ({"width": 33}, "multiple of 8"), ({"width": MAX_SIZE + 8}, f"out of range: use 1 to {MAX_SIZE} pixels"),
    ({"height": 100_000}, "height 100000 is out of range"), ({"steps": 0}, "steps must be a whole number from 1"),
    # the other numbers ldm (or the handler) checks: its rule and message too (ui.ranges)
    ({"steps": 10_000}, "steps must be a whole number from 1 to 1000, got 10000"), ({"steps": 2.5}, "whole number"),
    ({"batch_size": 1000}, "batch_size must be a whole number from 1 to 16"),
    ({"batch_count": 1000}, "batch_count must be from 1 to 100, got 1000"),
    ({"seed": -5}, "less than minimum"), ({"seed": 2**40}, "seed must be"),
    ({"clip_skip": 0}, "clip_skip must be a whole number from 1 to"),
    ({"guidance_scale": -1}, "guidance_scale (CFG scale) must be a number from 0 to 100, got -1"),
    ({"guidance_scale": 101}, "guidance_scale (CFG scale) must be a number from 0 to 100, got 101"),
    ({"hires_scale": 100}, f"the largest side allowed is {MAX_SIZE}"),
    ({"hires_scale": 0.5}, "hires scale must be 1 or more (1 = no enlargement), got 0.5"),
    ({"hires_scale": 2, "hires_strength": 0}, "strength (denoising strength) must be in (0, 1], got 0"),
    # said of the hires steps by ldm itself (ldm.tasks.hires.plan), not as the first pass's "steps"
    ({"hires_scale": 2, "hires_steps": -3}, "hires steps must be a whole number from 1 to 1000 (unset: as many as "
                                            "the first pass), got -3"),
    ({"hires_scale": 2, "hires_steps": 1001}, "hires steps must be a whole number from 1 to 1000 (unset: as many as "
                                              "the first pass), got 1001"),
    ({"sampler": EVIL}, "unknown sampler"), ({"schedule": EVIL}, "schedule"),
]


@pytest.mark.parametrize("bad, expected", BAD_TXT2IMG, ids=[next(iter(b)) + "=" + str(next(iter(b.values())))[:12]
                                                           for b, _ in BAD_TXT2IMG])
def test_out_of_range_txt2img_is_a_message_before_model_work(client, model_calls, bad, expected):
    message = refused(client, **{"prompt": "x", "steps": 1, **bad})
    assert expected in message, message
    assert model_calls == {"text": 0, "unet": 0}, "the model ran for a request that was refused"
    ok(client)  # the server keeps serving


@pytest.mark.parametrize("bad, expected", [({"strength": 1.5}, "must be in (0, 1], got 1.5"),
                                           ({"strength": 0}, "must be in (0, 1], got 0"),
                                           ({"width": 36}, "multiple of 8")])
def test_out_of_range_img2img(client, picture, model_calls, bad, expected):
    message = refused(client, "/img2img", image=handle_file(str(picture)), prompt="x", steps=4, **bad)
    assert expected in message and model_calls == {"text": 0, "unet": 0}


@pytest.mark.parametrize("api, bad, expected", [
    ("/upscale", {"method": "lanczos", "scale": 9}, "scale must be in (0, 8], got 9.0"),
    ("/upscale", {"method": "hires fix", "scale": 0.5}, "hires scale must be 1 or more"),
    ("/upscale", {"method": "hires fix", "scale": 2, "strength": 1.5}, "must be in (0, 1], got 1.5"),
    ("/img2img", {"guidance_scale": 250}, "must be a number from 0 to 100, got 250"),
    ("/txt2img", {"refiner": "any", "refiner_switch_at": 1}, "refiner_switch_at must be a fraction of the steps "
                                                              "between 0 and 1 (e.g. 0.8), got 1.0"),
])
def test_typed_values_beyond_a_slider_get_the_rule_that_checks_them(client, picture, model_calls, api, bad, expected):
    image = {} if api == "/txt2img" else {"image": handle_file(str(picture))}
    message = refused(client, api, prompt="x", steps=2, **image, **bad)
    assert expected in message and model_calls == {"text": 0, "unet": 0}, message


def call_raw(web, api: str, body: str, headers: dict | None = None) -> tuple[str, str]:
    """POST a hand-written JSON body (NaN is not JSON, so gradio_client refuses to send it) and read
    the event stream: -> (event name, data) of the last event. `headers`: e.g. a session Cookie."""
    req = urllib.request.Request(f"{web.url}gradio_api/call/{api}", data=body.encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    event_id = json.loads(urllib.request.urlopen(req, timeout=10).read())["event_id"]
    stream = urllib.request.Request(f"{web.url}gradio_api/call/{api}/{event_id}", headers=headers or {})
    with urllib.request.urlopen(stream, timeout=60) as resp:
        text = resp.read().decode()
    events = re.findall(r"event: (\w+)\ndata: (.*)", text)
    return events[-1]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_cfg_nan_and_infinity_sent_raw(web, client, model_calls, value):
    # txt2img's inputs in order, each at its listed default but these (the list grows with features)
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/txt2img"]["parameters"]
    given = {"prompt": "x", "sampler": "Euler", "steps": 1, "width": 32, "height": 32, "seed": 1, "guidance_scale": "CFG"}
    data = [given.get(p["parameter_name"], p["parameter_default"]) for p in params]
    event, data = call_raw(web, "txt2img", json.dumps({"data": data}).replace('"CFG"', value))
    assert event == "error", (event, data)
    message = (json.loads(data) or {}).get("error") or ""
    assert "guidance_scale" in message or "maximum" in message or "minimum" in message, message
    assert model_calls["unet"] == 0
    ok(client)


def test_wrong_types_are_refused_with_a_clear_message(client, model_calls):
    """A string or null where a number belongs fails in Gradio's own input check; the message names
    the field (ui.gradio_compat.readable_errors) and the server carries on."""
    for bad, field in (({"width": EVIL}, "Width"), ({"steps": None}, "Sampling steps"), ({"seed": "1; rm -rf /"}, "Seed"),
                       ({"batch_size": [1, 2]}, "Batch size")):
        message = refused(client, **{"prompt": "x", "steps": 1, **bad})
        assert field in message and "is not a valid value" in message, message
    assert model_calls["unet"] == 0
    ok(client)


# ---- 6: masks through /inpaint ---------------------------------------------------------------


def make_mask(kind: str, folder: Path) -> Path:
    path = folder / f"mask-{kind}.png"
    bottom = np.zeros((32, 32), dtype=np.uint8)
    bottom[16:] = 255
    if kind == "L":
        Image.fromarray(bottom, "L").save(path)
    elif kind == "1bit":
        Image.fromarray(bottom, "L").convert("1").save(path)
    elif kind == "RGB":
        Image.fromarray(np.stack([bottom] * 3, -1), "RGB").save(path)
    elif kind == "RGBA":  # transparent = repaint: opaque top, transparent bottom
        rgba = np.zeros((32, 32, 4), dtype=np.uint8)
        rgba[..., 3] = 255 - bottom
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "P":
        Image.fromarray(bottom, "L").convert("P").save(path)
    elif kind == "wrong-size":  # same shape, twice the size: scaled to the picture
        Image.fromarray(bottom, "L").resize((64, 64), Image.Resampling.NEAREST).save(path)
    elif kind == "wrong-aspect":
        Image.new("L", (48, 16), 255).save(path)
    elif kind == "black":
        Image.new("L", (32, 32), 0).save(path)
    elif kind == "white":
        Image.new("L", (32, 32), 255).save(path)
    elif kind == "text":
        path = folder / "mask-text.png"
        path.write_bytes(b"this is not an image\n" * 10)
    elif kind == "truncated":
        Image.fromarray(bottom, "L").save(path)
        path.write_bytes(path.read_bytes()[:60])
    return path


def changed(result, picture: Path) -> np.ndarray:
    gallery, _, _, status = result
    assert status.startswith("Done"), status
    with Image.open(gallery[0]["image"]) as after, Image.open(picture) as before:
        return np.any(np.asarray(after.convert("RGB")) != np.asarray(before.convert("RGB")), axis=-1)


@pytest.mark.parametrize("kind", ["L", "1bit", "RGB", "RGBA", "P", "wrong-size"])
def test_mask_formats_are_normalised(client, picture, tmp_path, kind):
    result = client.predict(image=handle_file(str(picture)), mask=handle_file(str(make_mask(kind, tmp_path))),
                            prompt="x", steps=2, seed=3, mask_blur=0, strength=1.0, api_name="/inpaint")
    diff = changed(result, picture)
    assert not diff[:16].any() and diff[16:].mean() > 0.5, kind


def test_all_white_mask_repaints_everything_and_all_black_says_so(client, picture, tmp_path):
    result = client.predict(image=handle_file(str(picture)), mask=handle_file(str(make_mask("white", tmp_path))),
                            prompt="x", steps=2, seed=3, mask_blur=0, strength=1.0, api_name="/inpaint")
    assert changed(result, picture).mean() > 0.9
    try:
        result = client.predict(image=handle_file(str(picture)), mask=handle_file(str(make_mask("black", tmp_path))),
                                prompt="x", steps=2, seed=3, mask_blur=0, strength=1.0, api_name="/inpaint")
    except AppError as err:  # a clear refusal is fine...
        assert GENERIC not in str(err) and "mask" in str(err).lower()
    else:  # ...and so is the untouched picture
        assert not changed(result, picture).any()


@pytest.mark.parametrize("kind", ["wrong-aspect", "text", "truncated"])
def test_unusable_masks_get_a_clear_message(client, picture, tmp_path, kind):
    path = make_mask(kind, tmp_path)
    message = refused(client, "/inpaint", image=handle_file(str(picture)), mask=handle_file(str(path)), prompt="x",
                      steps=2)
    assert "mask" in message.lower() or "image" in message.lower(), message
    ok(client)


# ---- 7: decompression bombs and big uploads --------------------------------------------------


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header for a huge greyscale image and one tiny compressed row: a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)  # one row; a decoder would want `height` of them
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def rss_mb(pid: str = "self") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("side", [5_000, 10_000, 50_000])
@pytest.mark.parametrize("api", ["/img2img", "/png_info", "/upscale"])
def test_decompression_bombs_are_refused_before_decoding(client, tmp_path, side, api):
    path = bomb_png(tmp_path / f"bomb-{side}.png", side, side)
    assert path.stat().st_size < 100_000
    before = rss_mb()
    with pytest.raises(AppError) as err:
        client.predict(image=handle_file(str(path)), api_name=api)
    assert rss_mb() - before < 100, "the bomb was decoded"
    message = str(err.value)
    assert GENERIC not in message and "limit" in message, message
    if side == 5_000:  # over our 4096x4096 limit, under PIL's guard: ldm.images names the size
        assert "5000x5000 pixels" in message
    else:  # PIL's guard (89 MP) fires on the header, in Gradio's check or in ldm.images
        assert "too large" in message
    ok(client)


def test_upload_over_the_limit_is_refused_by_gradio_and_by_load_image(web, client, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 * 1024  # the app's --max-upload-mb is 1
    with pytest.raises(Exception) as err:
        client.predict(image=handle_file(str(big)), api_name="/png_info")
    assert "413" in str(err.value) or "too large" in str(err.value).lower() or "size" in str(err.value).lower(), err.value
    # The upload route answers 413 before storing anything.
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{web.url}gradio_api/upload", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=30)
    assert http_err.value.code == 413
    # The handlers check the same limit again (a file reaching them by another route).
    from ui import convert

    with pytest.raises(ValueError, match="the limit is 1 MB"):
        convert.load_upload(web.ctx, str(big))
    ok(client)


# ---- 8: prompts ------------------------------------------------------------------------------


NAMES = re.compile(r"^\d{5}-\d+-[A-Za-z0-9-]+\.png$")


@pytest.mark.parametrize("prompt", [
    " ".join(["a red circle on a blue background"] * 43),  # ~300 tokens: four 75-token chunks
    "", EVIL, "../../etc/passwd", "a\x00b\x00../../x", "x" * 10_000, "</textarea><script>alert`1`</script>\n../" * 300,
], ids=["300-tokens", "empty", "html", "traversal", "nul", "10k", "mixed"])
def test_prompts_are_text_everywhere_and_never_a_path(web, client, prompt):
    gallery, info, _, status = client.predict(prompt=prompt, negative_prompt=prompt, steps=1, seed=11,
                                              api_name="/txt2img")
    assert status.startswith("Done") and gallery[0]["caption"] is None
    assert info.startswith(prompt + "\n")  # as typed (the UI shows it in a textbox: text, not HTML)
    with Image.open(gallery[0]["image"]) as im:
        assert im.info["parameters"] == info
    for f in web.outputs.rglob("*"):
        if f.is_file():
            assert f.parent.parent == web.outputs and NAMES.match(f.name) and len(f.name) < 100, f
    assert not (web.outputs.parent / "etc").exists()


def test_a_huge_prompt_is_refused_with_a_readable_message(client):
    """Issue 16: a 1 MB prompt once took a minute and gigabytes; now it is refused before tokenising."""
    started = time.monotonic()
    message = refused(client, prompt="x" * 1_000_000, steps=1)
    assert "prompt is 1,000,000 characters long; the limit is 128,000" in message
    assert time.monotonic() - started < 20  # upload and refusal, no model work
    gallery, _, _, status = client.predict(prompt="a red circle", steps=1, seed=1, api_name="/txt2img")
    assert status.startswith("Done") and gallery  # and the server keeps serving


def test_user_text_in_error_messages_is_plain_text(client, picture):
    """API clients get the message as typed (issue 17); the page shows it as textarea text, not HTML."""
    for api, kwargs in (("/txt2img", {"sampler": EVIL}), ("/upscale", {"image": handle_file(str(picture)), "method": EVIL}),
                        ("/inpaint", {"image": handle_file(str(picture)), "mask": handle_file(str(picture)),
                                      "inpaint_area": EVIL}),
                        ("/inpaint", {"image": handle_file(str(picture)), "mask": handle_file(str(picture)),
                                      "masked_content": EVIL})):
        message = refused(client, api, prompt=EVIL, steps=1, **kwargs)
        assert "&lt;" not in message and "&#x27;" not in message


# ---- 9: PNG info -----------------------------------------------------------------------------


def png_with_parameters(path: Path, text: str, compressed: bool = False) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text, zip=compressed)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_png_info_shows_html_as_text(client, tmp_path):
    text = f"{EVIL}\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8"
    assert client.predict(image=handle_file(str(png_with_parameters(tmp_path / "h.png", text))), api_name="/png_info") == text


@pytest.mark.parametrize("size, compressed", [(1_000_000, False), (1_000_000, True), (3_000_000, True)])
def test_png_info_of_huge_parameters_is_truncated(client, tmp_path, size, compressed):
    from ui.tasks import MAX_INFOTEXT_CHARS

    text = ("<b>x</b> " * (size // 9 + 1))[:size]
    path = png_with_parameters(tmp_path / "big.png", text, compressed)
    try:
        shown = client.predict(image=handle_file(str(path)), api_name="/png_info")
    except AppError as err:  # PIL refuses text chunks over its own limit: still a clear message
        assert GENERIC not in str(err) and "<b>" not in str(err)
        return
    assert len(shown) < MAX_INFOTEXT_CHARS + 200
    assert shown.startswith(text[:1000]) and "truncated" in shown and f"{len(text):,}" in shown
    ok(client)


# ---- 12: stop --------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_stop_ends_a_run_within_one_step(web, pipe):
    """The Stop button's path: the session's cancel flag is set; the model makes at most one more step."""
    from ui import streaming, tasks

    steps = []
    gen = tasks.txt2img(web.ctx, prompt="x", steps=200, width=32, height=32, seed=1, sampler="Euler", session="stopper")
    out = None
    for item in gen:
        if isinstance(item, streaming.Step):
            steps.append(item.step)
            if item.step == 3:
                assert web.ctx.jobs.cancel("stopper") == 1
                at_cancel = item.step
        else:
            out = item
    assert out.stopped and not out.images
    assert max(steps) - at_cancel <= 1, steps


def test_cancelling_a_queued_job_removes_only_that_job(web, client):
    from gradio_client import Client
    from gradio_client.utils import Status

    started = []
    real_start = web.ctx.jobs.start

    def spy(session):
        started.append(session)
        return real_start(session)

    web.ctx.jobs.start = spy
    try:
        other = [Client(web.url, verbose=False) for _ in range(2)]
        running = client.submit(prompt="long", steps=150, batch_count=50, seed=1, api_name="/txt2img")
        wait_for(lambda: web.ctx.jobs.active() == 1, 60, "the first run never started")
        queued = other[0].submit(prompt="queued, cancelled", steps=1, seed=2, api_name="/txt2img")
        last = other[1].submit(prompt="queued, kept", steps=1, seed=3, api_name="/txt2img")
        wait_for(lambda: queued.status().code in (Status.IN_QUEUE, Status.QUEUE_FULL) or queued.status().rank is not None,
                 20, "the second job was not queued")
        time.sleep(0.5)
        assert queued.cancel() is True or queued.status().code == Status.CANCELLED
        time.sleep(1.0)
        assert web.ctx.jobs.active() == 1 and len(started) == 1  # the running one carries on, alone
        running.cancel()
        gallery, info, _, status = last.result(timeout=120)
        assert status.startswith("Done") and "queued, kept" in info
        assert len(started) == 2, started  # the cancelled job never ran
        assert queued.status().code == Status.CANCELLED
    finally:
        web.ctx.jobs.start = real_start
    ok(client)


def test_stop_flags_are_per_session(web):
    """Two sessions running at once (handler level, as the queue would with more workers): Stop in one
    leaves the other alone."""
    from ui import streaming, tasks

    results = {}

    def run(session):
        results[session] = streaming.run(tasks.txt2img(web.ctx, prompt=session, steps=60, width=32, height=32,
                                                       seed=1, sampler="Euler", session=session))

    threads = [threading.Thread(target=run, args=(s,)) for s in ("alice", "bob")]
    for t in threads:
        t.start()
    wait_for(lambda: web.ctx.jobs.active() == 2, 60, "both runs should be active")
    assert web.ctx.jobs.cancel("alice") == 1
    for t in threads:
        t.join(120)
    assert results["alice"].stopped and not results["bob"].stopped and len(results["bob"].images) == 1
    assert web.ctx.jobs.cancel("bob") == 0  # finished runs leave no flags behind


# ---- 13: full or read-only outputs -----------------------------------------------------------


def test_disk_full_still_returns_the_image_with_a_warning(web, client, monkeypatch):
    from ldm import metadata
    from ui import streaming, tasks

    real_save = metadata.save_png
    outputs = Path(web.outputs).resolve()

    def full(image, path, infotext, *a, **kw):
        if Path(path).resolve().is_relative_to(outputs):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(image, path, infotext, *a, **kw)

    before = sorted(outputs.rglob("*.png"))
    monkeypatch.setattr(metadata, "save_png", full)
    out = streaming.run(tasks.txt2img(web.ctx, prompt="full disk", steps=1, width=32, height=32, seed=4))
    assert len(out.images) == 1 and "No space left on device" in out.warnings[0] and "only in this page" in out.warnings[0]
    gallery, info, _, status = client.predict(prompt="full disk", steps=1, seed=4, api_name="/txt2img")
    assert status.startswith("Done")
    with Image.open(gallery[0]["image"]) as im:
        assert im.info["parameters"] == info  # the temp copy still carries the parameters
    assert sorted(outputs.rglob("*.png")) == before  # nothing half-written in outputs

    # Even the temp folder full: the picture itself is still returned.
    monkeypatch.setattr(metadata, "save_png", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    gallery, _, _, status = client.predict(prompt="very full disk", steps=1, seed=5, api_name="/txt2img")
    assert status.startswith("Done") and gallery
    monkeypatch.setattr(metadata, "save_png", real_save)
    ok(client)
    assert len(sorted(outputs.rglob("*.png"))) == len(before) + 1  # saving resumes once there is room


# ---- 14: two models, two clients -------------------------------------------------------------


def test_two_apps_on_two_models_at_once_each_get_their_own_result(launch_web_app, tmp_path_factory):
    import ldm
    from ui.state import Pipes

    pipes = [ldm.load(tiny.save_model(tmp_path_factory.mktemp(f"model-{s}"), unet_model=tiny.unet(seed=s)),
                      device="cpu", dtype="float32") for s in (11, 12)]
    apps = [launch_web_app(Pipes(p), preview_every=0) for p in pipes]
    expected = [np.asarray(p.txt2img("same prompt", steps=4, width=32, height=32, seed=9).images[0]) for p in pipes]
    assert not np.array_equal(*expected)
    got = {}

    def call(i):
        for _ in range(3):
            gallery, *_ = apps[i].client().predict(prompt="same prompt", steps=4, width=32, height=32, seed=9,
                                                   api_name="/txt2img")
            with Image.open(gallery[0]["image"]) as im:
                got.setdefault(i, []).append(np.asarray(im.convert("RGB")))

    threads = [threading.Thread(target=call, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in (0, 1):
        assert len(got[i]) == 3 and all(np.array_equal(g, expected[i]) for g in got[i]), i


def test_temp_pngs_are_pruned_with_no_save(base_pipe, tmp_path, monkeypatch):
    """--no-save (or unwritable outputs) puts every image in a temp folder; old ones are deleted."""
    import os

    from ui import saving

    saver = saving.Saver(None, temp_max_age=60)
    image = Image.new("RGB", (8, 8))
    first, _ = saver.save(image, "a\nSteps: 1", seed=1, prompt="a", task="txt2img")
    old = time.time() - 3600
    os.utime(first, (old, old))
    saver._pruned -= 3600  # as if the last check was long ago
    second, _ = saver.save(image, "b\nSteps: 1", seed=2, prompt="b", task="txt2img")
    assert not Path(first).exists() and Path(second).exists()


def test_cache_policy_and_flag():
    import sys

    from ui.layout import cache_policy

    assert cache_policy(3600) == (600, 3600) and cache_policy(20) == (10, 20) and cache_policy(0) is None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import app

    assert app.parse_args([]).cache_max_age == 3600 and app.parse_args(["--cache-max-age", "0"]).cache_max_age == 0


@pytest.mark.browser
def test_hostile_prompt_and_error_are_text_in_the_browser(web):
    """In Chromium: the prompt lands in the infotext box as text, the error for a custom sampler
    name is quoted as text in the status line, and no injected element or script ever runs."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(web.url)
            page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
            page.fill("#txt2img-prompt textarea", EVIL)
            steps = page.locator("#txt2img-steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            page.click("#txt2img-generate")
            page.wait_for_function("document.querySelector('#txt2img-info textarea').value.includes('Seed:')",
                                   timeout=60_000)
            assert page.input_value("#txt2img-info textarea").startswith(EVIL)
            # An error whose message quotes user text: a sampler name typed into the dropdown.
            sampler = page.get_by_label("Sampler", exact=True)
            sampler.fill(EVIL)
            sampler.press("Enter")
            page.click("#txt2img-generate")
            page.wait_for_function(  # the status line next to Generate (a textarea: text, never markup)
                "document.querySelector('#txt2img-status textarea').value.includes('unknown sampler')", timeout=60_000)
            status = page.input_value("#txt2img-status textarea")
            assert status.startswith("Failed: ") and EVIL in status  # exactly as typed, not &lt;
            time.sleep(0.5)
            assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
            assert dialogs == []
        finally:
            browser.close()


def test_the_inpaint_editor_checks_sizes_before_gradio_decodes(web, tmp_path):
    """The editor (UI only, unqueued) converts uploads to RGBA inside Gradio; a bomb is refused from
    its header first. Called as Gradio calls it, with the editor's own payload type."""
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    editor = next(b for b in web.demo.blocks.values() if getattr(b, "elem_id", None) == "inpaint-editor")
    bomb = bomb_png(tmp_path / "bomb.png", 9000, 9000)  # under PIL's own guard (89 MP), over ours (16.7 MP)
    before = rss_mb()
    for payload in (EditorData(background=FileData(path=str(bomb), orig_name="bomb.png")),
                    EditorData(background=None, layers=[FileData(path=str(bomb))]),
                    EditorData(composite=FileData(path=str(bomb_png(tmp_path / "b2.png", 20_000, 20_000))))):
        with pytest.raises(gr.Error) as err:
            editor.preprocess(payload)
        assert "pixels" in str(err.value.message) and "limit" in str(err.value.message)
    assert rss_mb() - before < 100
    small = tmp_path / "small.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(small)
    value = editor.preprocess(EditorData(background=FileData(path=str(small))))
    assert value["background"].size == (32, 32)
