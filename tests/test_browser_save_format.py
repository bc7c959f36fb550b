"""Saving in JPEG or WebP (issue 17 item 8, --save-format): the file carries its infotext in the EXIF
UserComment as A1111 writes it (`UNICODE\\0` + UTF-16), the gallery and the history show it, and PNG
info reads it back. Headless Chromium on the tiny model."""
from __future__ import annotations

import time

import pytest
from PIL import Image
from conftest import served_ui

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(base_pipe, tmp_path_factory):
    with served_ui(tmp_path_factory, base_pipe, "webp-outputs", preview_every=0, save_format="webp") as served:
        yield {"url": served.url, "outputs": served.outputs}


@pytest.fixture
def url(app):
    return app["url"]


def test_webp_outputs_carry_their_parameters_in_exif(page, app):
    box = page.locator("#txt2img-steps input[type=number]")
    box.fill("2")
    box.press("Enter")
    time.sleep(0.3)
    page.fill("#txt2img-prompt textarea", "a webp circle")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status textarea').value.startsWith('Done')",
                           timeout=120_000)
    saved = list(app["outputs"].rglob("*.*"))
    assert len(saved) == 1 and saved[0].suffix == ".webp", saved
    raw = Image.open(saved[0]).getexif().get_ifd(0x8769)[0x9286]
    assert raw.startswith(b"UNICODE\0") and raw[8:].decode("utf-16-be").startswith("a webp circle\n")

    page.get_by_role("tab", name="PNG info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(str(saved[0]))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.startsWith('a webp circle')",
                           timeout=20_000)

    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#history-page').innerText.includes('1 image(s)')", timeout=20_000)
    page.wait_for_selector("#history-gallery img", timeout=10_000)
