"""`--autoscale 1:2` for real: Serve accepts the autoscaling config, starts with one replica, lets the
front end send two requests at once (its queue has MAX slots), and adds the second replica while the
requests wait. Local loopback Ray with 2 CPUs, the demo model. Slow (`pytest -m slow`)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from scaleout.config import keep_local_ray_on_loopback
from test_scaleout_ray import ray_processes

pytestmark = pytest.mark.slow
keep_local_ray_on_loopback()  # before Ray is imported
pytest.importorskip("ray", reason="the Ray backend needs requirements-ray.txt")

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"


def test_autoscale_starts_at_min_and_scales_up_under_load():
    import ldm
    from scaleout.backend import RayBackend
    from scaleout.config import ScaleOut
    from scaleout.replica import LoadSettings
    from ui.backend import Call

    before = ray_processes()
    pipe = ldm.load(DEMO, device="cpu")
    backend = RayBackend(ScaleOut(autoscale=(1, 2), cpus_per_replica=1), LoadSettings(None, None, ldm.Options(), None),
                         {"base": pipe})
    stop = threading.Event()
    try:
        assert backend.replica_states() == {"base": {"RUNNING": 1}} and backend.slots(pipe) == 2
        outcomes: list[str] = []

        def long_run(seed: int):
            try:
                backend.run(pipe, Call("txt2img", ("long",), {"seed": seed, "steps": 1000, "width": 64, "height": 64}),
                            lambda step, total, latents: stop.is_set())
                outcomes.append("done")
            except ldm.Cancelled:
                outcomes.append("stopped")

        runs = [threading.Thread(target=long_run, args=(s,)) for s in (1, 2)]
        for t in runs:
            t.start()
        deadline = time.monotonic() + 240
        while backend.replica_states()["base"].get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, f"no second replica after 240 s: {backend.replica_states()}"
            time.sleep(1)
        # Both requests end up running, one per replica.
        while len(backend.in_flight()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len({s.pid for s in backend.in_flight()}) == 2
        stop.set()
        for t in runs:
            t.join(60)
        assert outcomes == ["stopped", "stopped"]
    finally:
        stop.set()
        backend.close()
        deadline = time.monotonic() + 60
        while (left := ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, f"Ray processes left running: {left}"
