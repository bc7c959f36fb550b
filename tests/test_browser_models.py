"""The models bar and the extra-networks panel in headless Chromium: switch the checkpoint in the dropdown,
add a LoRA tag from the panel, generate; the infotext names the new model and the LoRA's hash."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, launched

import models_folder

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM}", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ui import build
    from ui.models import Models
    from ui.state import Options, Pipes

    root = models_folder.build(tmp_path_factory.mktemp("browser-models") / "models")
    load = models_folder.loader(root)
    pipe = load("alpha")
    demo = build(Pipes(pipe), Options(outputs=tmp_path_factory.mktemp("browser-outputs"), preview_every=0),
                 Models(pipe, loader=load, spec="alpha"))
    del pipe
    with launched(demo) as url:
        yield url, demo.ldm_context


@pytest.fixture
def page(app):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app[0])
        page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
        yield page
        browser.close()


def test_switch_checkpoint_and_generate_with_a_lora_from_the_panel(page, app):
    ctx = app[1]
    page.click("#model-checkpoint input")
    page.get_by_role("option", name="beta", exact=True).click()
    page.wait_for_function("document.querySelector('#model-status textarea').value.includes('Serving beta')",
                           timeout=60_000)
    assert ctx.models.checkpoint == "beta"

    page.fill("#txt2img-prompt textarea", "a cube")
    page.click("#txt2img-networks button")  # open the accordion
    page.locator("#txt2img-networks-table").get_by_text("style", exact=True).click()
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'a cube <lora:style:1>'",
                           timeout=10_000)

    page.locator("#txt2img-steps input[type=number]").fill("2")
    page.locator("#txt2img-steps input[type=number]").press("Enter")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelectorAll('#txt2img-gallery img').length === 1", timeout=120_000)
    page.locator("#txt2img-gallery img").first.click()
    page.wait_for_function("document.querySelector('#txt2img-info textarea').value.includes('Lora hashes')",
                           timeout=10_000)
    info = page.input_value("#txt2img-info textarea")
    library = ctx.pipes.base.library
    lora_hash = library.short_hash(library.find("loras", "style"))
    assert info.startswith("a cube <lora:style:1>\n")
    assert "Model: beta," in info and f'Lora hashes: "style: {lora_hash}"' in info
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "models-bar.png"))
