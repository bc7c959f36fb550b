"""The A1111-compatible REST API (ui.sdapi), driven by the real `webuiapi` client and by raw HTTP,
against a launched app on loopback with tiny models. Pictures must equal the library's."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from api_server import launch_api

webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def server(base_pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("sdapi-out"), preview_every=1, max_upload_mb=0.5)
    yield app
    app.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port, sampler="Euler a", steps=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))


# ---- generation ------------------------------------------------------------------------------


def test_txt2img_batch_of_two_equals_the_library(api, server, base_pipe):
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, batch_size=2, width=32, height=32,
                    steps=3, cfg_scale=5, sampler_name="Euler a", scheduler="automatic", save_images=True)
    assert len(r.images) == 2
    assert r.info["seed"] == 11 and r.info["all_seeds"] == [11, 12] and len(r.info["infotexts"]) == 2
    assert r.parameters["prompt"] == "a red circle"
    want = base_pipe.txt2img("a red circle", negative_prompt="blue", seed=11, batch_size=2, width=32, height=32,
                             steps=3, guidance_scale=5.0, sampler="Euler a")
    for got, expected, info in zip(r.images, want.images, want.infotexts):
        assert np.array_equal(pixels(got), pixels(expected))
        assert got.info["parameters"] == info  # every PNG carries its infotext
    assert len(list((server.outputs / "txt2img").glob("*.png"))) == 2  # save_images


def test_n_iter_batches_use_consecutive_seeds_and_clip_skip_override(api, base_pipe):
    r = api.txt2img(prompt="x", seed=40, n_iter=2, batch_size=1, width=32, height=32, steps=2,
                    override_settings={"CLIP_stop_at_last_layers": 2})
    assert r.info["all_seeds"] == [40, 41] and len(r.images) == 2
    want = base_pipe.txt2img("x", seed=41, width=32, height=32, steps=2, sampler="Euler a", clip_skip=2)
    assert np.array_equal(pixels(r.images[1]), pixels(want.images[0]))
    assert "Clip skip: 2" in r.info["infotexts"][0]


def test_hires_fields_map_to_the_library_hires_fix(api, base_pipe):
    r = api.txt2img(prompt="hi", seed=3, width=32, height=32, steps=2, enable_hr=True, hr_scale=1.5,
                    hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6)
    want = base_pipe.txt2img("hi", seed=3, width=32, height=32, steps=2, sampler="Euler a", hires_scale=1.5,
                             hires_strength=0.6, hires_upscaler="latent", hires_steps=2)
    assert r.images[0].size == want.images[0].size == (48, 48)
    assert np.array_equal(pixels(r.images[0]), pixels(want.images[0]))


def test_subseed_is_ignored_with_a_note_and_unknown_keys_are_ignored(server):
    body = {"prompt": "n", "seed": 1, "width": 32, "height": 32, "steps": 1, "subseed": 5, "subseed_strength": 0.5,
            "some_future_field": {"x": 1}, "send_images": False}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["images"] == [] and any("subseed" in n for n in json.loads(out["info"])["notes"])


def test_img2img_with_a_mask_keeps_the_pixels_outside_it(api, base_pipe, picture):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = api.img2img(images=[picture], mask_image=mask, prompt="fill", seed=2, width=32, height=32, steps=3,
                    denoising_strength=0.9, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    got = pixels(r.images[0])
    orig = pixels(picture)
    outside = np.asarray(mask) == 0
    assert np.array_equal(got[outside], orig[outside])
    assert not np.array_equal(got[~outside], orig[~outside])
    from ldm.masks import MaskedContent

    want = base_pipe.inpaint(picture, mask, "fill", seed=2, width=32, height=32, steps=3, strength=0.9, mask_blur=0,
                             masked_content=MaskedContent.ORIGINAL, inpaint_area="whole", sampler="Euler a")
    assert np.array_equal(got, pixels(want.images[0]))


def test_img2img_without_mask_equals_the_library(api, base_pipe, picture):
    r = api.img2img(images=[picture], prompt="redo", seed=4, width=32, height=32, steps=4, denoising_strength=0.5)
    want = base_pipe.img2img(picture, "redo", seed=4, width=32, height=32, steps=4, strength=0.5, sampler="Euler a")
    assert np.array_equal(pixels(r.images[0]), pixels(want.images[0]))
    assert r.parameters["init_images"] is None  # not echoed back unless include_init_images


def test_png_info_reads_back_the_parameters(api):
    r = api.txt2img(prompt="roundtrip", seed=9, width=32, height=32, steps=1)
    info = api.png_info(r.images[0])
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Seed"] == "9" and info.parameters["Prompt"] == "roundtrip"


def test_extra_single_image_resizes_like_the_library_and_keeps_the_infotext(api, picture):
    import ldm

    made = api.txt2img(prompt="to enlarge", seed=1, width=32, height=32, steps=1).image
    r = api.extra_single_image(made, upscaler_1="Nearest", upscaling_resize=2)
    assert np.array_equal(pixels(r.image), pixels(ldm.upscale_image(made, 2, "nearest")))
    assert r.image.info["parameters"] == made.info["parameters"]
    with pytest.raises(RuntimeError, match="422"):
        api.extra_single_image(picture, upscaler_1="ESRGAN_4x")  # model upscalers are not available


# ---- listings and options --------------------------------------------------------------------


def hashed_models(api) -> list[dict]:
    """/sd-models once the serving checkpoint's hash (computed in the background after loading) is in its title."""
    deadline = time.monotonic() + 30
    while not (models := api.get_sd_models())[0]["hash"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return models


def test_listings(api, base_pipe):
    from ldm import samplers

    assert [s["name"] for s in api.get_samplers()] == samplers.sampler_names()
    assert {s["label"] for s in api.get_schedulers()} == set(samplers.schedule_names())
    models = hashed_models(api)
    assert models == [{"title": f"{base_pipe.name} [{base_pipe.model_hash}]", "model_name": base_pipe.name,
                       "hash": base_pipe.model_hash, "sha256": None, "filename": str(base_pipe.components.path),
                       "config": None}]
    assert api.util_get_model_names() == [models[0]["title"]]
    api.util_set_model(base_pipe.name)  # posts the title back as sd_model_checkpoint
    assert api.util_get_current_model() == models[0]["title"]
    assert [u["name"] for u in api.get_latent_upscale_modes()] == ["Latent"]
    import ldm

    assert [u["name"] for u in api.get_upscalers()] == ["None"] + [k.capitalize() for k in ldm.RESAMPLERS]
    assert api.get_sd_vae() == [] and api.get_cmd_flags() == {"model": "tiny"}
    assert "ram" in api.get_memory()
    api.refresh_checkpoints()  # a no-op with the one model loaded at start-up


def test_options_get_and_post_partial_and_whole(api, server, base_pipe):
    hashed_models(api)
    options = api.get_options()
    assert options["sd_model_checkpoint"] == f"{base_pipe.name} [{base_pipe.model_hash}]"
    api.set_options(options)  # Open WebUI posts the whole dict back
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
    r = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}, timeout=10)
    assert r.status_code == 422 and "switching is off" in r.json()["detail"]  # this server has no model loader
    r = requests.post(f"{server.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99}, timeout=10)
    assert r.status_code == 422 and "from 1 to" in r.json()["detail"]


# ---- progress and interrupt ------------------------------------------------------------------


def test_progress_shows_a_running_job_and_interrupt_stops_it(api, server):
    result = {}

    def slow():
        result["r"] = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
            "prompt": "slow", "seed": 1, "width": 32, "height": 32, "steps": 400, "n_iter": 3})

    worker = threading.Thread(target=slow)
    worker.start()
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 400
    assert 0 < progress["progress"] < 1 and progress["current_image"]
    Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
    assert api.interrupt() == {}
    worker.join(60)
    r = result["r"]
    assert r.status_code == 200 and r.json()["images"] == []  # interrupted in the first batch: nothing kept
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_ends_only_the_current_batch(server):
    result = {}

    def run():
        result["r"] = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
            "prompt": "skip", "seed": 1, "width": 32, "height": 32, "steps": 400, "n_iter": 2})

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while server.ctx.queues.running() == [] or server.ctx.queues.running()[0].step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    requests.post(f"{server.url}/sdapi/v1/skip", timeout=10)
    while server.ctx.queues.running() and server.ctx.queues.running()[0].batch == 0:
        time.sleep(0.02)
    requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=10)
    worker.join(60)
    assert result["r"].status_code == 200


