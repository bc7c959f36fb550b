"""The Ray backend's cost and gain on this machine: `python -m ldm_tools.bench.scaleout`.

Starts app.py as a real server (in process, Ray with 1 replica, Ray with 2 replicas; --cpus-per-replica 1,
loopback) and measures: start-up (process start -> the REST API answers), memory (RSS of the app process
and every process under it: Ray's GCS, raylet, workers and replicas; shared pages counted in each process,
so the sum overstates), throughput (N requests sent at once on the demo model, requests per minute) and
the per-request overhead of going through Ray (one request at a time, alternating between an in-process
server and a 1-replica Ray server, median of the differences).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import torch

from .controlnet_cost import cpu_flags
from .measure import cpu_model, load_average

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, outputs: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--no-save",
                                      "--outputs", str(outputs), "--models-dir", str(outputs / "models"), *flags],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py {' '.join(flags)} exited with {self.proc.returncode}")
            try:
                if requests.get(f"{self.url}/sdapi/v1/options", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.startup = time.monotonic() - started

    def rss_mb(self) -> float:
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20

    def txt2img(self, seed: int, steps: int) -> float:
        started = time.monotonic()
        r = requests.post(f"{self.url}/sdapi/v1/txt2img", timeout=600,
                          json={"prompt": "a red cube", "steps": steps, "seed": seed, "width": 64, "height": 64,
                                "sampler_name": "Euler a", "send_images": True})
        r.raise_for_status()
        return time.monotonic() - started

    def burst(self, n: int, steps: int) -> float:
        """N requests at once; requests per minute until the last one is back."""
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda s: self.txt2img(s, steps), range(n)))
        return n / (time.monotonic() - started) * 60

    def close(self) -> None:
        self.proc.send_signal(2)  # SIGINT, as docker stop: the app closes Serve and Ray
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="bursts per configuration, alternating between them")
    p.add_argument("--overhead-runs", type=int, default=6)
    p.add_argument("--outputs", default="/tmp/ldm-bench-scaleout")
    a = p.parse_args(argv)
    out = Path(a.outputs)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; flags: {cpu_flags()}; torch {torch.__version__} capability "
          f"{torch.backends.cpu.get_cpu_capability()}; load average {load_average()} (shared, loaded machine)")
    print(f"demo model, 64x64, {a.steps} steps, Euler a; bursts of {a.requests} requests sent at once, {a.rounds} rounds "
          f"alternating between the servers (all running); in process uses torch's default threads "
          f"({torch.get_num_threads()}) or 1; each replica 1 CPU (Ray sets 1 thread)\n")
    one = {"OMP_NUM_THREADS": "1"}  # what Ray gives a 1-CPU replica
    ray1 = ("--backend", "ray", "--replicas", "1", "--cpus-per-replica", "1")
    configs = {"in process": ((), None), "in process, 1 thread": ((), one), "ray, 1 replica": (ray1, None),
               "ray, 2 replicas": (("--backend", "ray", "--replicas", "2", "--cpus-per-replica", "1"), None)}
    servers: dict[str, Server] = {}
    try:
        for name, (flags, env) in configs.items():  # one at a time, so start-up times do not overlap
            server = servers[name] = Server(*flags, outputs=out, env=env)
            server.txt2img(0, 2)  # warm-up (first-request costs: preview colours, routing)
            print(f"{name:20s} start-up {server.startup:6.1f} s   RSS {server.rss_mb():7.0f} MB (app + its Ray processes)",
                  flush=True)
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for r in range(a.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                rates[name].append(servers[name].burst(a.requests, a.steps))
        base = statistics.median(rates["in process, 1 thread"])
        print()
        for name, got in rates.items():
            rate = statistics.median(got)
            print(f"{name:20s} {rate:6.1f} requests/min (median of {', '.join(f'{x:.1f}' for x in got)})  "
                  f"x{rate / base:.2f} vs in process on 1 thread", flush=True)
        # Overhead: one request at a time, alternating; both compute on one thread.
        inproc, ray = servers["in process, 1 thread"], servers["ray, 1 replica"]
        diffs, times = [], {"in process": [], "ray": []}
        for i in range(a.overhead_runs):
            pair = [(inproc, "in process"), (ray, "ray")]
            if i % 2:
                pair.reverse()
            got = {label: s.txt2img(i, a.steps) for s, label in pair}
            for label, t in got.items():
                times[label].append(t)
            diffs.append(got["ray"] - got["in process"])
        print(f"\none request at a time ({a.overhead_runs} alternating runs, median): in process "
              f"{statistics.median(times['in process']):.2f} s, ray {statistics.median(times['ray']):.2f} s, "
              f"overhead {statistics.median(diffs) * 1000:+.0f} ms per request")
    finally:
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    main()
