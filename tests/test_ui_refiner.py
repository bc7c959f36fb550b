"""The txt2img Refiner accordion (issue 12): a checkpoint of the models folder (SDXL refiners and bases) with
"Switch at", through the handler and the named API endpoint; equal to the library's refiner run, infotext
restored by PNG info; the refiner loaded once into ui.models' refiner slot; bad choices refused before any
refiner loads."""
from __future__ import annotations

import numpy as np
import pytest

import ldm
import tiny
import tiny_sdxl
from ui import convert, models, state, tasks

KW = dict(prompt="a lighthouse", negative_prompt="fog", width=32, height=32, steps=4, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-refiner") / "models"
    sd = root / "Stable-diffusion"
    tiny_sdxl.save_model(sd / "xl")
    tiny_sdxl.save_refiner(sd / "xl-refiner")
    tiny.save_model(sd / "sd1")
    return root


def make_ctx(root, start="xl", calls=None):
    def load(spec):
        if calls is not None:
            calls.append(spec)
        return ldm.load(spec, models_dir=root, device="cpu", dtype="float32")

    pipe = load(start)
    manager = models.Models(pipe, loader=load, spec=start)
    return state.Context(state.Pipes(pipe), state.Options(outputs=None, preview_every=0), models=manager)


def run(ctx, **kw):
    *_, out = tasks.txt2img(ctx, **{**KW, **kw})
    return out


def test_choices_are_the_sdxl_checkpoints(root):
    ctx = make_ctx(root)
    assert [name for _, name in ctx.models.refiner_choices()] == ["None", "xl", "xl-refiner"]  # not the SD 1.x one


def test_refiner_matches_the_library_and_its_infotext_restores(root):
    calls = []
    ctx = make_ctx(root, calls=calls)
    out = run(ctx, refiner="xl-refiner", refiner_switch_at=0.5)
    refiner = ldm.load(root / "Stable-diffusion" / "xl-refiner", device="cpu", dtype="float32")
    library = ctx.pipes.base.txt2img(KW["prompt"], **{k: v for k, v in KW.items() if k != "prompt"}, refiner=refiner,
                                     refiner_switch_at=0.5)
    plain = run(ctx)
    assert np.array_equal(_open(out.images[0]), np.asarray(library.images[0]))
    assert not np.array_equal(_open(out.images[0]), _open(plain.images[0]))
    h = refiner.model_hash
    assert f"Refiner: xl-refiner [{h}], Refiner switch at: 0.5" in out.infotexts[0]
    restored = convert.infotext_fields(out.infotexts[0])
    assert (restored["refiner"], restored["refiner_switch_at"]) == ("xl-refiner", 0.5)
    again = run(ctx, refiner=f"xl-refiner [{h}]", refiner_switch_at=0.5)  # the title, as a pasted infotext has it
    assert np.array_equal(_open(again.images[0]), _open(out.images[0]))
    assert calls == ["xl", "xl-refiner"]  # loaded once, kept in the refiner slot
    assert ctx.models.refiner_slot[0] == "xl-refiner"


def _open(item):
    from PIL import Image

    path = item[0] if isinstance(item, (list, tuple)) else item
    return np.asarray(Image.open(path).convert("RGB")) if isinstance(path, str) else np.asarray(path)


def test_the_serving_sdxl_model_can_refine_itself_without_loading(root):
    calls = []
    ctx = make_ctx(root, calls=calls)
    out = run(ctx, refiner="xl", refiner_switch_at=0.7)
    assert "Refiner: xl [" in out.infotexts[0] and calls == ["xl"]


@pytest.mark.parametrize("kw, words", [
    (dict(refiner="xl-refiner", refiner_switch_at=1.0), "between 0 and 1"),
    (dict(refiner="xl-refiner", hires_scale=1.5), "hires fix or ControlNet"),
    (dict(refiner="xl-refinr"), "close names: xl-refiner"),
])
def test_bad_choices_are_refused_before_the_refiner_loads(root, kw, words):
    calls = []
    ctx = make_ctx(root, calls=calls)
    with pytest.raises(ValueError, match=words):
        run(ctx, **kw)
    assert calls == ["xl"]


def test_an_sd1_base_is_refused_before_the_refiner_loads(root):
    calls = []
    ctx = make_ctx(root, start="sd1", calls=calls)
    with pytest.raises(ValueError, match="needs SDXL models.*the model"):
        run(ctx, refiner="xl-refiner", width=32, height=32)
    assert calls == ["sd1"]


def test_refiner_over_the_named_api_and_png_info(root):
    from gradio_client import Client

    from conftest import launched
    from ui import build

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options, ctx.models)
    with launched(demo) as base:
        client = Client(base, verbose=False)
        info = client.predict(prompt="a lighthouse", negative_prompt="fog", steps=4, seed=3, width=32, height=32,
                              sampler="Euler", refiner="xl-refiner", refiner_switch_at=0.5, api_name="/txt2img")[1]
        assert "Refiner: xl-refiner [" in info and "Refiner switch at: 0.5" in info


def test_refiner_over_the_a1111_rest_api(root):
    """A1111's txt2img fields refiner_checkpoint / refiner_switch_at: the same picture as the UI's handler."""
    import requests

    from conftest import launched
    from ui import build, sdapi

    ctx = make_ctx(root)
    demo = build(ctx.pipes, ctx.options, ctx.models)
    with launched(demo) as base:
        sdapi.mount(demo.app, demo.ldm_context, sdapi.Settings())
        url = f"{base}sdapi/v1/txt2img"
        body = {"prompt": KW["prompt"], "negative_prompt": "fog", "width": 32, "height": 32, "steps": 4, "seed": 3,
                "sampler_name": "Euler", "cfg_scale": 7.0, "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.5}
        r = requests.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        import base64
        import io

        from PIL import Image

        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        want = _open(run(ctx, refiner="xl-refiner", refiner_switch_at=0.5).images[0])
        assert np.array_equal(got, want) and "Refiner: xl-refiner [" in r.json()["info"]
        r = requests.post(url, json={**body, "refiner_switch_at": 1.5}, timeout=30)
        assert r.status_code == 422 and "between 0 and 1" in r.json()["detail"]
        r = requests.post(url, json={**body, "refiner_checkpoint": "None"}, timeout=120)
        assert r.status_code == 200 and "Refiner" not in r.json()["info"]


def test_switching_to_the_refiner_in_the_slot_does_not_load_it_again(root):
    calls = []
    ctx = make_ctx(root, calls=calls)
    run(ctx, refiner="xl-refiner", refiner_switch_at=0.5)
    refiner = ctx.models.refiner_slot[1]
    assert models.switch_model(ctx, "xl-refiner", "Automatic") == "Serving xl-refiner."
    assert ctx.pipes.base is refiner and ctx.models.refiner_slot is None and calls == ["xl", "xl-refiner"]