# ---- bad input and errors (raw HTTP) ---------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    ('{"prompt": "x", ', 422, "JSON"),
    ({"steps": "many"}, 422, "valid integer"),
    ({"width": 33, "height": 32}, 422, "not a multiple of"),
    ({"width": 32, "height": 32, "steps": 0}, 422, "steps must be"),
    ({"sampler_name": "Nope"}, 422, "unknown sampler"),
    ({"scheduler": "sideways"}, 422, "unknown scheduler"),
    ({"cfg_scale": 1000}, 422, "guidance_scale"),
    ({"n_iter": 0}, 422, "n_iter"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 422, "unknown hr_upscaler"),
    ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, 422, "not loaded"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 50}}, 422, "clip_skip"),
])
def test_txt2img_bad_input_is_422_before_model_work(server, body, status, words):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=data, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == status, r.text
    assert words.lower() in json.dumps(r.json()).lower()
    assert server.ctx.queues.job_count() == 0


@pytest.mark.parametrize("field, value, status, words", [
    ("init_images", ["https://example.com/cat.png"], 422, "url"),
    ("init_images", ["data:image/png,rawbytes"], 422, "base64"),
    ("init_images", ["!!!not base64!!!"], 422, "base64"),
    ("init_images", [base64.b64encode(b"hello, not an image").decode()], 422, "image"),
    ("init_images", [], 422, "init_images"),
    ("init_images", ["A" * 1_000_000], 413, "limit"),
    ("inpainting_fill", 7, 422, "inpainting_fill"),
    ("resize_mode", 2, 422, "resize_mode"),
])
def test_img2img_bad_input(server, picture, field, value, status, words):
    body = {"init_images": [b64(picture)], "width": 32, "height": 32, "steps": 2, field: value}
    r = requests.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words.lower() in r.text.lower()


