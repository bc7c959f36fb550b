"""Checkpoint and VAE switching (ui.models) and the extra-networks panel (ui.networks), at handler level
on a tiny models folder: no server, no browser."""
from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref

import numpy as np
import pytest

import models_folder
from ui import models, networks, state

KW = dict(width=32, height=32, steps=2, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = models_folder.build(tmp_path_factory.mktemp("ui-models") / "models")
    broken = shutil.copytree(root / "Stable-diffusion" / "alpha", root / "Stable-diffusion" / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated: ldm refuses it
    return root


def make_ctx(root, max_loaded=1, calls=None):
    load = models_folder.loader(root)

    def counted(spec):
        if calls is not None:
            calls.append(spec)
        return load(spec)

    pipe = load("alpha")
    manager = models.Models(pipe, loader=counted, spec="alpha", max_loaded=max_loaded)
    return state.Context(state.Pipes(pipe), state.Options(outputs=None), models=manager)


def image(ctx, prompt="a cube"):
    result = ctx.pipes.base.txt2img(prompt, **KW)
    return np.asarray(result.images[0]), result.infotexts[0]


def test_lists_checkpoints_and_vaes_of_the_folder(root):
    ctx = make_ctx(root)
    assert ctx.models.checkpoints() == ["alpha", "beta", "broken"]
    assert ctx.models.vaes() == ["Automatic", "other-vae"]
    assert models.model_choices(ctx) == (["alpha", "beta", "broken"], "alpha", ["Automatic", "other-vae"], "Automatic")


def test_switch_serves_the_new_model_and_releases_the_old(root):
    ctx = make_ctx(root)
    before, info = image(ctx)
    assert "Model: alpha" in info
    old = weakref.ref(ctx.pipes.base)
    ctx.queues.of(ctx.pipes.base)  # a queue holds the model too, as after a generation
    assert models.switch_model(ctx, "beta", "Automatic") == "Serving beta."
    gc.collect()
    assert old() is None, "the previous pipeline is still referenced"
    after, info = image(ctx)
    assert "Model: beta" in info and not np.array_equal(before, after)


@pytest.mark.parametrize("paired", [True, False])
def test_the_apps_paired_dedicated_models_serve_only_with_their_checkpoint(root, paired):
    """The demo model's own inpainting/x4 models (the app pairs them with it) must not inpaint or upscale for a
    checkpoint switched to; a dedicated model the user named (here the inpainting one) serves with every checkpoint."""
    ctx = make_ctx(root)
    inpaint, upscale = object(), object()  # stand-ins: only which object serves matters here
    ctx.pipes = state.Pipes(ctx.pipes.base, inpaint, upscale, paired_with="alpha",
                            paired=("inpaint", "upscale") if paired else ("upscale",))
    assert ctx.models.checkpoint == "alpha"
    models.switch_model(ctx, "beta", "Automatic")
    assert ctx.pipes.upscale is None and ctx.pipes.inpaint is (None if paired else inpaint)
    models.switch_model(ctx, "alpha", "Automatic")
    assert ctx.pipes.inpaint is inpaint and ctx.pipes.upscale is upscale


def test_failed_load_keeps_the_previous_model_and_says_why(root):
    ctx = make_ctx(root)
    before, _ = image(ctx)
    with pytest.raises(models.SwitchError, match="could not load broken: .* still serving alpha"):
        models.switch_model(ctx, "broken", "Automatic")
    assert ctx.models.checkpoint == "alpha" and ctx.pipes.base is not None
    after, info = image(ctx)
    assert "Model: alpha" in info and np.array_equal(before, after)


def test_unknown_name_changes_nothing(root):
    ctx = make_ctx(root)
    pipe = ctx.pipes.base
    with pytest.raises(ValueError, match="no checkpoint called 'alpah'.*close names: alpha"):
        models.switch_model(ctx, "alpah", "Automatic")
    assert ctx.pipes.base is pipe and not ctx.queues.of(pipe).waiting() and ctx.queues.of(pipe).running is None


def test_vae_switch_changes_the_image_and_automatic_goes_back(root):
    ctx = make_ctx(root)
    base, _ = image(ctx)
    assert models.switch_model(ctx, "alpha", "other-vae") == "Serving alpha, VAE other-vae."
    other, info = image(ctx)
    assert "VAE: other-vae" in info and np.abs(other.astype(int) - base).max() > 10
    models.switch_model(ctx, "alpha", "Automatic")
    back, info = image(ctx)
    assert "VAE:" not in info and np.array_equal(back, base)


def test_the_vae_stays_across_checkpoints_unless_changed(root):
    ctx = make_ctx(root)
    models.switch_model(ctx, "", "other-vae")
    assert models.switch_model(ctx, "beta") == "Serving beta, VAE other-vae."
    assert "Model: beta, VAE hash:" in image(ctx)[1]
    assert models.switch_model(ctx, "", "Automatic") == "Serving beta."


def test_a_bad_vae_keeps_the_current_one(root):
    ctx = make_ctx(root)
    pipe = ctx.pipes.base
    with pytest.raises(models.SwitchError, match="could not load VAE nope"):
        models.switch_model(ctx, "alpha", "nope")
    assert ctx.pipes.base is pipe and ctx.models.vae == "Automatic"


def test_max_loaded_keeps_models_and_switches_back_without_loading(root):
    calls = []
    ctx = make_ctx(root, max_loaded=2, calls=calls)
    alpha = ctx.pipes.base
    models.switch_model(ctx, "beta", "Automatic")
    assert models.switch_model(ctx, "alpha", "Automatic") == "Serving alpha (2 of at most 2 kept loaded)."
    assert ctx.pipes.base is alpha and calls == ["beta"]


def test_switch_waits_for_the_running_request(root):
    ctx = make_ctx(root)
    pipe = ctx.pipes.base
    turn = ctx.queues.enter(pipe, threading.Event())  # a generation holding the model
    done = threading.Event()
    worker = threading.Thread(target=lambda: (models.switch_model(ctx, "beta", "Automatic"), done.set()))
    worker.start()
    time.sleep(0.5)
    assert not done.is_set() and ctx.pipes.base is pipe
    ctx.queues.leave(pipe, turn)
    worker.join(60)
    assert done.is_set() and ctx.models.checkpoint == "beta"


def test_networks_panel_lists_and_inserts_tags(root):
    ctx = make_ctx(root)
    rows = networks.network_rows(ctx)
    assert rows == [["LoRA", "style", ""], ["Embedding", "glowy", ""]]
    _, info = image(ctx, "a cube <lora:style:1>")  # the hash is cached once the LoRA is used
    lora_hash = info.split('Lora hashes: "style: ')[1][:12]
    assert networks.network_rows(ctx)[0] == ["LoRA", "style", lora_hash]
    assert networks.insert_tag("a cube", "LoRA", "style") == "a cube <lora:style:1>"
    assert networks.insert_tag("a cube <lora:style:1>", "LoRA", "style") == "a cube <lora:style:1>"
    assert networks.insert_tag("", "Embedding", "glowy") == "glowy"
    with pytest.raises(ValueError, match="unknown extra-network kind"):
        networks.insert_tag("", "Hypernet", "x")


def test_the_ui_has_the_bar_the_panel_and_the_endpoint(root):
    from ui import build

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options, ctx.models)
    names = {fn.api_name for fn in demo.fns.values()}
    assert "switch_model" in names
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"model-checkpoint", "model-vae", "model-refresh", "txt2img-networks-table"} <= ids


