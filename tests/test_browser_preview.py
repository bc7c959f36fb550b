"""Live previews in the model's own colours (issue 17 item 14), as a person sees them: on the demo model,
whose VAE is not SD 1.x's, the last live preview of a run shows the colours of the picture it becomes.
Headless Chromium on the demo model.

With the linear latent -> RGB map fitted at load (`ldm.latents.fit_preview_map`) this failed: the demo
model's blue background showed brown (mean error ~92/255 per channel; even a map fitted on finished demo
pictures' own latents is off by ~24, the demo VAE is far from linear). Its VAE is small, so previews
are now its own decodes (`ldm.previews`)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from conftest import ROOT, served_ui

pytestmark = pytest.mark.browser

DEMO = ROOT / "weights" / "demo"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ldm

    if not DEMO.exists():
        pytest.skip("the demo model is not in weights/demo")
    pipe = ldm.load(DEMO, device="cpu", dtype="float32")
    with served_ui(tmp_path_factory, pipe, "preview-outputs", preview_every=1) as served:
        yield served.url


def fetched(page, src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(float)


def test_the_last_preview_has_the_pictures_colours(page):
    page.fill("#txt2img-prompt textarea", "a red circle on a blue background")
    page.locator("#txt2img-seed input").fill("3")
    page.click("#txt2img-generate")
    last = None
    deadline = time.time() + 120
    while time.time() < deadline:
        src = page.evaluate("document.querySelector('#txt2img-preview img')?.src || null")
        last = src or last
        if page.input_value("#txt2img-status textarea").startswith(("Done", "Failed")):
            break
        time.sleep(0.05)
    assert page.input_value("#txt2img-status textarea").startswith("Done")
    assert last, "no live preview was shown"
    preview = fetched(page, last)
    final = fetched(page, page.locator("#txt2img-gallery img").first.get_attribute("src"))
    # Both averaged over an 8x8 grid, whatever the preview method and size.
    side = final.shape[0] // 8
    final = final.reshape(8, side, 8, side, 3).mean((1, 3))
    preview = np.asarray(Image.fromarray(preview.astype(np.uint8)).resize((8, 8), Image.Resampling.BOX)).astype(float)
    error = np.abs(preview - final).mean()
    assert error < 30, error  # mean error per channel, 0-255