def test_png_info_bad_input(server):
    assert requests.post(f"{server.url}/sdapi/v1/png-info", json={"image": "http://x/y.png"}, timeout=10).status_code == 422
    assert requests.post(f"{server.url}/sdapi/v1/png-info", json={}, timeout=10).status_code == 422
    plain = Image.new("RGB", (8, 8))
    r = requests.post(f"{server.url}/sdapi/v1/png-info", json={"image": b64(plain)}, timeout=10)
    assert r.status_code == 200 and r.json() == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("error", ["OutOfMemory", "DecodeError"])
def test_generation_errors_are_500_with_the_message_and_the_server_keeps_serving(server, base_pipe, monkeypatch, error):
    import ldm

    def broken(*args, **kwargs):
        raise getattr(ldm, error)(f"simulated {error}: try a smaller size")

    monkeypatch.setattr(base_pipe, "txt2img", broken)
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"width": 32, "height": 32, "steps": 1}, timeout=30)
    assert r.status_code == 500 and f"simulated {error}" in r.json()["detail"]
    monkeypatch.undo()
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"width": 32, "height": 32, "steps": 1}, timeout=30)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_a_full_queue_is_503(server):
    from ui.turns import Turn

    queue = server.ctx.queues.of(server.ctx.pipes.base)
    blockers = [queue.join(Turn("test")) for _ in range(queue.max_waiting)]
    try:
        r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"width": 32, "height": 32, "steps": 1}, timeout=30)
        assert r.status_code == 503 and "queue is full" in r.json()["detail"]
    finally:
        for t in blockers:
            queue.leave(t)


def test_docs_and_openapi_describe_the_api(server):
    r = requests.get(f"{server.url}/docs", timeout=10)
    assert r.status_code == 200 and "swagger" in r.text.lower()
    paths = requests.get(f"{server.url}/sdapi/openapi.json", timeout=10).json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/v1/jobs"} <= set(paths)


# ---- auth ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(base_pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("sdapi-auth"), auth=[("ann", "s3cret")])
    yield app
    app.close()