def test_switch_and_list_over_the_api(root):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from conftest import launched
    from ui import build

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options, ctx.models)
    with launched(demo) as base:
        client = Client(base, verbose=False)
        listed = client.predict(api_name="/models")
        assert listed == {"checkpoints": ["alpha", "beta", "broken"], "checkpoint": "alpha",
                          "vaes": ["Automatic", "other-vae"], "vae": "Automatic"}
        assert client.predict(checkpoint="beta", vae="other-vae", api_name="/switch_model") == "Serving beta, VAE other-vae."
        info = client.predict(prompt="x", steps=1, seed=1, width=32, height=32, api_name="/txt2img")[1]
        assert "Model: beta, VAE hash:" in info and "VAE: other-vae" in info
        with pytest.raises(AppError, match="could not load broken"):
            client.predict(checkpoint="broken", api_name="/switch_model")
        assert client.predict(api_name="/models") | {"checkpoints": None} == {
            "checkpoints": None, "checkpoint": "beta", "vaes": ["Automatic", "other-vae"], "vae": "other-vae"}


def test_the_rest_api_follows_a_switch_and_does_not_hold_the_old_model(root, tmp_path):
    """The API reads the serving model per request: after a switch it serves the new one, and the old
    pipeline is released even with the API mounted (it once kept the start-up model for good)."""
    import requests

    from ui import build, sdapi

    from conftest import launched

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options)
    with launched(demo) as base:
        sdapi.mount(demo.app, demo.ldm_context, sdapi.Settings())
        live = demo.ldm_context
        live.models = ctx.models
        url = f"{base}sdapi/v1"
        assert requests.get(f"{url}/sd-models", timeout=10).json()[0]["model_name"] == "alpha"
        old = weakref.ref(live.pipes.base)
        assert models.switch_model(live, "beta", "Automatic") == "Serving beta."
        gc.collect()
        assert old() is None, "the API still holds the previous pipeline"
        listed = requests.get(f"{url}/sd-models", timeout=10).json()
        assert listed[0]["model_name"] == "beta" and {m["model_name"] for m in listed} == {"alpha", "beta", "broken"}
        r = requests.post(f"{url}/txt2img", json={"prompt": "a cube", "steps": 2, "width": 32, "height": 32, "seed": 3},
                          timeout=60)
        assert r.status_code == 200 and "Model: beta" in r.json()["info"]


