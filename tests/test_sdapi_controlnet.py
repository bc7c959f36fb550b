"""ControlNet through the A1111 API (ui.sdapi.controlnet): `alwayson_scripts.controlnet.args` on txt2img and
img2img/inpaint gives the library's pictures pixel for pixel, the control visibly changes them, bad units get
422 before any ControlNet is loaded, and the extension's /controlnet/* routes list and preprocess."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

import ldm
import tiny
from api_server import launch_api
from ldm.control_preprocess import preprocess
from ldm.masks import MaskedContent
from test_controlnet import control_image, random_controlnet

webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

VISIBLE = 10  # out of 255: the control must change the picture by more than this
CANNY = {"low": 50, "high": 150}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-models")
    random_controlnet(tiny.unet(), 1).save_pretrained(root / "ControlNet" / "tiny-canny", safe_serialization=True)
    broken = root / "ControlNet" / "broken"  # loading it would fail: a 422 naming the weight proves no load was tried
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def pipe(base_model, models_dir):
    return ldm.load(base_model, device="cpu", dtype="float32", models_dir=models_dir)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    from ui.state import Pipes

    app = launch_api(Pipes(pipe), tmp_path_factory.mktemp("cn-out"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def cn(pipe):
    return ldm.load_controlnet("tiny-canny", base=pipe)


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


def shapes(seed: int = 0) -> Image.Image:
    return control_image(seed, 32, 32)


def post(server, route: str, body: dict):
    return requests.post(f"{server.url}{route}", json=body, timeout=300)


def unit(**fields) -> dict:
    return {"enabled": True, "image": b64(shapes()), "module": "canny", "model": "tiny-canny", "weight": 1.0,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "resize_mode": 1,
            "threshold_a": CANNY["low"], "threshold_b": CANNY["high"], "processor_res": 512, "pixel_perfect": False,
            **fields}


GEN = dict(seed=5, width=32, height=32, steps=3, cfg_scale=6.0, sampler_name="Euler a")
LIB = dict(seed=5, width=32, height=32, steps=3, guidance_scale=6.0, sampler="Euler a")


def test_txt2img_with_the_webuiapi_client_equals_the_library(server, pipe, cn):
    api = webuiapi.WebUIApi(port=server.port)
    units = [webuiapi.ControlNetUnit(image=shapes(), module="canny", model=cn.title, weight=0.8, guidance_start=0.0,
                                     guidance_end=0.8, control_mode=2, resize_mode="Just Resize",
                                     threshold_a=CANNY["low"], threshold_b=CANNY["high"])]
    r = api.txt2img(prompt="a house", negative_prompt="blurry", controlnet_units=units, **GEN)
    want = pipe.txt2img("a house", negative_prompt="blurry", control=[ldm.ControlUnit.a1111(
        cn, shapes(), control_mode="ControlNet is more important", weight=0.8, start=0.0, end=0.8,
        preprocessor="canny", resize="just", settings=CANNY)], **LIB)
    plain = pipe.txt2img("a house", negative_prompt="blurry", **LIB)
    assert np.array_equal(px(r.images[0]), px(want.images[0]))
    assert int(np.abs(px(r.images[0]) - px(plain.images[0])).max()) > VISIBLE
    text = r.info["infotexts"][0]
    assert text == want.infotexts[0] and r.images[0].info["parameters"] == text
    assert f'ControlNet 0: "Module: canny, Model: {cn.title}, Weight: 0.8' in text
    assert "Control Mode: ControlNet is more important" in text


def test_disabled_units_are_ignored(server, pipe):
    body = {"prompt": "a house", **GEN, "alwayson_scripts": {"controlnet": {"args": [
        unit(enabled=False, model="no-such-model", weight=9)]}}}
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    plain = pipe.txt2img("a house", **LIB)
    assert np.array_equal(px(decode(r.json()["images"][0])), px(plain.images[0]))
    assert "ControlNet" not in json.loads(r.json()["info"])["infotexts"][0]


def test_inpaint_unit_without_image_uses_the_init_image(server, pipe, cn):
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a cat", "init_images": [b64(init)], "mask": b64(mask), "denoising_strength": 0.8,
            "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 2, **GEN,
            "alwayson_scripts": {"ControlNet": {"args": [unit(image=None, module="none", weight=1.5,
                                                              control_mode="My prompt is more important")]}}}
    r = post(server, "/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    settings = dict(strength=0.8, masked_content=MaskedContent.ORIGINAL, inpaint_area="whole", mask_blur=2, padding=32, **LIB)
    want = pipe.inpaint(init, mask, "a cat", control=[ldm.ControlUnit.a1111(
        cn, init, control_mode="My prompt is more important", weight=1.5, preprocessor="none", resize="crop")], **settings)
    got = decode(r.json()["images"][0])
    assert np.array_equal(px(got), px(want.images[0]))
    assert json.loads(r.json()["info"])["infotexts"][0] == want.infotexts[0]


@pytest.mark.parametrize("fields, words", [
    (dict(model="tiny-cany"), ["tiny-canny"]),  # unknown name: close names listed
    (dict(model="broken", weight=3), ["weight", "0 to 2"]),  # checked before the (failing) load
    (dict(model="broken", guidance_start=0.8, guidance_end=0.2), ["start", "end"]),
    (dict(model="broken", control_mode=7), ["control_mode"]),
    (dict(model="broken", resize_mode="Stretch"), ["resize_mode"]),
    (dict(model="broken", module="depth_midas"), ["module", "canny"]),
    (dict(model="broken", threshold_a=999), ["threshold"]),
    # -1 is the extension's "unset" (the module's default); other negatives were quietly the default too
    (dict(model="broken", threshold_a=-5), ["Canny low threshold must be from 1 to 255, got -5"]),
    (dict(model="broken", threshold_b=-0.5), ["Canny high threshold must be from 1 to 255, got -0.5"]),
    (dict(model="broken", processor_res=-2), ["processor_res must be a whole number from 64 to 2048", "got -2"]),
    (dict(model="broken", processor_res=100_000), ["processor_res", "got 100000"]),
    (dict(model="None"), ["model_list"]),
    (dict(model="broken", image="https://example.com/x.png"), ["URL"]),
])
def test_bad_units_get_422(server, fields, words):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": "x", **GEN, "alwayson_scripts": {"controlnet": {"args": [unit(**fields)]}}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail


def test_no_image_and_args_not_a_list_get_422(server):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": "x", **GEN, "alwayson_scripts": {"controlnet": {"args": [unit(image="")]}}})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = post(server, "/sdapi/v1/txt2img", {"prompt": "x", **GEN, "alwayson_scripts": {"controlnet": {"args": "canny"}}})
    assert r.status_code == 422


def test_hires_fix_with_a_unit_equals_the_library(server, pipe, cn):
    """enable_hr with ControlNet: both passes guided (the extension's hr_option "Both")."""
    body = {"prompt": "a house", **GEN, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos",
            "denoising_strength": 0.6, "alwayson_scripts": {"controlnet": {"args": [unit()]}}}
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    want = pipe.txt2img("a house", hires_scale=2.0, hires_upscaler="lanczos", hires_strength=0.6, control=[
        ldm.ControlUnit.a1111(cn, shapes(), preprocessor="canny", settings=CANNY)], **LIB)
    got = decode(r.json()["images"][0])
    assert got.size == (64, 64) and np.array_equal(px(got), px(want.images[0]))
    assert json.loads(r.json()["info"])["infotexts"][0] == want.infotexts[0]


def test_model_and_module_lists(server, cn):
    get = lambda route: requests.get(f"{server.url}{route}", timeout=30)  # noqa: E731
    listed = get("/controlnet/model_list").json()["model_list"]
    assert len(listed) == 2 and listed[0].startswith("broken [") and listed[1] == cn.title  # "name [hash]" as in infotexts
    modules = get("/controlnet/module_list").json()
    assert modules["module_list"] == list(ldm.PREPROCESSORS)
    assert [s["name"] for s in modules["module_detail"]["canny"]["sliders"]] == [s.label for s in ldm.PREPROCESSORS["canny"].settings]
    types = get("/controlnet/control_types").json()["control_types"]
    assert cn.title in types["All"]["model_list"]
    assert get("/controlnet/version").json() == {"version": 2}


def test_detect_returns_the_canny_map(server):
    image = shapes(3)
    r = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [b64(image)],
                                             "controlnet_threshold_a": CANNY["low"], "controlnet_threshold_b": CANNY["high"]})
    assert r.status_code == 200, r.text
    got = px(decode(r.json()["images"][0]))
    assert np.array_equal(got, px(preprocess(image, "canny", CANNY)))
    assert set(np.unique(got)) == {0, 255}
    api = webuiapi.WebUIApi(port=server.port)  # the client's older field name, its defaults (64/64)
    res = api.controlnet_detect([image], module="canny")
    assert np.array_equal(px(res.images[0]), px(preprocess(image, "canny", {"low": 64, "high": 64})))
    bad = post(server, "/controlnet/detect", {"controlnet_module": "pose", "controlnet_input_images": [b64(image)]})
    assert bad.status_code == 422
    # -1 (the extension's "unset") and null are the module's defaults; any other value out of range is refused.
    for unset in (-1, None):
        r = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [b64(image)],
                                                 "controlnet_threshold_a": unset, "controlnet_threshold_b": unset,
                                                 "controlnet_processor_res": unset})
        assert r.status_code == 200, r.text
        assert np.array_equal(px(decode(r.json()["images"][0])), px(preprocess(image, "canny", {})))
    for field, value, words in (("controlnet_threshold_a", -5, "Canny low threshold must be from 1 to 255, got -5"),
                                ("controlnet_threshold_b", 256, "Canny high threshold must be from 1 to 255, got 256"),
                                ("controlnet_processor_res", 10, "controlnet_processor_res must be a whole number "
                                                                 "from 64 to 2048")):
        r = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [b64(image)],
                                                 field: value})
        assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_jobs_take_controlnet_units_too(server, pipe, cn):
    scripts = {"controlnet": {"args": [unit(weight=0.7)]}}
    bad = post(server, "/api/v1/jobs", {"task": "txt2img", "prompt": "x", **GEN,
                                        "alwayson_scripts": {"controlnet": {"args": [unit(weight=-1)]}}})
    assert bad.status_code == 422 and "weight" in bad.json()["detail"]
    r = post(server, "/api/v1/jobs", {"task": "txt2img", "prompt": "a house", "save_images": False, **GEN,
                                      "alwayson_scripts": scripts})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        status = requests.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=30).json()
        if status["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert status["state"] == "done", status
    want = pipe.txt2img("a house", control=[ldm.ControlUnit(cn, shapes(), weight=0.7, preprocessor="canny", settings=CANNY)], **LIB)
    assert np.array_equal(px(decode(status["result"]["images"][0])), px(want.images[0]))
