"""Model switching on the Ray backend: a replica loads what a request needs, and requests for a model go to
the replica that has it. Two CPU replicas on a local loopback Ray, a tiny models folder
(tests/models_folder.py): a LoRA tag, then a switch to another checkpoint with another VAE, each equal to
the same request in process. Slow (`pytest -m slow`)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import models_folder
from scaleout.config import keep_local_ray_on_loopback
from test_scaleout_ray import ray_processes

pytestmark = pytest.mark.slow
keep_local_ray_on_loopback()  # before Ray is imported
pytest.importorskip("ray", reason="the Ray backend needs requirements-ray.txt")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    import ldm
    from scaleout.backend import RayBackend
    from scaleout.config import ScaleOut
    from scaleout.replica import LoadSettings
    from ui import state

    before = ray_processes()
    root = models_folder.build(tmp_path_factory.mktemp("models"))
    load = models_folder.loader(root)
    first = load("alpha")
    backend = RayBackend(ScaleOut(replicas=2, cpus_per_replica=1),
                         LoadSettings("cpu", "float32", ldm.Options(), str(root)), {"base": first})
    try:
        yield state.Context(state.Pipes(first), state.Options(outputs=None, preview_every=0, backend=backend,
                                                              model_loader=load, model_spec="alpha"))
    finally:
        backend.close()
        deadline = time.monotonic() + 60
        while (left := ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, f"Ray processes left running: {left}"


def generate(ctx, prompt: str, seed: int) -> np.ndarray:
    from ui import streaming, tasks

    out = streaming.run(tasks.txt2img(ctx, prompt, steps=3, width=32, height=32, seed=seed))
    image = out.images[0]
    return np.asarray((Image.open(image) if isinstance(image, str) else image).convert("RGB"))


def served_by(ctx, prompt: str, seed: int) -> int:
    """The pid of the replica that ran this request."""
    pids: set[int] = set()
    worker = threading.Thread(target=generate, args=(ctx, prompt, seed))
    worker.start()
    while worker.is_alive():
        pids.update(s.pid for s in ctx.backend.in_flight())
        time.sleep(0.005)
    assert len(pids) == 1, pids
    return pids.pop()


def in_process(ctx, prompt: str, seed: int) -> np.ndarray:
    return np.asarray(ctx.pipes.base.txt2img(prompt, steps=3, width=32, height=32, seed=seed).images[0].convert("RGB"))


def test_a_replica_loads_the_model_lora_and_vae_a_request_needs(ctx):
    from ui import models

    plain = generate(ctx, "a red cube", 1)
    assert np.array_equal(plain, in_process(ctx, "a red cube", 1))
    styled = generate(ctx, "a red cube <lora:style:1>", 1)  # merged on the replica, as in process
    assert np.array_equal(styled, in_process(ctx, "a red cube <lora:style:1>", 1)) and not np.array_equal(styled, plain)

    assert models.switch_model(ctx, "beta", "other-vae") == "Serving beta, VAE other-vae."
    started = time.monotonic()
    switched = generate(ctx, "a red cube", 1)  # the replica loads beta + other-vae for this request
    first = time.monotonic() - started
    assert np.array_equal(switched, in_process(ctx, "a red cube", 1)) and not np.array_equal(switched, plain)
    started = time.monotonic()
    assert np.array_equal(generate(ctx, "a red cube", 2), in_process(ctx, "a red cube", 2))
    print(f"first request after the switch {first:.2f} s (replica loads the model), next {time.monotonic() - started:.2f} s")


def test_requests_for_a_model_go_to_the_replica_that_has_it(ctx):
    from ui import models

    models.switch_model(ctx, "alpha", "Automatic")
    models.switch_model(ctx, "beta", "Automatic")  # a model no replica has yet (max_loaded_models 1)
    loader = served_by(ctx, "a cube", 3)
    time.sleep(2)  # the replica reports its models to Serve's routers about once a second
    assert {served_by(ctx, "a cube", seed) for seed in range(4, 10)} == {loader}  # by chance: 1 in 64
