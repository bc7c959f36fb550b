"""The asynchronous job API (/api/v1/jobs) and the one queue per model that the UI and the API share."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from api_server import launch_api

requests = pytest.importorskip("requests")
pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(base_pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("jobs-out"), preview_every=1, job_ttl=30)
    yield app
    app.close()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what}")


def job(server, job_id: str) -> dict:
    r = requests.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def submit(server, **body) -> str:
    r = requests.post(f"{server.url}/api/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def finished(server, job_id: str) -> dict:
    return wait_for(lambda: (s := job(server, job_id))["state"] in ("done", "failed", "cancelled") and s, what="job end")


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_a_txt2img_job_runs_and_keeps_its_results(server, base_pipe):
    job_id = submit(server, task="txt2img", prompt="a job", seed=21, batch_size=2, width=32, height=32, steps=3,
                    sampler_name="Euler")
    status = finished(server, job_id)
    assert status["state"] == "done" and status["progress"] == 1.0 and status["queue_position"] is None
    result = status["result"]
    assert json.loads(result["info"])["all_seeds"] == [21, 22] and len(result["images"]) == 2
    want = base_pipe.txt2img("a job", seed=21, batch_size=2, width=32, height=32, steps=3, sampler="Euler")
    for got, expected in zip(result["images"], want.images):
        assert np.array_equal(np.asarray(decode(got).convert("RGB")), np.asarray(expected))
    assert len(list((server.outputs / "txt2img").glob("*.png"))) == 2  # saved as the UI saves
    assert job(server, job_id)["result"] == result  # kept


def test_an_img2img_job_with_a_mask_inpaints(server):
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    job_id = submit(server, task="img2img", init_images=[b64(picture)], mask=b64(mask), mask_blur=0, steps=3,
                    denoising_strength=0.8, inpainting_fill=1, inpaint_full_res=False, seed=1, save_images=False)
    status = finished(server, job_id)
    assert status["state"] == "done" and status["task"] == "inpaint"
    got = np.asarray(decode(status["result"]["images"][0]).convert("RGB"))
    assert np.array_equal(got[:, 16:], np.asarray(picture)[:, 16:])


def test_cancel_running_and_queued_jobs_and_queue_positions(server):
    long = {"task": "txt2img", "prompt": "long", "width": 32, "height": 32, "steps": 500, "seed": 1}
    first = submit(server, **long)
    wait_for(lambda: job(server, first)["step"] > 1, what="first job running")
    second = submit(server, **long)
    s1, s2 = job(server, first), job(server, second)
    assert s1["state"] == "running" and s1["queue_position"] == 0 and s1["total"] == 500
    assert s1["eta"] is not None and s1["preview"]
    assert s2["state"] == "queued" and s2["queue_position"] == 1
    assert requests.delete(f"{server.url}/api/v1/jobs/{second}", timeout=10).status_code == 200
    assert finished(server, second)["state"] == "cancelled"
    assert job(server, first)["state"] == "running"  # the other job is untouched
    requests.delete(f"{server.url}/api/v1/jobs/{first}", timeout=10)
    status = finished(server, first)
    assert status["state"] == "cancelled" and status["step"] < 500
    assert server.ctx.queues.job_count() == 0


def test_events_stream_progress_then_end(server):
    job_id = submit(server, task="txt2img", prompt="events", width=32, height=32, steps=6, seed=2)
    events = []
    with requests.get(f"{server.url}/api/v1/jobs/{job_id}/events", stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "end":
                    break
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done"
    assert all(name == "progress" for name, _ in events[:-1]) and len(events) >= 2


def test_job_errors(server):
    assert requests.get(f"{server.url}/api/v1/jobs/nope", timeout=10).status_code == 404
    assert requests.delete(f"{server.url}/api/v1/jobs/nope", timeout=10).status_code == 404
    r = requests.post(f"{server.url}/api/v1/jobs", json={"task": "video"}, timeout=10)
    assert r.status_code == 422 and "task must be one of" in r.json()["detail"]
    r = requests.post(f"{server.url}/api/v1/jobs", json={"task": "txt2img", "width": 30}, timeout=10)
    assert r.status_code == 422 and "multiple" in r.json()["detail"]
    r = requests.post(f"{server.url}/api/v1/jobs", json={"task": "txt2img", "steps": [1]}, timeout=10)
    assert r.status_code == 422 and "steps" in json.dumps(r.json())
    r = requests.post(f"{server.url}/api/v1/jobs", json={"task": "img2img", "init_images": ["https://x/y.png"]}, timeout=10)
    assert r.status_code == 422 and "url" in r.text.lower()


def test_finished_jobs_are_forgotten_after_the_ttl(base_pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(base_pipe), tmp_path_factory.mktemp("jobs-ttl"), job_ttl=0.3)
    try:
        job_id = submit(app, task="txt2img", width=32, height=32, steps=1)
        finished(app, job_id)
        time.sleep(0.5)
        assert requests.get(f"{app.url}/api/v1/jobs/{job_id}", timeout=10).status_code == 404
    finally:
        app.close()


def test_ui_and_api_share_one_queue_and_interrupt_reaches_either(server):
    from gradio_client import Client

    client = Client(server.url + "/", verbose=False)
    queues = server.ctx.queues
    # An API job runs; a UI run waits its turn behind it (and shows in the API's job count).
    api_job = submit(server, task="txt2img", prompt="api first", width=32, height=32, steps=500, seed=1)
    wait_for(lambda: job(server, api_job)["step"] > 1, what="API job running")
    ui_run = client.submit(prompt="ui second", steps=3, width=32, height=32, seed=5, api_name="/txt2img")
    wait_for(lambda: queues.job_count() == 2, what="the UI run queued behind the API job")
    assert [t.origin for t in queues.of(server.ctx.pipes.base).waiting()] == ["ui"]
    progress = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()
    assert progress["state"]["job_count"] == 2
    requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=10)  # stops the API job ...
    assert finished(server, api_job)["state"] == "cancelled"
    gallery, info, _, status = ui_run.result(timeout=120)  # ... and the UI run then has its turn
    assert status.startswith("Done: 1 image") and "Seed: 5" in info
    # The API's interrupt stops a run the UI started.
    ui_long = client.submit(prompt="ui long", steps=150, batch_count=20, width=32, height=32, seed=6,
                            api_name="/txt2img")
    wait_for(lambda: queues.running() and queues.running()[0].origin == "ui" and queues.running()[0].step > 1,
             what="UI run running")
    assert requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_steps"] == 150
    requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=10)
    _, _, _, status = ui_long.result(timeout=120)
    assert status.startswith("Stopped")
    assert queues.job_count() == 0