def wait_for_hash(manager, name, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while manager.known_hash(name) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return manager.known_hash(name)


def test_titles_are_a1111s_name_and_hash_computed_in_the_background(root, monkeypatch):
    (root / "ldm-hashes.json").unlink(missing_ok=True)  # earlier tests' switches cached beta's hash (shown, as A1111)
    ctx = make_ctx(root)
    library = ctx.models.library
    alpha = wait_for_hash(ctx.models, "alpha")
    assert alpha == library.short_hash(library.find("checkpoints", "alpha")) and len(alpha) == 10
    assert ctx.models.titled() == [(f"alpha [{alpha}]", "alpha"), ("beta", "beta"), ("broken", "broken")]
    assert [ctx.models.resolve(t) for t in (f"alpha [{alpha}]", "alpha", alpha, "beta [0123456789]")] == ["alpha"] * 3 + ["beta"]
    # a switch hashes the new checkpoint off the request path: listings meanwhile show the bare name
    release, started = threading.Event(), threading.Event()
    real = type(library).short_hash

    def slow(self, entry):
        started.set()
        release.wait(30)
        return real(self, entry)

    monkeypatch.setattr(type(library), "short_hash", slow)
    models.switch_model(ctx, "beta", "Automatic")
    assert started.wait(10) and ("beta", "beta") in ctx.models.titled()  # not waiting for the hash
    release.set()
    beta = wait_for_hash(ctx.models, "beta")
    assert (f"beta [{beta}]", "beta") in ctx.models.titled() and ctx.models.title("beta") == f"beta [{beta}]"
    assert models.switch_model(ctx, f"alpha [{alpha}]") == "Serving alpha."  # a title switches too


def test_a_switch_frees_the_start_up_model_while_its_hash_is_computed(root, tmp_path):
    """The start-up model from a path outside the folder is hashed by reading its files; a switch meanwhile
    frees its pipeline (the hash holds only the path), and its title gets the hash when the read ends."""
    from test_model_hash import GatedWeights

    path = shutil.copytree(root / "Stable-diffusion" / "alpha", tmp_path / "outside")
    load = models_folder.loader(root)
    pipe = load(str(path))
    gate = GatedWeights(path)
    manager = models.Models(pipe, loader=load, spec=str(path))
    ctx = state.Context(state.Pipes(pipe), state.Options(outputs=None), models=manager)
    start_up = weakref.ref(pipe)
    del pipe
    assert models.switch_model(ctx, "beta", "Automatic") == "Serving beta."
    gc.collect()
    assert start_up() is None, "the start-up model's hash keeps its pipeline alive"
    assert manager.title("outside") == "outside"  # still hashing
    gate.release()
    assert wait_for_hash(manager, "outside") == gate.expected_hash()
    assert manager.title("outside") == f"outside [{gate.expected_hash()}]"


def test_rest_options_switch_checkpoints_and_vaes_as_the_ui_does(root):
    """POST /sdapi/v1/options with sd_model_checkpoint / sd_vae goes through ui.models' switch: the old model
    is released, the next request uses the new one, names/titles/hashes are accepted, failures are readable."""
    import requests

    from conftest import launched
    from ui import build, sdapi

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options, ctx.models)
    with launched(demo) as base:
        sdapi.mount(demo.app, demo.ldm_context, sdapi.Settings())
        live = demo.ldm_context
        url = f"{base}sdapi/v1"
        alpha = wait_for_hash(live.models, "alpha")
        options = requests.get(f"{url}/options", timeout=10).json()
        assert options["sd_model_checkpoint"] == f"alpha [{alpha}]" and options["sd_vae"] == "Automatic"
        assert requests.post(f"{url}/options", json=options, timeout=10).status_code == 200  # the same: no switch
        old = weakref.ref(live.pipes.base)
        assert requests.post(f"{url}/options", json={"sd_model_checkpoint": "beta"}, timeout=60).status_code == 200
        gc.collect()
        assert live.models.checkpoint == "beta" and old() is None, "the old checkpoint is still held"
        body = {"prompt": "a cube", "steps": 2, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler"}
        r = requests.post(f"{url}/txt2img", json=body, timeout=60)
        assert r.status_code == 200 and "Model: beta" in r.json()["info"]
        beta = wait_for_hash(live.models, "beta")
        listed = requests.get(f"{url}/sd-models", timeout=10).json()
        assert listed[0]["title"] == f"beta [{beta}]" and listed[0]["hash"] == beta
        # the VAE, then back with A1111's "None"
        assert requests.post(f"{url}/options", json={"sd_vae": "other-vae"}, timeout=60).status_code == 200
        info = requests.post(f"{url}/txt2img", json=body, timeout=60).json()["info"]
        assert "VAE: other-vae" in info and requests.get(f"{url}/options", timeout=10).json()["sd_vae"] == "other-vae"
        assert requests.post(f"{url}/options", json={"sd_vae": "None"}, timeout=60).status_code == 200
        assert live.models.vae == "Automatic"
        # by short hash, as some clients send it
        assert requests.post(f"{url}/options", json={"sd_model_checkpoint": alpha}, timeout=60).status_code == 200
        assert live.models.checkpoint == "alpha"
        r = requests.post(f"{url}/options", json={"sd_model_checkpoint": "alpah"}, timeout=10)
        assert r.status_code == 422 and "close names: alpha" in r.json()["detail"]
        r = requests.post(f"{url}/options", json={"sd_model_checkpoint": "broken"}, timeout=60)
        detail = r.json()["detail"]
        assert r.status_code == 500 and "could not load broken" in detail and "still serving alpha" in detail
        assert requests.post(f"{url}/txt2img", json=body, timeout=60).status_code == 200
        r = requests.post(f"{url}/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "beta"}}, timeout=10)
        assert r.status_code == 422 and "POST /sdapi/v1/options" in r.json()["detail"]
