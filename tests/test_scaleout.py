"""Scale-out without starting Ray: the --backend ray flags and their checks, the backend seam the
handlers go through, and the shared queue running several turns at once (one per replica).
The Ray Serve tests themselves are in tests/test_scaleout_ray.py (marked slow)."""
from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from scaleout.config import ScaleOut, parse_autoscale
from ui import state, streaming, tasks
from ui.backend import Call, InProcess
from ui.sdapi import convert as api_convert
from ui.sdapi.models import Txt2ImgRequest
from ui.turns import ModelQueue, QueueFull, Queues, Turn

ROOT = Path(__file__).resolve().parents[1]


def scale(*flags: str):
    return app.scale_out(app.parse_args(list(flags)))


# ---- flags -------------------------------------------------------------------------------------


def test_in_process_is_the_default_and_needs_no_ray_flags():
    assert scale() is None


def test_ray_defaults_fit_a_small_cpu_box():
    s = scale("--backend", "ray", "--replicas", "2")
    assert s == ScaleOut(replicas=2, cpus_per_replica=1.0)
    assert s.local_cpus() == 2  # the local Ray instance is bounded by what the replicas take
    opts = s.serve_options(gpus=0.0)
    assert opts == {"max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0}, "num_replicas": 2}


def test_autoscale_flags_become_serves_autoscaling_config():
    s = scale("--backend", "ray", "--autoscale", "1:4", "--cpus-per-replica", "0.5", "--gpus-per-replica", "1",
              "--ray-address", "ray://head:10001")
    assert (s.autoscale, s.max_replicas, s.gpus_per_replica, s.address) == ((1, 4), 4, 1.0, "ray://head:10001")
    opts = s.serve_options(gpus=1.0)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 1}
    assert "num_replicas" not in opts and opts["max_ongoing_requests"] == 1


@pytest.mark.parametrize("flags, message", [
    (("--backend", "ray", "--replicas", "2", "--autoscale", "1:3"), "--replicas and --autoscale exclude each other"),
    (("--backend", "ray", "--replicas", "0"), "--replicas must be at least 1, got 0"),
    (("--backend", "ray", "--autoscale", "3:1"), "needs 0 <= MIN <= MAX"),
    (("--backend", "ray", "--autoscale", "0:0"), "MAX >= 1"),
    (("--backend", "ray", "--autoscale", "4"), "--autoscale takes MIN:MAX replicas, e.g. 1:4; got '4'"),
    (("--backend", "ray", "--cpus-per-replica", "0"), "--cpus-per-replica must be a positive number"),
    (("--backend", "ray", "--gpus-per-replica", "-1"), "--gpus-per-replica must be 0 or more"),
    (("--backend", "ray", "--ray-address", "http://head:8265"), "--ray-address must be auto, ray://HOST:PORT"),
    (("--replicas", "2"), "--replicas only apply with --backend ray"),
    (("--autoscale", "1:2", "--ray-address", "auto"), "--autoscale, --ray-address only apply with --backend ray"),
])
def test_bad_flags_exit_with_a_clear_message(flags, message):
    with pytest.raises(SystemExit) as exc:
        scale(*flags)
    assert message in str(exc.value) and str(exc.value).startswith("error: ")


def test_autoscale_parsing():
    assert parse_autoscale(" 0 : 3 ") == (0, 3)
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_autoscale("1-3")


def test_unknown_backend_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--backend", "dask"])
    assert "invalid choice: 'dask'" in capsys.readouterr().err


# ---- the default install does not need Ray -----------------------------------------------------


def test_the_app_and_ui_import_without_ray():
    code = ("import sys; import app, ui.layout, ui.sdapi, scaleout.config; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_the_library_never_imports_ray_or_the_scaleout_package():
    for path in (ROOT / "ldm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not {n.split(".")[0] for n in names} & {"ray", "scaleout"}, f"{path} imports {names}"


# ---- the backend seam --------------------------------------------------------------------------


class Recording(InProcess):
    """In process, but remembers every Call: proves the handlers go through ctx.backend."""

    def __init__(self):
        self.calls: list[Call] = []

    def run(self, pipe, call, callback):
        self.calls.append(call)
        return super().run(pipe, call, callback)


def test_ui_handlers_send_their_call_through_the_backend(base_pipe, tmp_path):
    backend = Recording()
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=None, preview_every=0, backend=backend))
    out = streaming.run(tasks.txt2img(ctx, "a red cube", steps=3, width=32, height=32, seed=5, batch_count=2))
    assert [(c.task, c.args, c.kwargs["seed"], c.kwargs["steps"]) for c in backend.calls] == \
        [("txt2img", ("a red cube",), 5, 3), ("txt2img", ("a red cube",), 6, 3)]
    direct = base_pipe.txt2img("a red cube", steps=3, width=32, height=32, seed=6)
    second = out.images[1]
    second = Image.open(second).convert("RGB") if isinstance(second, str) else second
    assert np.array_equal(np.asarray(second), np.asarray(direct.images[0]))