def test_auth_on_the_api_is_http_basic(locked):
    url = f"{locked.url}/sdapi/v1/samplers"
    r = requests.get(url, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert requests.get(url, auth=("ann", "wrong"), timeout=10).status_code == 401
    assert requests.get(url, auth=("ann", "s3cret"), timeout=10).status_code == 200
    for path in ("/docs", "/sdapi/openapi.json", "/api/v1/jobs/x"):
        assert requests.get(locked.url + path, timeout=10).status_code == 401
    api = webuiapi.WebUIApi(port=locked.port, username="ann", password="s3cret", steps=1)
    r = api.txt2img(prompt="locked", width=32, height=32, seed=1)
    assert r.info["all_seeds"] == [1]
    bad = webuiapi.WebUIApi(port=locked.port, username="ann", password="nope", steps=1)
    with pytest.raises(RuntimeError, match="401"):
        bad.txt2img(prompt="x", width=32, height=32)


def test_failed_basic_auth_backs_off_per_client(base_pipe, tmp_path_factory):
    """Issue 16 item 10 for the API: guessing passwords over HTTP Basic is slowed down as the login is."""
    from ui.limits import LoginBackoff
    from ui.state import Pipes

    now = [1000.0]
    backoff = LoginBackoff(free_failures=2, base_delay=30.0, clock=lambda: now[0])
    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("sdapi-backoff"), auth=[("ann", "s3cret")], backoff=backoff)
    try:
        url = f"{app.url}/sdapi/v1/samplers"
        assert requests.get(url, timeout=10).status_code == 401  # no credentials: not a failed guess
        for _ in range(2):
            assert requests.get(url, auth=("ann", "guess"), timeout=10).status_code == 401
        r = requests.get(url, auth=("ann", "s3cret"), timeout=10)  # even the right password waits now
        assert r.status_code == 429 and r.headers["retry-after"] == "30" and "too many failed logins" in r.text
        now[0] += 31
        assert requests.get(url, auth=("ann", "s3cret"), timeout=10).status_code == 200
        assert requests.get(url, auth=("ann", "guess"), timeout=10).status_code == 401  # success reset the count
    finally:
        app.close()


def test_every_api_route_refuses_requests_without_credentials(locked):
    from ui.security import is_api

    paths = requests.get(f"{locked.url}/sdapi/openapi.json", auth=("ann", "s3cret"), timeout=10).json()["paths"]
    checked = 0
    for path, methods in paths.items():
        assert is_api(path)  # the access gate lets exactly these through to the API's own check
        for method in methods:
            r = requests.request(method.upper(), locked.url + path.replace("{job_id}", "x"), json={}, timeout=10)
            assert r.status_code == 401, (method, path, r.status_code)
            checked += 1
    assert checked >= 25


def test_the_ui_cookie_gate_still_guards_the_rest(locked):
    # Basic credentials are the API's; the UI's routes still need a logged-in session.
    for path in ("/config", "/gradio_api/info", "/api/v1"):
        r = requests.get(locked.url + path, auth=("ann", "s3cret"), timeout=10)
        assert r.status_code in (401, 404, 405), (path, r.status_code)
        assert r.status_code != 200
    r = requests.get(f"{locked.url}/sdapi/v1/samplers", auth=("ann", "s3cret"), timeout=10)
    assert r.headers["x-content-type-options"] == "nosniff"  # the gate's headers still apply


def test_separate_api_credentials(base_pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("sdapi-sep"), auth=[("ann", "ui")], api_auth=[("bot", "api")])
    try:
        url = f"{app.url}/sdapi/v1/sd-models"
        assert requests.get(url, auth=("ann", "ui"), timeout=10).status_code == 401
        assert requests.get(url, auth=("bot", "api"), timeout=10).status_code == 200
    finally:
        app.close()


def test_no_api_flag_and_api_auth_flag():
    import app

    args = app.parse_args(["--no-api", "--api-auth", "bot:pw", "--api-job-ttl", "60"])
    assert args.no_api and args.api_auth == "bot:pw" and args.api_job_ttl == 60
    assert not app.parse_args([]).no_api


def test_a_body_over_the_request_limit_is_413_before_it_is_read(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500000000\r\n\r\n{\"prompt\": ")
        head = s.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413")
    assert requests.get(f"{server.url}/sdapi/v1/samplers", timeout=10).status_code == 200  # still serving
