"""The page header (issue 17 item 10): the serving model, its family and native size, and for the demo
model what it can draw; tooltips on the unlabelled icon buttons. Headless Chromium on the demo model."""
from __future__ import annotations

import pytest
from conftest import ROOT, served_ui

pytestmark = pytest.mark.browser

DEMO = ROOT / "weights" / "demo"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ldm

    if not DEMO.exists():
        pytest.skip("the demo model is not in weights/demo")
    pipe = ldm.load(DEMO, device="cpu", dtype="float32")
    with served_ui(tmp_path_factory, pipe, "header-outputs", preview_every=0) as served:
        yield served.url


def test_header_names_the_model_family_native_size_and_what_the_demo_draws(page):
    text = page.inner_text("#model-header")
    assert "Model demo" in text.replace("\n", " ")
    assert "Stable Diffusion 1.x/2.x" in text and "64×64 px" in text
    assert "circle, square or triangle" in text and "a red circle on a blue background" in text
    assert page.input_value("#txt2img-width input[type=number]") == "64"  # native size by default


def test_unlabelled_icon_buttons_have_tooltips(page):
    for elem_id in ("model-refresh", "txt2img-random-seed", "txt2img-reuse-seed"):
        assert page.get_attribute(f"#{elem_id}", "title"), elem_id


def test_other_models_get_no_demo_note(base_pipe):
    from ui import header

    line = header.model_line(base_pipe)
    assert f"{base_pipe.default_size}×{base_pipe.default_size} px" in line and header.DEMO_NOTE not in line