def test_api_plans_send_their_call_through_the_backend(base_pipe):
    backend = Recording()
    ctx = state.Context(state.Pipes(base_pipe), state.Options(outputs=None, backend=backend))
    req = Txt2ImgRequest(prompt="a cat", steps=2, width=32, height=32, seed=9)
    plan = api_convert.plan_txt2img(ctx, req, {"CLIP_stop_at_last_layers": 1})
    plan.call(9, None)
    assert [(c.task, c.args, c.kwargs["seed"]) for c in backend.calls] == [("txt2img", ("a cat",), 9)]


def test_a_call_names_a_pipeline_task():
    with pytest.raises(ValueError, match="unknown task 'txt2video'; choose one of: txt2img, img2img"):
        Call("txt2video").validate()
    with pytest.raises(ValueError, match="callback is the backend's"):
        Call("txt2img", kwargs={"callback": print}).validate()


# ---- one queue, several slots --------------------------------------------------------------------


def test_a_queue_with_two_slots_runs_two_turns_and_keeps_one_line():
    queue = ModelQueue(max_waiting=2, slots=lambda: 2)
    a, b = queue.join(Turn("api")), queue.join(Turn("ui"))
    assert queue.wait(a) and queue.wait(b)  # both run at once
    assert queue.position(a) == queue.position(b) == 0 and queue.running is a
    c, d = queue.join(Turn("api")), queue.join(Turn("ui"))
    with pytest.raises(QueueFull):  # the size limit covers the whole service
        queue.join(Turn("api"))
    assert (queue.position(c), queue.position(d)) == (1, 2)
    started = threading.Event()
    waiter = threading.Thread(target=lambda: queue.wait(c) and started.set())
    waiter.start()
    assert not started.wait(0.5)  # both slots taken: c waits
    queue.leave(a)
    assert started.wait(5) and queue.position(c) == 0 and queue.position(d) == 1
    waiter.join()


def test_queues_take_their_slots_from_the_backend():
    pipe = object()
    queues = Queues(4, slots=lambda p: 3 if p is pipe else 1)
    turns = [queues.join(pipe, Turn("api")) for _ in range(4)]
    assert all(queues.wait(pipe, t) for t in turns[:3])
    assert len(queues.running()) == 3 and queues.job_count() == 4
    assert queues.interrupt() == 3 and all(t.cancel.is_set() for t in turns[:3]) and not turns[3].cancel.is_set()
    assert not queues.forget(pipe)


# ---- the replicas as their own Serve application (KubeRay RayService) --------------------------


def test_service_builder_makes_the_replicas_application():
    serve = pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")
    from scaleout import service

    app = service.build({"model": "/models/sd15", "kind": "base", "replicas": "2", "gpus_per_replica": "0"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="needs model=PATH"):
        service.build({"kind": "base"})
    with pytest.raises(ValueError, match="kind must be base, inpaint or upscale"):
        service.build({"model": "/m", "kind": "refiner"})
    with pytest.raises(ValueError, match="exclude each other"):
        service.build({"model": "/m", "replicas": "2", "autoscale": "1:2"})


def test_autoscale_flag_reaches_the_serve_deployment(base_pipe, monkeypatch):
    """app.py --backend ray --autoscale 1:4 deploys the model's replicas with Serve's autoscaler between 1 and 4,
    one request per replica, and lets 4 requests run at once. Ray is stubbed where it would start a cluster
    (init, serve.start, serve.run); the deployment is read back through Ray's own schema."""
    pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")
    import ray
    from ray import serve
    from ray.serve.deployment import Deployment, deployment_to_schema

    deployed = {}
    real_bind = Deployment.bind

    def bind(self, *args, **kwargs):
        deployed[self.name] = self
        return real_bind(self, *args, **kwargs)

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # start_backend sets it; restored after
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda application, name, route_prefix: f"handle of {name}")
    monkeypatch.setattr(Deployment, "bind", bind)
    args = app.parse_args(["--backend", "ray", "--autoscale", "1:4", "--gpus-per-replica", "0"])
    backend = app.start_backend(args, app.scale_out(args), None, state.Pipes(base_pipe))
    assert backend.handles == {"base": "handle of ldm-base"} and list(deployed) == ["base"]
    schema = deployment_to_schema(deployed["base"])
    scaling = schema.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 1)
    assert scaling.target_ongoing_requests == 1 and schema.max_ongoing_requests == 1
    assert "num_replicas" not in schema.model_dump(exclude_unset=True)  # the autoscaler decides the count
    assert backend.slots(base_pipe) == 4
    assert backend.describe().startswith("Ray Serve, autoscaled 1-4 replica(s) per model kind")


