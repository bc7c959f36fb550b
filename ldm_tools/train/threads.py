"""Adapt torch's intra-op thread count to CPU contention from other processes.

On a 2-core machine shared with other jobs, a 2-thread torch step becomes many
times slower as soon as another process takes one core (the threads wait for
each other at every parallel region).  ``ThreadGovernor`` samples how many
cores the *other* processes used over the last few seconds (``/proc/stat``
minus this process's own ticks) and switches between ``max_threads`` and 1.
"""

from __future__ import annotations

import os
import time

import torch


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def _self_ticks() -> int:
    with open("/proc/self/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


class ThreadGovernor:
    def __init__(self, max_threads: int = 2, interval: float = 3.0, high: float = 0.5, low: float = 0.2):
        # OMP_NUM_THREADS caps it: a job that shares the heavy-job lock asks for 1 thread this way, and
        # torch.set_num_threads below would otherwise override the variable
        cap = os.environ.get("OMP_NUM_THREADS", "")
        self.max_threads = min(max_threads, int(cap)) if cap.isdigit() and int(cap) > 0 else max_threads
        self.interval = interval
        self.high, self.low = high, low
        self.enabled = os.path.exists("/proc/stat") and self.max_threads > 1
        self.hz = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self.threads = self.max_threads
        torch.set_num_threads(self.max_threads)
        self._t = time.monotonic()
        self._busy = _busy_ticks() if self.enabled else 0
        self._self = _self_ticks() if self.enabled else 0
        self.others = 0.0

    def update(self) -> int:
        if not self.enabled:
            return self.threads
        now = time.monotonic()
        if now - self._t < self.interval:
            return self.threads
        busy, mine = _busy_ticks(), _self_ticks()
        self.others = max(0.0, ((busy - self._busy) - (mine - self._self)) / self.hz / (now - self._t))
        self._t, self._busy, self._self = now, busy, mine
        want = self.threads
        if self.others > self.high:
            want = 1
        elif self.others < self.low:
            want = self.max_threads
        if want != self.threads:
            self.threads = want
            torch.set_num_threads(want)
        return self.threads
