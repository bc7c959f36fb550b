"""The models bar and the extra-networks panel in headless Chromium: switch the checkpoint in the dropdown,
add a LoRA tag from the panel, generate; the infotext names the new model and the LoRA's hash."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import served_ui

import models_folder

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ui.models import Models

    root = models_folder.build(tmp_path_factory.mktemp("browser-models") / "models")
    load = models_folder.loader(root)
    pipe = load("alpha")
    with served_ui(tmp_path_factory, pipe, "browser-outputs", Models(pipe, loader=load, spec="alpha"),
                   preview_every=0) as served:
        del pipe
        yield served.url, served.demo.ldm_context


@pytest.fixture
def url(app):
    return app[0]


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
