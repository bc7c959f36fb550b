"""ControlNet in the web UI (ui.control): the handlers' cn{i}_* parameters give the library's pictures pixel for
pixel and visibly change them, bad units fail with a message naming the unit before any ControlNet is loaded,
the preview is the preprocessor's map, an infotext's "ControlNet N" entries come back as the accordion's values,
and the named API endpoints list the units' parameters as optional."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ldm
import tiny
from ldm.control_preprocess import preprocess
from test_controlnet import control_image, random_controlnet
from ui import control, state, streaming, tasks

VISIBLE = 10  # out of 255: the control must change the picture by more than this


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-cn-models")
    random_controlnet(tiny.unet(), 1).save_pretrained(root / "ControlNet" / "tiny-canny", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def pipe(base_model, models_dir):
    return ldm.load(base_model, device="cpu", dtype="float32", models_dir=models_dir)


@pytest.fixture
def ctx(pipe, tmp_path):
    return state.Context(state.Pipes(pipe), state.Options(outputs=tmp_path / "outputs", preview_every=0))


@pytest.fixture
def shapes(tmp_path):
    path = tmp_path / "shapes.png"
    control_image(0, 32, 32).save(path)
    return path


def px(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def unit(**changes) -> dict:
    values = {"cn0_enabled": True, "cn0_model": "tiny-canny", "cn0_preprocessor": "canny", "cn0_setting_a": 50,
              "cn0_setting_b": 150, "cn0_weight": 0.8, "cn0_start": 0.0, "cn0_end": 0.9,
              "cn0_control_mode": "My prompt is more important"}
    return {**values, **changes}


def test_txt2img_unit_equals_the_library_call_and_changes_the_picture(ctx, pipe, shapes):
    kw = dict(prompt="a cube", steps=3, seed=5, width=32, height=32)
    out = streaming.run(tasks.txt2img(ctx, **kw, **unit(cn0_image=str(shapes))))
    plain = streaming.run(tasks.txt2img(ctx, **kw))
    cn = ldm.load_controlnet("tiny-canny", base=pipe)
    lib_unit = ldm.ControlUnit.a1111(cn, Image.open(shapes), control_mode="My prompt is more important", weight=0.8,
                                     end=0.9, preprocessor="canny", settings={"low": 50, "high": 150})
    lib = pipe.txt2img("a cube", steps=3, seed=5, width=32, height=32, control=[lib_unit])
    assert np.array_equal(px(out.images[0]), np.asarray(lib.images[0], np.int16))
    assert np.abs(px(out.images[0]) - px(plain.images[0])).max() > VISIBLE
    info = out.infotexts[0]
    assert 'ControlNet 0: "Module: canny, Model: tiny-canny [' in info and "Control Mode: My prompt is more important" in info


def test_img2img_unit_without_an_image_uses_the_tabs_image(ctx, pipe, shapes):
    kw = dict(prompt="a cube", steps=3, seed=2, strength=0.8)
    out = streaming.run(tasks.img2img(ctx, image=str(shapes), **kw, **unit(cn0_preprocessor="invert")))
    plain = streaming.run(tasks.img2img(ctx, image=str(shapes), **kw))
    assert np.abs(px(out.images[0]) - px(plain.images[0])).max() > VISIBLE
    assert "Module: invert" in out.infotexts[0]


@pytest.mark.parametrize("changes, message", [
    ({}, "ControlNet unit 0: no control image: upload one"),
    ({"cn0_model": None}, "ControlNet unit 0: choose a model"),
    ({"cn0_model": "nope"}, "ControlNet unit 0: no controlnet called 'nope'"),
    ({"cn0_weight": 2.5}, "ControlNet unit 0: ControlNet weight must be a number from 0 to 2"),
    ({"cn0_start": 0.5, "cn0_end": 0.5}, "ControlNet unit 0: ControlNet start (0.5) must be before end (0.5)"),
    ({"cn0_setting_a": 300}, "Canny low threshold must be from 1 to 255"),
    ({"cn0_setting_b": -1}, "Canny high threshold must be from 1 to 255, got -1"),  # was "the default" in silence
    ({"cn0_preprocessor": "depth_midas"}, "unknown preprocessor 'depth_midas'"),
    ({"cn0_control_mode": "Prompt"}, "unknown control mode 'Prompt'"),
])
def test_bad_units_fail_before_any_model_work(ctx, shapes, changes, message):
    values = unit(**changes)
    if changes:  # every case but the first has an image: the error is about the changed field
        values["cn0_image"] = str(shapes)
    with pytest.raises(ValueError) as err:
        tasks.txt2img(ctx, prompt="x", steps=2, **values)  # raises at the call: nothing queued, nothing run
    assert message in str(err.value)
    assert not ctx.controlnets.loaded


def test_unknown_unit_parameter_is_refused(ctx):
    with pytest.raises(ValueError, match="unknown parameter.*cn3_enabled"):
        tasks.txt2img(ctx, prompt="x", cn3_enabled=True)


def test_fast_is_refused_readably_and_hires_fix_runs_with_controlnet(ctx, shapes):
    with pytest.raises(ValueError, match="fast preset cannot be combined with ControlNet"):
        streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, fast=True, **unit(cn0_image=str(shapes))))
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, seed=3, width=32, height=32, hires_scale=2,
                                      **unit(cn0_image=str(shapes))))
    with Image.open(out.images[0]) as im:
        assert im.size == (64, 64)
    assert "ControlNet 0:" in out.infotexts[0] and "Hires upscale: 2" in out.infotexts[0]


def test_preview_is_the_preprocessors_map_at_the_generation_size(ctx, shapes):
    got = control.preview(ctx, str(shapes), "canny", 50, 150, "crop", 32, 32)
    want = preprocess(Image.open(shapes).convert("RGB"), "canny", {"low": 50, "high": 150})
    assert got.size == (32, 32) and np.array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).max() == 255  # the shapes have edges
    big = control.preview(ctx, str(shapes), "none", None, None, "just", 64, 48)
    assert big.size == (64, 48)
    # None is the preprocessor's own default (the API's default for both settings); a negative value is refused.
    default = preprocess(Image.open(shapes).convert("RGB"), "canny", {"low": 100, "high": 200})
    assert ldm.PREPROCESSORS["canny"].resolve({}) == {"low": 100, "high": 200}
    assert np.array_equal(np.asarray(control.preview(ctx, str(shapes), "canny", None, None, "crop", 32, 32)),
                          np.asarray(default))
    with pytest.raises(ValueError, match=r"Canny low threshold must be from 1 to 255, got -1"):
        control.preview(ctx, str(shapes), "canny", -1, None, "crop", 32, 32)
    with pytest.raises(ValueError, match="no control image"):
        control.preview(ctx, None, "canny")


def test_infotext_comes_back_as_the_accordions_values(ctx, shapes):
    out = streaming.run(tasks.txt2img(ctx, prompt="a cube", steps=2, seed=1, width=32, height=32,
                                      **unit(cn0_image=str(shapes), cn0_resize="fill")))
    values = control.infotext_values(out.infotexts[0])
    title = ctx.controlnets.get(ctx.pipes.base, ctx.pipes.base.library.find("controlnets", "tiny-canny")).title
    assert values == {"cn0_enabled": True, "cn0_model": title, "cn0_preprocessor": "canny", "cn0_weight": 0.8,
                      "cn0_start": 0.0, "cn0_end": 0.9, "cn0_control_mode": "My prompt is more important",
                      "cn0_resize": "fill", "cn0_setting_a": 50.0, "cn0_setting_b": 150.0,
                      "cn1_enabled": False, "cn2_enabled": False}
    assert title in control.infotext_values(out.infotexts[0]).values()
    # A1111's own text (its extension's extra keys are ignored); no ControlNet -> the units go off.
    a1111 = ('x\nSteps: 20, Seed: 1, ControlNet 1: "Module: scribble_xdog, Model: control_v11p_sd15_scribble '
             '[d4ba51ff], Weight: 0.5, Resize Mode: Just Resize, Low Vram: False, Processor Res: 512, Threshold A: 20, '
             'Guidance Start: 0.1, Guidance End: 0.7, Pixel Perfect: True, Control Mode: ControlNet is more important"')
    got = control.infotext_values(a1111)
    assert got["cn1_model"] == "control_v11p_sd15_scribble [d4ba51ff]" and got["cn1_setting_a"] == 20.0
    assert "cn1_setting_b" not in got  # scribble has one setting
    # A setting the text does not give comes back as the preprocessor's default (shown), not the slider's old value.
    canny = control.infotext_values('x\nSteps: 2, Seed: 1, ControlNet 0: "Module: canny, Model: m, Threshold A: 20"')
    assert (canny["cn0_setting_a"], canny["cn0_setting_b"]) == (20.0, 200)
    assert got["cn1_resize"] == "just" and got["cn1_control_mode"] == "ControlNet is more important"
    assert got["cn0_enabled"] is False and got["cn1_enabled"] is True
    assert control.infotext_values("") == {}


def test_one_controlnet_hash_everywhere_as_a1111s_extension(ctx, pipe, shapes):
    """A1111's ControlNet extension titles models "name [old 8-hex model hash]" in its list and its infotext;
    the models folder's listing, the accordion's choices and our infotext say the same."""
    import hashlib

    from ui.controlnets import titles

    library = pipe.library
    entry = library.find("controlnets", "tiny-canny")
    weights = sorted(entry.path.glob("*.safetensors"))[0].read_bytes()
    assert len(weights) > 0x110000  # the hashed window lies inside the file
    old = hashlib.sha256(weights[0x100000:0x110000]).hexdigest()[:8]
    assert library.short_hash(entry) == library.cached_short_hash(entry) == old
    assert library.listing()["controlnets"][0]["hash"] == old
    assert titles(library) == [f"tiny-canny [{old}]"]
    out = streaming.run(tasks.txt2img(ctx, prompt="x", steps=2, seed=1, width=32, height=32,
                                      **unit(cn0_image=str(shapes), cn0_model=f"tiny-canny [{old}]")))
    assert f"Model: tiny-canny [{old}]," in out.infotexts[0]


def test_inpaint_unit_without_an_image_uses_the_tabs_image(ctx, shapes, tmp_path):
    mask = tmp_path / "mask.png"
    square = Image.new("L", (32, 32), 0)
    square.paste(255, (4, 4, 28, 28))
    square.save(mask)
    kw = dict(image=str(shapes), mask=str(mask), prompt="a cube", steps=3, seed=4, mask_blur=0, strength=0.9)
    out = streaming.run(tasks.inpaint(ctx, **kw, **unit(cn0_preprocessor="none", cn0_weight=1.5)))
    plain = streaming.run(tasks.inpaint(ctx, **kw))
    assert np.abs(px(out.images[0]) - px(plain.images[0])).max() > VISIBLE
    assert "ControlNet 0:" in out.infotexts[0]


def test_named_endpoint_takes_the_units_by_keyword(launch_web_app, pipe, shapes):
    from gradio_client import handle_file

    web = launch_web_app(state.Pipes(pipe), preview_every=0)
    client = web.client()
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/txt2img"]["parameters"]
    params = {p["parameter_name"]: p for p in info}
    assert set(control.param_names()) <= set(params)
    assert all(params[n]["parameter_has_default"] for n in control.param_names())  # optional, images too
    assert {params[f"cn{i}_setting_{x}"]["parameter_default"] for i in range(control.UNITS) for x in "ab"} == {None}
    kw = dict(prompt="a cube", steps=3, seed=5, width=32, height=32, api_name="/txt2img")
    # Settings left out: the preprocessor's defaults (None through the slider); -1 is no longer "default" in silence.
    defaults = client.predict(**kw, cn0_enabled=True, cn0_model="tiny-canny", cn0_image=handle_file(str(shapes)),
                              cn0_preprocessor="canny")
    assert "Threshold A: 100.0, Threshold B: 200.0" in defaults[1], defaults[1]
    guided = client.predict(**kw, cn0_enabled=True, cn0_model="tiny-canny", cn0_image=handle_file(str(shapes)),
                            cn0_preprocessor="canny", cn0_setting_a=50, cn0_setting_b=150)
    plain = client.predict(**kw)
    assert 'ControlNet 0: "Module: canny, Model: tiny-canny [' in guided[1] and "ControlNet" not in plain[1]
    assert np.abs(px(guided[0][0]["image"]) - px(plain[0][0]["image"])).max() > VISIBLE
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="ControlNet unit 2: choose a model"):
        client.predict(**kw, cn2_enabled=True, cn2_model="", cn2_image=handle_file(str(shapes)))
    with pytest.raises(AppError, match=r"ControlNet unit 0: Canny low threshold must be from 1 to 255, got -1"):
        client.predict(**kw, cn0_enabled=True, cn0_model="tiny-canny", cn0_image=handle_file(str(shapes)),
                       cn0_preprocessor="canny", cn0_setting_a=-1)


def test_cache_does_not_hand_a_new_pipeline_a_released_ones_controlnet(pipe):
    """Keys hold id(pipe); after a checkpoint switch a new pipeline may get a released one's id."""
    import weakref

    from ui.controlnets import ControlNets

    cache = ControlNets()
    entry = pipe.library.find("controlnets", "tiny-canny")
    net = cache.get(pipe, entry)
    assert cache.get(pipe, entry) is net  # cached for the same pipeline
    key = next(iter(cache.loaded))

    class Released:
        pass

    old = Released()
    cache.loaded[key] = (weakref.ref(old), "the released pipeline's ControlNet")
    del old
    again = cache.get(pipe, entry)
    assert isinstance(again, ldm.ControlNet) and again is not net
