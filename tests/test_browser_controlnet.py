"""The ControlNet accordion in headless Chromium: upload a picture to unit 0, pick canny, preview the map, generate;
the picture differs from the same seed without ControlNet, the infotext has the unit, an enabled unit without an
image fails in the status line, and PNG info puts the unit's settings back into the accordion."""
from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from conftest import served_ui

import tiny
from ldm.control_preprocess import preprocess
from test_controlnet import control_image, random_controlnet

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VISIBLE = 10  # out of 255


@pytest.fixture(scope="module")
def url(base_model, tmp_path_factory):
    import ldm

    root = tmp_path_factory.mktemp("browser-cn-models")
    random_controlnet(tiny.unet(), 1).save_pretrained(root / "ControlNet" / "tiny-canny", safe_serialization=True)
    pipe = ldm.load(base_model, device="cpu", dtype="float32", models_dir=root)
    with served_ui(tmp_path_factory, pipe, "browser-cn-outputs", preview_every=0) as served:
        yield served.url


def served_file(page, selector: str) -> Path:
    """The local file behind a served picture (the server runs on this machine)."""
    src = page.locator(selector).first.get_attribute("src")
    return Path(unquote(src.split("file=", 1)[1]))


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page) -> tuple[np.ndarray, str]:
    """Click Generate; the new picture (its file) and infotext once the status says Done."""
    first = "document.querySelector('#txt2img-gallery img')"
    before = page.evaluate(f"{first} ? {first}.src : ''")
    page.click("#txt2img-generate")
    page.wait_for_function(f"document.querySelector('#txt2img-status textarea').value.startsWith('Done') && "
                           f"{first} && {first}.src !== {before!r}", timeout=120_000)
    path = served_file(page, "#txt2img-gallery img")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16), im.info["parameters"]


def test_canny_guided_generation_through_the_accordion(page, tmp_path):
    shapes = tmp_path / "shapes.png"
    control_image(3, 32, 32).save(shapes)
    page.fill("#txt2img-prompt textarea", "a cube")
    set_number(page, "#txt2img-steps", 3)
    set_number(page, "#txt2img-width", 32)
    set_number(page, "#txt2img-height", 32)
    page.locator("#txt2img-seed input").fill("11")
    time.sleep(0.3)
    plain, plain_info = generate(page)
    assert "ControlNet" not in plain_info

    page.locator("#txt2img-controlnet button").first.click()  # open the accordion
    page.locator("#txt2img-cn0-enabled input").check()
    page.locator("#txt2img-cn0-image input[type=file]").set_input_files(str(shapes))
    page.wait_for_selector("#txt2img-cn0-image img", timeout=10_000)
    page.click("#txt2img-cn0-preprocessor input")
    page.get_by_role("option", name="canny edges", exact=True).click()
    page.wait_for_selector("#txt2img-cn0-setting_a input[type=number]", timeout=10_000)  # canny's thresholds show
    set_number(page, "#txt2img-cn0-setting_a", 50)
    set_number(page, "#txt2img-cn0-setting_b", 150)
    time.sleep(0.3)

    page.click("#txt2img-cn0-preview")
    page.wait_for_selector("#txt2img-cn0-map img", timeout=20_000)
    with Image.open(served_file(page, "#txt2img-cn0-map img")) as im:
        shown = np.asarray(im.convert("RGB"))
    want = np.asarray(preprocess(Image.open(shapes).convert("RGB"), "canny", {"low": 50, "high": 150}))
    assert shown.shape == (32, 32, 3) and np.array_equal(shown, want) and want.max() == 255

    guided, info = generate(page)
    assert 'ControlNet 0: "Module: canny, Model: tiny-canny [' in info and "Threshold A: 50.0" in info
    assert np.abs(guided - plain).max() > VISIBLE  # the same seed, visibly steered by the control
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-controlnet.png"), full_page=True)

    # An enabled unit without an image: a message in the status line, nothing generated.
    page.get_by_role("tab", name="Unit 1").click()  # the visible tab's (the other tabs' accordions are hidden)
    page.locator("#txt2img-cn1-enabled input").check()
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.includes('ControlNet unit 1')",
                           timeout=30_000)
    assert "no control image" in page.input_value("#txt2img-status textarea")

    # PNG info -> txt2img: the units come back from the infotext (unit 1 off again, unit 0 as generated).
    made = tmp_path / "made.png"
    Image.fromarray(guided.astype(np.uint8)).save(made, pnginfo=_info(info))
    page.get_by_role("tab", name="Unit 0").click()
    page.locator("#txt2img-cn0-enabled input").uncheck()
    page.get_by_role("tab", name="PNG info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(str(made))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.includes('ControlNet 0')",
                           timeout=20_000)
    page.get_by_role("button", name="Send to txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img-cn0-enabled input').checked", timeout=10_000)
    assert page.input_value("#txt2img-cn0-setting_a input[type=number]") == "50"
    assert page.input_value("#txt2img-cn0-preprocessor input") == "canny edges"
    assert page.input_value("#txt2img-cn0-model input").startswith("tiny-canny [")
    page.get_by_role("tab", name="Unit 1").click()
    assert not page.locator("#txt2img-cn1-enabled input").is_checked()


def test_a_preprocessor_shows_its_defaults_and_a_value_out_of_range_is_refused(page, tmp_path):
    """No hidden "-1 = default": picking canny shows its own defaults, and a typed -1 (or 300, past the track)
    is refused with ldm's message next to the preview button, the value left as typed."""
    shapes = tmp_path / "shapes.png"
    control_image(3, 32, 32).save(shapes)
    page.locator("#txt2img-controlnet button").first.click()
    page.locator("#txt2img-cn0-image input[type=file]").set_input_files(str(shapes))
    page.wait_for_selector("#txt2img-cn0-image img", timeout=10_000)
    page.click("#txt2img-cn0-preprocessor input")
    page.get_by_role("option", name="canny edges", exact=True).click()
    page.wait_for_selector("#txt2img-cn0-setting_a input[type=number]", timeout=10_000)
    page.wait_for_function("document.querySelector('#txt2img-cn0-setting_a input[type=number]').value === '100'",
                           timeout=10_000)
    assert page.input_value("#txt2img-cn0-setting_b input[type=number]") == "200"
    for slot, value, label in (("setting_a", -1, "Canny low threshold"), ("setting_b", 300, "Canny high threshold")):
        set_number(page, f"#txt2img-cn0-{slot}", value)
        time.sleep(0.3)
        page.click("#txt2img-cn0-preview")
        page.wait_for_function(f"document.querySelector('#txt2img-cn0-status textarea').value.includes('{label}')",
                               timeout=20_000)
        assert f"{label} must be from 1 to 255, got {value}" in page.input_value("#txt2img-cn0-status textarea")
        assert page.input_value(f"#txt2img-cn0-{slot} input[type=number]") == str(value)
        set_number(page, f"#txt2img-cn0-{slot}", 100 if slot == "setting_a" else 200)
    page.click("#txt2img-cn0-preview")  # back in range: the map, and the message gone
    page.wait_for_selector("#txt2img-cn0-map img", timeout=20_000)
    page.wait_for_function("document.querySelector('#txt2img-cn0-status textarea').value === ''", timeout=10_000)


def _info(text: str):
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", text)
    return meta
