"""The Ray backend's flags as one validated object (no Ray import: app.py checks flags before starting)."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

# ray.init's smallest object store is 75 MiB; results are a few PNG-sized images, previews a few KB.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def keep_local_ray_on_loopback() -> None:
    """Call before Ray is imported: a local Ray instance then advertises and listens on 127.0.0.1 only.

    Ray decides its node address at import (ray_constants.ENABLE_RAY_CLUSTER); on Linux it otherwise
    takes the machine's network address even when ray.init is given 127.0.0.1, and its servers listen
    on every interface. The variable's name speaks of Windows/OSX; it is the same switch on Linux. Not
    for joining a cluster (the driver must advertise a reachable address there)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


class PlacementError(ValueError):
    """The cluster cannot place every replica asked for (Serve would wait for them forever)."""


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_autoscale(text: str) -> tuple[int, int]:
    """"MIN:MAX" -> (MIN, MAX), e.g. "1:4"."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {text!r}")
    return int(m[1]), int(m[2])


@dataclass(frozen=True)
class ScaleOut:
    """How many replicas per model kind, where Ray runs, and what each replica takes.

    replicas: a fixed count; autoscale: (min, max) for Serve's autoscaler (exclusive with replicas;
    neither: 1 replica). address: None starts a local Ray instance on 127.0.0.1; "auto" or
    "ray://host:10001" (or a GCS "host:6379") joins a running cluster. gpus_per_replica: None = 1 when
    the cluster has GPUs, else 0 (the replica then takes CPUs only)."""

    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    address: str | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0

    def validate(self) -> "ScaleOut":
        if self.replicas is not None and self.autoscale is not None:
            raise ValueError("--replicas and --autoscale exclude each other: give a fixed count (--replicas N) "
                             "or a range for the autoscaler (--autoscale MIN:MAX)")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if not (math.isfinite(self.cpus_per_replica) and self.cpus_per_replica > 0):
            raise ValueError(f"--cpus-per-replica must be a positive number, got {self.cpus_per_replica}")
        if self.gpus_per_replica is not None and not (math.isfinite(self.gpus_per_replica) and self.gpus_per_replica >= 0):
            raise ValueError(f"--gpus-per-replica must be 0 or more, got {self.gpus_per_replica}")
        if self.address is not None and not (
                self.address == "auto" or self.address.startswith("ray://") or re.fullmatch(r"[\w.\-]+:\d+", self.address)):
            raise ValueError(f"--ray-address must be auto, ray://HOST:PORT (Ray Client, usually 10001) or HOST:PORT "
                             f"(the head's GCS, usually 6379); got {self.address!r}")
        return self

    @property
    def max_replicas(self) -> int:
        """Replicas per deployment at most: how many requests per model the front end lets run at once."""
        if self.autoscale is not None:
            return self.autoscale[1]
        return self.replicas or 1

    def local_cpus(self, deployments: int = 1) -> int:
        """Logical CPUs for a local Ray instance: every replica of every deployment (one per model kind) at
        its largest. Sized for one deployment only, Serve waited forever for the second one's replicas."""
        return max(1, math.ceil(self.cpus_needed(deployments) - 1e-9))

    def cpus_needed(self, deployments: int) -> float:
        return deployments * self.max_replicas * self.cpus_per_replica

    def shortfall(self, kinds: Sequence[str], cpus: float, gpus: float, gpus_per_replica: float) -> str | None:
        """Why a cluster with `cpus` and `gpus` cannot place every replica of the `kinds` deployments, or
        None. Serve does not fail on a replica it cannot place: `serve.run` waits for it forever."""
        counts = f"{len(kinds)} deployment(s) ({', '.join(kinds)}) x {self.max_replicas} replica(s)" + \
            (" (--autoscale's MAX)" if self.autoscale else "")
        missing = []
        if self.cpus_needed(len(kinds)) > cpus + 1e-9:
            missing.append(f"{counts} x {self.cpus_per_replica:g} CPU(s) = {self.cpus_needed(len(kinds)):g} CPUs, "
                           f"the cluster has {cpus:g}")
        need_gpus = len(kinds) * self.max_replicas * gpus_per_replica
        if need_gpus > gpus + 1e-9:
            missing.append(f"{counts} x {gpus_per_replica:g} GPU(s) = {need_gpus:g} GPUs, the cluster has {gpus:g}")
        return "; ".join(missing) or None

    def serve_options(self, gpus: float) -> dict:
        """The Serve deployment options: placement, one request at a time, fixed or autoscaled count."""
        out: dict = {"max_ongoing_requests": 1,
                     "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": gpus}}
        if self.autoscale is not None:
            low, high = self.autoscale
            out["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": 1}
        else:
            out["num_replicas"] = self.replicas or 1
        return out