def test_local_ray_is_sized_for_every_deployment_and_a_shortfall_names_the_numbers():
    s = ScaleOut(replicas=2, cpus_per_replica=1.0)
    assert (s.local_cpus(), s.local_cpus(3)) == (2, 6)  # base, inpaint and upscale each deploy 2 replicas
    assert ScaleOut(autoscale=(1, 4), cpus_per_replica=0.5).local_cpus(3) == 6  # every deployment at its MAX
    assert s.shortfall(["base", "inpaint", "upscale"], cpus=6, gpus=0, gpus_per_replica=0) is None
    assert s.shortfall(["base", "inpaint", "upscale"], cpus=2, gpus=0, gpus_per_replica=0) == \
        "3 deployment(s) (base, inpaint, upscale) x 2 replica(s) x 1 CPU(s) = 6 CPUs, the cluster has 2"
    assert ScaleOut(autoscale=(0, 3)).shortfall(["base"], cpus=8, gpus=2, gpus_per_replica=1) == \
        "1 deployment(s) (base) x 3 replica(s) (--autoscale's MAX) x 1 GPU(s) = 3 GPUs, the cluster has 2"


@pytest.fixture
def stub_ray(monkeypatch):
    """Ray stubbed where it would start or ask a cluster: what ray.init got, which applications serve.run got,
    and the cluster's resources (`resources`) as the test sets them."""
    pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")
    import ray
    from ray import serve

    seen = {"init": None, "run": [], "resources": {"CPU": 0.0}}
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # start_backend sets it; restored after
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.__setitem__("init", kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(seen["resources"]))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "status", lambda: type("Status", (), {"applications": {}})())
    monkeypatch.setattr(serve, "run", lambda application, name, route_prefix: seen["run"].append(name) or name)
    return seen


def test_local_ray_gets_cpus_for_every_deployment(base_pipe, stub_ray):
    """Two models on the app's own Ray: it is started with both deployments' CPUs (sized for one, Serve waited
    forever for the second deployment's replicas) and both are deployed."""
    args = app.parse_args(["--backend", "ray", "--replicas", "2", "--gpus-per-replica", "0"])
    backend = app.start_backend(args, app.scale_out(args), None, state.Pipes(base_pipe, inpaint=base_pipe))
    assert stub_ray["init"]["num_cpus"] == 4 and stub_ray["run"] == ["ldm-base", "ldm-inpaint"]
    assert backend.slots(base_pipe) == 2


def test_replicas_the_local_ray_cannot_place_are_a_start_up_error_before_deploying(base_pipe, stub_ray):
    stub_ray["resources"] = {"CPU": 4.0, "GPU": 1.0}  # one GPU on this machine, as Ray finds it
    args = app.parse_args(["--backend", "ray", "--replicas", "2", "--gpus-per-replica", "1"])
    with pytest.raises(SystemExit) as exc:
        app.start_backend(args, app.scale_out(args), None, state.Pipes(base_pipe, inpaint=base_pipe))
    message = str(exc.value)
    assert message.startswith("error: --backend ray: the local Ray instance cannot place every replica")
    assert "2 deployment(s) (base, inpaint) x 2 replica(s) x 1 GPU(s) = 4 GPUs, the cluster has 1" in message
    assert all(flag in message for flag in ("--replicas", "--gpus-per-replica", "--inpaint-model", "--ray-address"))
    assert stub_ray["run"] == []  # refused before deploying anything (serve.run would have waited forever)


def test_a_joined_cluster_too_small_now_is_a_warning_not_an_error(base_pipe, stub_ray, caplog):
    """A cluster we join may autoscale: the shortfall is logged and the deployments go ahead."""
    stub_ray["resources"] = {"CPU": 2.0}
    args = app.parse_args(["--backend", "ray", "--replicas", "2", "--gpus-per-replica", "0", "--ray-address", "auto"])
    with caplog.at_level("WARNING", logger="scaleout.backend"):
        app.start_backend(args, app.scale_out(args), None, state.Pipes(base_pipe, inpaint=base_pipe))
    assert stub_ray["run"] == ["ldm-base", "ldm-inpaint"] and "num_cpus" not in stub_ray["init"]
    assert "cannot place every replica now (2 deployment(s) (base, inpaint) x 2 replica(s) x 1 CPU(s) = 4 CPUs, " \
           "the cluster has 2)" in caplog.text


def test_ray_refuses_loaded_models_as_arguments_with_a_clear_message():
    from scaleout.backend import refuse_loaded_models

    refuse_loaded_models(Call("txt2img", ("a cat",), {"seed": 1}))
    with pytest.raises(ValueError, match="ControlNet units are not available with --backend ray"):
        refuse_loaded_models(Call("txt2img", ("a cat",), {"control": [object()]}))
    with pytest.raises(ValueError, match="refiner is not available with --backend ray"):
        refuse_loaded_models(Call("txt2img", ("a cat",), {"refiner": object()}))
