"""`RayBackend`: the front end's side of `--backend ray`.

Start-up: start a local Ray instance (bounded: every deployment's replicas' CPUs, no dashboard, node on
127.0.0.1) or join a cluster (`address`), start Serve without its HTTP proxy (the Gradio front end is the
only entry), and run one Serve application per model kind that has a model (base, inpaint, upscale), each a
`scaleout.replica.Generator` deployment with `max_ongoing_requests=1`. `serve.run` returns when every
replica has loaded its model, and waits forever for one the cluster cannot place: `check_placement` refuses
that first on our own Ray, and warns on a joined cluster (which may grow).

A run: the Call goes to the kind's deployment as a streaming request with the model's multiplexed id;
each `Progress` is handed to the step callback (progress, previews); when it says stop, the stream is
cancelled, which makes the replica's run stop at its next step, and ldm.Cancelled is raised here.
A replica that dies mid-request (killed, out of memory) fails that request with `ReplicaDied` (no
retry: a retry could run minutes of work twice and hide a replica that keeps dying); a request whose
replica died before it started there is sent once more. Serve starts a replacement, and the other
requests run on the remaining replicas meanwhile.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError

import ldm
from ldm.denoise import StepCallback
from ui.backend import Backend, Call, ReplicaDied

from . import leftovers
from .config import LOCAL_OBJECT_STORE_BYTES, PlacementError, ScaleOut, machine_cpus
from .replica import Done, Failed, Generator, LoadSettings, Progress, Started, model_id
from .service import APP_PREFIX

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def refuse_loaded_models(call: Call) -> None:
    """Loaded models given as arguments do not travel to a replica (it would have to load them by name)."""
    if call.kwargs.get("control"):
        raise ValueError("ControlNet units are not available with --backend ray yet (run without --backend ray)")
    if call.kwargs.get("refiner") is not None:
        raise ValueError("the SDXL refiner is not available with --backend ray yet (run without --backend ray)")


class RayBackend(Backend):
    name = "ray"

    def __init__(self, config: ScaleOut, settings: LoadSettings, pipes: dict[str, Any], max_models: int = 1):
        """pipes: model kind ("base", "inpaint", "upscale") -> the front end's pipeline of that kind."""
        self.config = config.validate()
        self.started_ray = False
        self.apps: list[str] = []
        self.handles: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.serving: dict[int, Started] = {}  # request number -> the replica process running it
        # our own Ray's processes, recorded while they are still our descendants: Ray's own exit hook may shut
        # it down before `close` runs, which orphans the raylet's agents (scaleout.leftovers)
        self.ray_processes: list = []
        self.numbers = iter(range(1, 1 << 62))
        kinds = [kind for kind, pipe in pipes.items() if pipe is not None]
        self.start_ray(len(kinds))
        try:
            gpus = self.gpus()
            options = config.serve_options(gpus)
            elsewhere = {kind for kind in kinds if self.running_elsewhere(APP_PREFIX + kind)}
            self.check_placement([kind for kind in kinds if kind not in elsewhere], gpus)
            for kind, pipe in pipes.items():
                if pipe is None:
                    continue
                app = APP_PREFIX + kind
                if kind in elsewhere:  # e.g. a KubeRay RayService's (scaleout.service): use it, keep it
                    self.handles[kind] = serve.get_app_handle(app)
                    log.info("Ray Serve: using the running application %s", app)
                    continue
                deployment = serve.deployment(Generator, name=kind).options(**options)
                self.handles[kind] = serve.run(deployment.bind(model_id(pipe), settings, max_models), name=app,
                                               route_prefix=None)
                self.apps.append(app)
                log.info("Ray Serve: %s deployment up (%s)", kind, self.describe())
            self.record_ray_processes()
        except BaseException:
            self.close()
            raise

    # ---- Ray and Serve -----------------------------------------------------------------------

    def start_ray(self, deployments: int) -> None:
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}}
        if self.config.address is None:
            cpus = self.config.local_cpus(deployments)
            if cpus > machine_cpus():
                log.warning("the local Ray instance gets %d logical CPUs for its replicas on a machine with %d: "
                            "the replicas share cores", cpus, machine_cpus())
            # "local": always a new instance of our own (never one a `ray start` left on this machine).
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", namespace="ldm",
                     runtime_env=env, log_to_driver=False, configure_logging=False)
            self.started_ray = True
            where = ray.util.get_node_ip_address()
            if where not in ("127.0.0.1", "::1"):
                log.warning("the local Ray instance is on %s, not loopback: Ray was imported before "
                            "scaleout.config.keep_local_ray_on_loopback()", where)
        else:
            ray.init(address=self.config.address, namespace="ldm", runtime_env=env, log_to_driver=False)
        serve.start(proxy_location="Disabled")

    def running_elsewhere(self, app: str) -> bool:
        """An application of that name already runs on the cluster we joined (never on our own local Ray)."""
        if self.started_ray:
            return False
        status = serve.status().applications.get(app)
        return status is not None and str(getattr(status.status, "value", status.status)) == "RUNNING"

    def check_placement(self, kinds: list[str], gpus_per_replica: float) -> None:
        """Before deploying: replicas the cluster cannot place are an error on our own local Ray (it never
        grows; Serve would wait for them forever), a warning on a joined cluster (an autoscaler may add nodes)."""
        if self.started_ray:  # our own instance: the CPUs we gave it; GPUs as Ray found them (asked only if needed)
            cpus = float(self.config.local_cpus(len(kinds)))
            gpus = ray.cluster_resources().get("GPU", 0.0) if gpus_per_replica > 0 else 0.0
        else:
            resources = ray.cluster_resources()
            cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        problem = self.config.shortfall(kinds, cpus, gpus, gpus_per_replica)
        if problem is None:
            return
        if self.started_ray:
            raise PlacementError(
                f"--backend ray: the local Ray instance cannot place every replica ({problem}); Serve would wait for "
                "them forever. Lower --replicas (or --autoscale's MAX), --gpus-per-replica (0: CPU only) or "
                "--cpus-per-replica, load fewer models (--inpaint-model \"\", --upscale-model \"\"), or join a larger "
                "cluster with --ray-address")
        log.warning("Ray cluster %s cannot place every replica now (%s): Serve waits until it can (an autoscaling "
                    "cluster adds nodes; a fixed one never will)", self.config.address, problem)

    def gpus(self) -> float:
        if self.config.gpus_per_replica is not None:
            return self.config.gpus_per_replica
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def describe(self) -> str:
        c = self.config
        count = f"autoscaled {c.autoscale[0]}-{c.autoscale[1]}" if c.autoscale else f"{c.max_replicas}"
        where = f"cluster {c.address}" if c.address else "local Ray on 127.0.0.1"
        return f"Ray Serve, {count} replica(s) per model kind, {where}"

    def replica_states(self) -> dict[str, dict[str, int]]:
        """Model kind -> {replica state: count}, as Serve reports it (RUNNING, STARTING, ...)."""
        status = serve.status()
        out = {}
        for app in (APP_PREFIX + kind for kind in self.handles):
            for name, dep in status.applications[app].deployments.items():
                out[name] = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return out

    def in_flight(self) -> list[Started]:
        """The replica processes running requests now (pid, host)."""
        with self.lock:
            return list(self.serving.values())

    def close(self) -> None:
        """Delete our Serve applications; stop Serve and Ray too if this process started them."""
        if ray.is_initialized():
            self.record_ray_processes()
            try:
                if self.started_ray:
                    serve.shutdown()
                else:
                    for app in self.apps:
                        serve.delete(app)
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.warning("Ray Serve did not shut down cleanly", exc_info=True)
            finally:
                ray.shutdown()
        leftovers.stop(self.ray_processes)
        self.ray_processes = []

    def record_ray_processes(self) -> None:
        """Remember our own Ray's processes (none on a cluster we joined: not ours to stop)."""
        if self.started_ray:
            known = {p.pid for p in self.ray_processes}
            self.ray_processes += [p for p in leftovers.ray_descendants() if p.pid not in known]

    # ---- Backend -------------------------------------------------------------------------------

    def slots(self, pipe: Any) -> int:
        return self.config.max_replicas

    def run(self, pipe: Any, call: Call, callback: StepCallback) -> ldm.Result:
        call.validate()
        refuse_loaded_models(call)
        kind = pipe.components.kind.value
        handle = self.handles.get(kind)
        if handle is None:
            raise ValueError(f"no Ray deployment serves {kind} models (started with: {', '.join(self.handles)})")
        try:
            return self.stream(handle, pipe, call, callback)
        except ReplicaDied as exc:
            if exc.started:
                raise
            log.warning("Ray replica died before the request started on it; sending it again")
            return self.stream(handle, pipe, call, callback)

    def stream(self, handle: Any, pipe: Any, call: Call, callback: StepCallback) -> ldm.Result:
        number = next(self.numbers)
        stream = handle.options(stream=True, multiplexed_model_id=model_id(pipe)).run.remote(call)
        try:
            for message in stream:
                if isinstance(message, Started):
                    with self.lock:
                        self.serving[number] = message
                elif isinstance(message, Progress):
                    if callback(message.step, message.total, message.latents):
                        stream.cancel()  # the replica's run stops at its next step
                        raise ldm.Cancelled("stopped")
                elif isinstance(message, Done):
                    return message.result
                elif isinstance(message, Failed):
                    raise message.error
            raise ReplicaDied("the generation worker ended the request without a result; try again", started=True)
        except RayActorError as exc:
            with self.lock:
                where = self.serving.get(number)
            who = f" (pid {where.pid} on {where.host})" if where else ""
            log.warning("Ray replica died mid-request%s: %s", who, exc)
            raise ReplicaDied(f"the generation worker{who} died mid-request (killed or out of memory); Ray is "
                              "replacing it — run the request again", started=where is not None) from None
        except RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        except RayError as exc:
            raise ReplicaDied(f"the Ray backend failed this request ({type(exc).__name__}): {exc}"[:500], started=True) from None
        finally:
            with self.lock:
                self.serving.pop(number, None)

