"""The Ray Serve backend for real: a local Ray instance on loopback (2 CPUs) with 2 CPU replicas of the
demo model behind the UI and the REST API (tests/api_server.py). Concurrent requests equal the
in-process pictures, one queue covers both replicas, Stop frees a replica, and a replica killed
mid-request fails only that request while Serve replaces it. Slow (Ray and two model loads take a
minute or more here): `pytest -m slow`. Ray's processes are gone after the module (checked)."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api_server import launch_api
from scaleout.config import keep_local_ray_on_loopback

pytestmark = pytest.mark.slow
keep_local_ray_on_loopback()  # before Ray is imported
ray = pytest.importorskip("ray", reason="the Ray backend needs requirements-ray.txt")
requests = pytest.importorskip("requests")
pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "demo"
SIZE = dict(width=64, height=64)


def ray_processes() -> set[int]:
    """Ray's own processes on this machine (raylet, GCS, workers and replicas)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    marks = ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "default_worker.py")
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if any(m in line for m in marks)}


@dataclass
class Service:
    app: Any
    backend: Any
    pipe: Any

    @property
    def url(self) -> str:
        return self.app.url


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ldm
    from scaleout.backend import RayBackend
    from scaleout.config import ScaleOut
    from scaleout.replica import LoadSettings
    from ui.state import Pipes

    before = ray_processes()
    pipe = ldm.load(DEMO, device="cpu")
    backend = RayBackend(ScaleOut(replicas=2, cpus_per_replica=1), LoadSettings(None, None, ldm.Options(), None),
                         {"base": pipe})
    app = None
    try:
        app = launch_api(Pipes(pipe), tmp_path_factory.mktemp("ray-out"), backend=backend, queue_size=4,
                         preview_every=2)
        yield Service(app, backend, pipe)
    finally:
        if app is not None:
            app.close()
        backend.close()
        deadline = time.monotonic() + 60
        while (left := ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, f"Ray processes left running: {left}"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def submit(service, **body) -> str:
    r = requests.post(f"{service.url}/api/v1/jobs", json={"task": "txt2img", **SIZE, **body}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job(service, job_id: str) -> dict:
    return requests.get(f"{service.url}/api/v1/jobs/{job_id}", timeout=10).json()


def ended(service, ids: list[str], states: tuple[str, ...]) -> list[dict] | None:
    """The jobs' statuses once every one is in one of `states`, else None."""
    statuses = [job(service, i) for i in ids]
    return statuses if all(s["state"] in states for s in statuses) else None


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_serve_runs_two_replicas(service):
    assert service.backend.replica_states() == {"base": {"RUNNING": 2}}
    assert service.app.ctx.backend.slots(service.pipe) == 2


def test_the_local_ray_listens_on_loopback_only(service):
    """Every listening socket of Ray's processes (and this driver's) is on loopback, except each Serve
    replica's inter-deployment gRPC server: Ray Serve 2.60 binds it to [::]:0 (hard-coded in
    ray/serve/_private/replica.py; docs/scale-out.md says so)."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to list listening sockets")
    pids = ray_processes() | {os.getpid()}
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [(line.split()[3], line) for line in lines if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]
    assert ours  # ss could see them
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    exposed = [line for address, line in ours if not address.startswith(loopback)]
    assert all("ServeRepli" in line for line in exposed) and len(exposed) <= 2, exposed


def test_four_concurrent_requests_equal_the_in_process_pictures(service):
    from gradio_client import Client

    prompt, steps, seeds = "a red cube on a table", 16, (101, 102, 103, 104)
    results: dict[int, tuple[Image.Image, str]] = {}
    seen: set[int] = set()
    most = [0]
    done = threading.Event()

    def watch():  # how many requests the replicas run at once, and which processes
        while not done.is_set():
            running = service.backend.in_flight()
            most[0] = max(most[0], len(running))
            seen.update(s.pid for s in running)
            time.sleep(0.02)

    def ui(seed):
        client = Client(service.url, verbose=False)
        gallery, info, _, status = client.predict(prompt=prompt, steps=steps, guidance_scale=7, seed=seed,
                                                  sampler="Euler a", api_name="/txt2img", **SIZE)
        assert status.startswith("Done: 1 image"), status
        results[seed] = (Image.open(gallery[0]["image"]), info)

    def api(seed):
        r = requests.post(f"{service.url}/sdapi/v1/txt2img", timeout=300,
                          json={"prompt": prompt, "steps": steps, "cfg_scale": 7, "seed": seed, "sampler_name": "Euler a", **SIZE})
        assert r.status_code == 200, r.text
        image = decode(r.json()["images"][0])
        results[seed] = (image, image.info["parameters"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=f, args=(s,)) for f, s in zip((ui, api, ui, api), seeds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    watcher.join()
    assert sorted(results) == list(seeds)
    assert most[0] == 2 and len(seen) == 2  # both replicas worked at the same time
    for seed in seeds:
        want = service.pipe.txt2img(prompt, steps=steps, guidance_scale=7.0, seed=seed, sampler="Euler a", **SIZE)
        image, info = results[seed]
        assert np.array_equal(pixels(image), pixels(want.images[0])), f"seed {seed} differs from in-process"
        assert info == want.infotexts[0]


def test_one_queue_over_both_replicas_and_stop_frees_a_replica(service):
    ids = [submit(service, prompt="long", steps=1000, seed=s) for s in (1, 2, 3)]
    wait_for(lambda: all(job(service, i)["step"] >= 2 for i in ids[:2]), 120, "two jobs running")
    positions = [job(service, i)["queue_position"] for i in ids]
    assert positions == [0, 0, 1]  # two run (one per replica), the third waits in the one line
    assert job(service, ids[0])["preview"] is not None  # live previews come back from the replica
    for i in ids:
        assert requests.delete(f"{service.url}/api/v1/jobs/{i}", timeout=10).status_code == 200
    states = wait_for(lambda: ended(service, ids, ("cancelled",)), 30, "all three cancelled")
    assert all(s["step"] < 100 for s in states)
    # Both replicas are free again at once (not after the ~1000 steps the stopped runs had left).
    started = time.monotonic()
    short = [submit(service, prompt="short", steps=4, seed=s) for s in (4, 5)]
    wait_for(lambda: all(job(service, i)["state"] == "done" for i in short), 60, "short jobs after Stop")
    assert time.monotonic() - started < 60


def test_a_replica_killed_mid_request_fails_that_request_and_the_service_recovers(service):
    ids = [submit(service, prompt="victim?", steps=300, seed=s) for s in (31, 32, 33)]
    running = wait_for(lambda: (r := service.backend.in_flight()) and len(r) == 2 and r, 120, "two requests on replicas")
    wait_for(lambda: all(job(service, i)["step"] >= 2 for i in ids[:2]), 120, "steps from both replicas")
    os.kill(running[0].pid, signal.SIGKILL)
    final = wait_for(lambda: ended(service, ids, ("done", "failed")), 600, "all three jobs to end")
    failed = [s for s in final if s["state"] == "failed"]
    assert len(failed) == 1, final
    assert "died mid-request" in failed[0]["error"] and f"pid {running[0].pid}" in failed[0]["error"]
    assert sum(s["state"] == "done" for s in final) == 2  # the other running one and the waiting one
    wait_for(lambda: service.backend.replica_states() == {"base": {"RUNNING": 2}}, 300, "Serve to replace the replica")
    r = requests.post(f"{service.url}/sdapi/v1/txt2img", json={"prompt": "after", "steps": 3, "seed": 5, **SIZE}, timeout=300)
    assert r.status_code == 200, r.text


def test_the_pages_stop_reaches_the_replica(service):
    from gradio_client import Client

    client = Client(service.url, verbose=False)
    job = client.submit(prompt="long", steps=150, seed=7, width=192, height=192, api_name="/txt2img")  # the UI's most steps
    queues = service.app.ctx.queues
    turn = wait_for(lambda: service.backend.in_flight() and queues.running() and queues.running()[0].step >= 2
                    and queues.running()[0], 120, "the UI's run on a replica")
    job.cancel()  # what the page's Stop does: Gradio closes the handler, ui.streaming sets the cancel flag
    wait_for(lambda: not service.backend.in_flight() and not queues.running(), 60, "the run to stop")
    assert turn.cancel.is_set() and turn.step < turn.total == 150  # stopped, not finished
    started = time.monotonic()
    r = requests.post(f"{service.url}/sdapi/v1/txt2img", json={"prompt": "next", "steps": 4, "seed": 8, **SIZE}, timeout=120)
    assert r.status_code == 200 and time.monotonic() - started < 60
