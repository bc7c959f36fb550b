"""The UI in headless Chromium: type, click, wait for pictures, paint a mask.

Screenshots go to artifacts/ (gitignored). `LDM_UPDATE_SCREENSHOT=1` also refreshes
docs/screenshot.png (with the demo model when weights/demo exists).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from conftest import served_ui

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
DEMO = ROOT / "weights" / "demo"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def url(base_pipe, tmp_path_factory):
    import ldm

    # The demo model makes a screenshot worth showing; the tiny one only proves the wiring.
    pipe = ldm.load(DEMO, device="cpu", dtype="float32") if (DEMO / "model_index.json").exists() else base_pipe
    with served_ui(tmp_path_factory, pipe, "browser-outputs", preview_every=2) as served:
        yield served.url


def gallery_file(page, tab: str) -> Path:
    """The served file behind the first gallery picture (the server runs on this machine)."""
    src = page.locator(f"#{tab}-gallery img").first.get_attribute("src")
    return Path(unquote(src.split("file=", 1)[1]))


def test_txt2img_generates_into_the_gallery(page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.fill("#txt2img-prompt textarea", "a red circle on a blue background")
    batch = page.locator("#txt2img-batch-size input[type=number]")
    batch.fill("4")
    batch.press("Enter")
    time.sleep(0.3)
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelectorAll('#txt2img-gallery img').length === 4", timeout=120_000)
    page.locator("#txt2img-gallery img").first.click()  # select: shows its parameters
    page.wait_for_function("document.querySelector('#txt2img-info textarea').value.includes('Seed:')", timeout=10_000)
    info = page.input_value("#txt2img-info textarea")
    assert info.startswith("a red circle on a blue background\nSteps: 20")
    with Image.open(gallery_file(page, "txt2img")) as im:
        assert im.format == "PNG" and im.info["parameters"] == info  # PNG, infotext intact
    page.keyboard.press("Escape")
    time.sleep(0.5)
    page.screenshot(path=str(ARTIFACTS / "ui-txt2img.png"))
    if os.environ.get("LDM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "ui-txt2img.png", ROOT / "docs" / "screenshot.png")


def test_inpaint_with_a_painted_mask(page, tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(source)

    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    editor.locator("canvas").first.wait_for(timeout=30_000)
    time.sleep(3)  # an upload before the editor has initialised is shown but not kept (Gradio 6.31)
    editor.locator("input[type=file]").first.set_input_files(str(source))
    time.sleep(2)
    box = editor.locator("canvas").first.bounding_box()
    # The picture is centred in the canvas: paint a short stroke in its upper-left quarter.
    side = min(box["width"], box["height"])
    x0, y0 = box["x"] + box["width"] / 2 - side * 0.3, box["y"] + box["height"] / 2 - side * 0.3
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x0 + i * side * 0.02, y0 + i * side * 0.01, steps=2)
    page.mouse.up()
    time.sleep(2)  # the editor uploads its layers after a change
    page.fill("#inpaint-prompt textarea", "a green square")
    steps = page.locator("#inpaint-steps input[type=number]")
    steps.fill("5")
    steps.press("Enter")
    page.click("#inpaint-generate")
    page.wait_for_selector("#inpaint-gallery img", timeout=120_000)

    with Image.open(gallery_file(page, "inpaint")) as after, Image.open(source) as before:
        diff = np.any(np.asarray(after.convert("RGB")) != np.asarray(before), axis=-1)
    assert diff.shape == (128, 128)
    assert diff[:64, :64].any()  # the painted quarter was repainted
    assert not diff[64:, 64:].any()  # the far quarter is untouched, pixel for pixel
    page.screenshot(path=str(ARTIFACTS / "ui-inpaint.png"))


def test_live_preview_status_and_stop(page):
    steps = page.locator("#txt2img-steps input[type=number]")
    steps.fill("150")
    steps.press("Enter")
    page.fill("#txt2img-prompt textarea", "a long run")
    page.click("#txt2img-generate")
    page.wait_for_selector("#txt2img-preview img", timeout=60_000)  # a latent preview mid-run
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('Step ')",
                           timeout=30_000)
    status = page.input_value("#txt2img-status textarea")
    assert "/150" in status and "left" in status
    page.click("#txt2img-stop")
    # "Stopped." from the Stop button, or the run's own last word if it ended first ("Stopped: 0 images ...").
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('Stopped')",
                           timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "ui-stopped.png"))
    # The queue is free again: a short run goes through at once.
    steps.fill("2")
    steps.press("Enter")
    time.sleep(0.5)
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('Done: 1 image')",
                           timeout=60_000)
    assert page.locator("#txt2img-gallery img").count() == 1


def test_send_to_img2img_and_png_info_to_txt2img(page):
    page.fill("#txt2img-prompt textarea", "send me along")
    page.click("#txt2img-generate")
    page.wait_for_selector("#txt2img-gallery img", timeout=120_000)
    made = gallery_file(page, "txt2img")
    page.get_by_role("button", name="Send to img2img").first.click()
    page.wait_for_selector("#img2img-image img", timeout=10_000)  # the tab switched, the image is there
    assert page.input_value("#img2img-prompt textarea") == "send me along"

    page.get_by_role("tab", name="PNG info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(str(made))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.includes('Seed: ')", timeout=20_000)
    with Image.open(made) as im:
        assert page.input_value("#png-info-text textarea") == im.info["parameters"]
    page.get_by_role("tab", name="txt2img").click()
    page.fill("#txt2img-prompt textarea", "something else")
    page.get_by_role("tab", name="PNG info").click()
    page.get_by_role("button", name="Send to txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'send me along'",
                           timeout=10_000)
