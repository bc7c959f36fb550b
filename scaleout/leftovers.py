"""The local Ray's processes that outlive `ray.shutdown()`, stopped with the app.

`ray.shutdown()` stops the processes the driver started (GCS, raylet, ...). The raylet's own children (the
dashboard agent, the runtime-env agent) are meant to notice their parent's death and exit, and may not if
they outlive it busy. So the backend records its Ray descendants while they are still its descendants
(`RayBackend.record_ray_processes`) and ends whatever is left after a grace period. Zombies (exited, waiting
for an init that does not reap them) count as gone: they hold nothing but a process-table entry.
(The leftovers three CI rehearsals saw came from an app that never shut down: started from a background
shell, it had SIGINT ignored, so Ctrl+C did nothing and the test killed it; tests/test_scaleout_app.py now
starts it with a terminal's SIGINT.)
"""
from __future__ import annotations

import logging
import os

import psutil
import ray

log = logging.getLogger(__name__)


RAY_DIR = os.path.dirname(ray.__file__)
RAY_BINARIES = ("raylet", "gcs_server")


def ray_descendants() -> list[psutil.Process]:
    """The Ray processes below this one, now (before `ray.shutdown()` orphans the raylet's children). Only
    Ray's: the process may have other children (a test's browser, say) that are not ours to stop."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            name = p.name()
        except psutil.Error:
            continue
        if name in RAY_BINARIES or cmd.startswith("ray::") or RAY_DIR in cmd:
            found.append(p)
    return found


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (a zombie has exited; a reused pid is another process)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop(procs: list[psutil.Process], grace: float = 10.0) -> list[psutil.Process]:
    """Wait up to `grace` seconds for `procs` to exit, then terminate what is left, then kill it; returns the
    processes that were still running after the grace period."""
    left = running(psutil.wait_procs(running(procs), timeout=grace)[1])
    for p in left:
        log.warning("stopping a Ray process left after shutdown: pid %d (%s)", p.pid, _name(p))
        _signal(p, "terminate")
    still = running(psutil.wait_procs(left, timeout=5)[1])
    for p in still:
        _signal(p, "kill")
    psutil.wait_procs(still, timeout=5)
    return left


def _signal(p: psutil.Process, how: str) -> None:
    try:
        getattr(p, how)()
    except psutil.NoSuchProcess:
        pass


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"
