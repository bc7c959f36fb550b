"""The txt2img Refiner accordion in headless Chromium, on an SDXL models folder: pick the refiner and a switch
point, generate; the picture differs from the same seed without it, the infotext names the refiner with its
hash, and PNG info puts refiner and switch point back into the accordion."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import served_ui
from PIL import Image

import tiny_sdxl
from test_browser_controlnet import _info, generate, set_number

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ldm
    from ui.models import Models

    root = tmp_path_factory.mktemp("browser-refiner") / "models"
    tiny_sdxl.save_model(root / "Stable-diffusion" / "xl")
    tiny_sdxl.save_refiner(root / "Stable-diffusion" / "xl-refiner")

    def load(spec):
        return ldm.load(spec, models_dir=root, device="cpu", dtype="float32")

    pipe = load("xl")
    with served_ui(tmp_path_factory, pipe, "browser-refiner-outputs", Models(pipe, loader=load, spec="xl"),
                   preview_every=0) as served:
        yield served.url


def test_refiner_from_the_accordion_and_back_from_png_info(page, tmp_path):
    page.fill("#txt2img-prompt textarea", "a lighthouse")
    page.fill("#txt2img-negative textarea", "fog")
    set_number(page, "#txt2img-steps", 4)
    set_number(page, "#txt2img-width", 32)
    set_number(page, "#txt2img-height", 32)
    page.locator("#txt2img-seed input").fill("5")
    time.sleep(0.3)
    plain, plain_info = generate(page)
    assert "Refiner" not in plain_info

    page.locator("#txt2img-refiner button").first.click()  # open the accordion
    page.click("#txt2img-refiner-checkpoint input")
    page.get_by_role("option", name="xl-refiner", exact=True).click()
    set_number(page, "#txt2img-refiner-switch-at", 0.5)
    time.sleep(0.3)
    refined, info = generate(page)
    assert "Refiner: xl-refiner [" in info and "Refiner switch at: 0.5" in info
    assert np.abs(refined - plain).max() > 0  # the last half of the steps ran on the refiner
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-refiner.png"), full_page=True)

    # PNG info -> txt2img: refiner and switch point come back (after setting them to something else)
    made = tmp_path / "made.png"
    Image.fromarray(refined.astype(np.uint8)).save(made, pnginfo=_info(info))
    page.click("#txt2img-refiner-checkpoint input")
    page.get_by_role("option", name="None", exact=True).click()
    set_number(page, "#txt2img-refiner-switch-at", 0.8)
    page.get_by_role("tab", name="PNG info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(str(made))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.includes('Refiner switch at')",
                           timeout=20_000)
    page.get_by_role("button", name="Send to txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img-refiner-checkpoint input').value.startsWith('xl-refiner')",
                           timeout=10_000)
    assert page.input_value("#txt2img-refiner-switch-at input[type=number]") == "0.5"
