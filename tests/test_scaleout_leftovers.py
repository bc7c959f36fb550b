"""scaleout.leftovers: the local Ray's processes that outlive ray.shutdown() are stopped with the app, and
only Ray's (the app's other children are not ours to stop)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="the Ray backend needs requirements-ray.txt")
psutil = pytest.importorskip("psutil")

from scaleout import leftovers  # noqa: E402

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
DEAF = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"]


def test_only_ray_processes_are_collected():
    fake = subprocess.Popen(["bash", "-c", 'exec -a "ray::IDLE" sleep 600'])
    other = subprocess.Popen(SLEEP)
    try:
        time.sleep(0.5)
        pids = {p.pid for p in leftovers.ray_descendants()}
        assert fake.pid in pids and other.pid not in pids
    finally:
        for p in (fake, other):
            p.kill()
            p.wait()


def test_what_outlives_the_grace_is_terminated_then_killed():
    polite = subprocess.Popen(SLEEP)
    deaf = subprocess.Popen(DEAF, stdout=subprocess.PIPE, text=True)
    assert deaf.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    try:
        procs = [psutil.Process(polite.pid), psutil.Process(deaf.pid)]
        left = leftovers.stop(procs, grace=0.5)
        assert sorted(p.pid for p in left) == sorted([polite.pid, deaf.pid])
        # SIGTERM ended one; the other ignores it, so only the SIGKILL after it can have ended it
        assert leftovers.running(procs) == []
    finally:
        for p in (polite, deaf):
            if p.poll() is None:
                p.kill()


def test_exited_and_zombie_processes_count_as_gone():
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(quick.pid)
    deadline = time.monotonic() + 30
    while proc.status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped by us, its parent
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert leftovers.running([proc]) == []
    assert leftovers.stop([proc], grace=0.1) == []
    quick.wait()
