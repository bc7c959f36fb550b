"""`python app.py --backend ray --replicas 2` as users start it, on this 2-core box without a GPU: it
starts (replicas take CPUs), serves a request through a replica, and on Ctrl+C (SIGINT, also what `docker stop`
sends: the Dockerfile's STOPSIGNAL) stops every Ray process it started. Slow (`pytest -m slow`)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from scaleout.config import keep_local_ray_on_loopback

pytestmark = pytest.mark.slow
keep_local_ray_on_loopback()  # before Ray is imported
pytest.importorskip("ray", reason="the Ray backend needs requirements-ray.txt")
psutil = pytest.importorskip("psutil")

from scaleout import leftovers  # noqa: E402  (imports ray: after keep_local_ray_on_loopback)
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]


def terminal_ctrl_c() -> None:
    """In the child: SIGINT as in a terminal. A shell running a command in the background (as a CI runner may)
    starts it with SIGINT ignored, and Python then never raises KeyboardInterrupt (how CI rehearsals failed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_app_starts_serves_and_stops_its_ray(tmp_path):
    port = free_port()
    log = (tmp_path / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--backend", "ray", "--replicas", "2", "--port", str(port),
                             "--no-save", "--models-dir", str(tmp_path / "models")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=terminal_ctrl_c)
    tree: list = []
    exited = "still running"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "app.py --backend ray did not start in 10 min"
            time.sleep(0.5)
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree if p.is_running())
        assert names.count("ServeReplica:ldm-base") == 2 and "raylet" in names  # its own local Ray, 2 replicas
        flags = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/cmd-flags", timeout=10).json()
        assert (flags["backend"], flags["replicas"], flags["device"]) == ("ray", 2, "cpu")
        r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=300,
                          json={"prompt": "a red cube", "steps": 3, "seed": 1, "width": 64, "height": 64})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        log_text = (tmp_path / "app.log").read_text()
        assert "Ray Serve, 2 replica(s) per model kind, local Ray on 127.0.0.1" in log_text
    finally:
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            proc.wait(120)
            exited = f"exited with {proc.returncode} {time.monotonic() - t0:.0f} s after SIGINT"
        except subprocess.TimeoutExpired:
            proc.kill()
            exited = "killed: no exit within 120 s of SIGINT"
        gone, alive = psutil.wait_procs(tree, timeout=60)
        alive = leftovers.running(alive)  # a zombie has exited: reaping it is init's job
        for p in alive:
            p.kill()
    assert not alive, (f"Ray processes left after the app stopped ({exited}): {[(p.pid, p.name()) for p in alive]}\n"
                       + (tmp_path / "app.log").read_text()[-3000:])
