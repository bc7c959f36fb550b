"""Values typed past a slider's track on the inpaint and upscale tabs (issues 17/21): Gradio's Slider would set
them to the track's end without a word. Mask blur, "only masked" padding, outpaint sides and the x4 tile size
and overlap reach ldm, which uses them or refuses them with its message in the status line; the brush radius
is the page's own: used as typed up to `ui.brush.SIZES`, refused with a message outside it. Headless Chromium,
tiny models."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from conftest import served_ui, set_number, wait_for_brush

import tiny

pytestmark = pytest.mark.browser

PURPLE = (120, 60, 200)


@pytest.fixture(scope="module")
def url(base_pipe, tmp_path_factory):
    import ldm
    from ui.state import Pipes

    x4 = ldm.load(tiny.save_upscaler(tmp_path_factory.mktemp("typed-x4")), device="cpu", dtype="float32")
    with served_ui(tmp_path_factory, Pipes(base_pipe, upscale=x4), "typed-outputs", preview_every=0) as served:
        yield served.url


def number(page, elem_id: str) -> str:
    return page.input_value(f"#{elem_id} input[type=number]")


def wait_status(page, tab: str, prefix: str, timeout: float = 120_000) -> str:
    page.wait_for_function(f"document.querySelector('#{tab}-status textarea').value.startsWith({prefix!r})",
                           timeout=timeout)
    return page.input_value(f"#{tab}-status textarea")


def clear_status(page, tab: str) -> None:
    page.evaluate(f"document.querySelector('#{tab}-status textarea').value = ''")


def open_in_editor(page, path, brush: int) -> None:
    """The inpaint tab with `path` in its editor, once the brush has been fitted to it (`brush` px) and the
    picture is drawn (the ring around the pointer shows the brush over it)."""
    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    editor.locator("canvas").first.wait_for(timeout=30_000)
    time.sleep(3)  # an upload before the editor has initialised is shown but not kept (Gradio 6.31)
    editor.locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_function(f"document.querySelector('#inpaint-brush-size input[type=number]').value === '{brush}'",
                           timeout=60_000)  # ~9 s for a 1024 px picture on an idle machine (the editor exports it)
    wait_for_brush(page, brush)  # the number comes first: the editor exports its picture again before the brush


def canvas_shot(page) -> np.ndarray:
    shot = page.locator("#inpaint-editor canvas").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)


def dab(page) -> None:
    """One short stroke at the middle of the editor's canvas."""
    box = page.locator("#inpaint-editor canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 2, y, steps=2)
    page.mouse.up()
    time.sleep(1.5)
    page.mouse.move(5, 5)


def test_inpaint_values_past_the_tracks_are_used_or_refused_by_ldm(page, tmp_path):
    picture = tmp_path / "purple.png"
    Image.new("RGB", (64, 64), PURPLE).save(picture)
    open_in_editor(page, picture, 4)
    set_number(page, "inpaint-brush-size", 64)  # one dab masks the whole picture (a blurred full mask stays full)
    wait_for_brush(page, 64)
    dab(page)
    page.fill("#inpaint-prompt textarea", "a green square")
    set_number(page, "inpaint-steps", 2)
    set_number(page, "inpaint-mask-blur", 100)  # the track ends at 64
    set_number(page, "inpaint-padding", 300)  # the track ends at 256
    page.get_by_role("radio", name="Only masked").check()
    page.click("#inpaint-generate")
    assert wait_status(page, "inpaint", "Done")
    info = page.input_value("#inpaint-info textarea")
    assert "Mask blur: 100" in info and "Masked area padding: 300" in info, info
    assert (number(page, "inpaint-mask-blur"), number(page, "inpaint-padding")) == ("100", "300")

    # Past ldm's own range: its message, the value left as typed.
    set_number(page, "inpaint-mask-blur", 2000)
    clear_status(page, "inpaint")
    page.click("#inpaint-generate")
    text = wait_status(page, "inpaint", "Failed: ")
    assert "mask blur radius must be a number of pixels from 0 to 1024, got 2000" in text, text
    assert number(page, "inpaint-mask-blur") == "2000"

    # Outpainting 600 px to the left (the track ends at 512).
    page.get_by_text("Outpaint (extend the canvas)").click()
    page.locator("#outpaint-left input[type=number]").wait_for(timeout=10_000)
    set_number(page, "inpaint-mask-blur", 4)
    set_number(page, "outpaint-left", 600)
    clear_status(page, "inpaint")
    page.click("#outpaint-generate")
    assert wait_status(page, "inpaint", "Done")
    info = page.input_value("#inpaint-info textarea")
    assert "Outpaint: left 600" in info and "Size: 664x64" in info, info
    assert number(page, "outpaint-left") == "600"


def test_x4_tile_values_past_the_tracks_reach_ldm(page, tmp_path):
    picture = tmp_path / "small.png"
    Image.new("RGB", (16, 16), PURPLE).save(picture)
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#upscale-image input[type=file]").set_input_files(str(picture))
    page.wait_for_selector("#upscale-image img", timeout=10_000)
    page.get_by_text("Model-based methods (x4 model, hires fix)").click()
    page.locator("#upscale-tile-size input[type=number]").wait_for(timeout=10_000)
    # 2000 and 1001 past tracks ending at 1024 and 256: ldm's rule (at most half the tile) names 2000's half.
    set_number(page, "upscale-tile-size", 2000)
    set_number(page, "upscale-tile-overlap", 1001)
    set_number(page, "upscale-steps", 2)
    page.click("#upscale-generate")
    text = wait_status(page, "upscale", "Failed: ")
    assert "tile_overlap must be a whole number from 0 to 1000" in text and "got 1001" in text, text
    assert (number(page, "upscale-tile-size"), number(page, "upscale-tile-overlap")) == ("2000", "1001")


def test_brush_radius_is_used_as_typed_past_the_track_and_refused_outside_its_range(page, tmp_path):
    picture = tmp_path / "big.png"
    Image.new("RGB", (1024, 1024), PURPLE).save(picture)
    open_in_editor(page, picture, 64)  # a sixteenth of the side

    # Outside 1..4096: a message in the tab's status line; the number keeps what was typed, the brush its size.
    for bad in (0, 5000):
        clear_status(page, "inpaint")
        set_number(page, "inpaint-brush-size", bad)
        text = wait_status(page, "inpaint", "Failed: ", timeout=10_000)
        assert f"brush radius must be from 1 to 4096 pixels (of the picture), got {bad}; the brush keeps its size" in text
        assert number(page, "inpaint-brush-size") == str(bad)

    # 300 past the track's 256: a dab 600 px of the 1024 px picture across (256 would be 512, the brush 64 is 128).
    # Typed key by key: "3" is applied for seconds (the editor exports its picture first) while "30" and "300"
    # come; the last one must reach the brush, not be dropped for the pending "3".
    box = page.locator("#inpaint-brush-size input[type=number]")
    box.select_text()
    box.press_sequentially("300", delay=50)
    box.press("Enter")
    page.locator("body").click(position={"x": 5, "y": 5})  # the box loses focus: still 300
    assert number(page, "inpaint-brush-size") == "300"
    wait_for_brush(page, 300)
    before = canvas_shot(page)
    dab(page)
    after = canvas_shot(page)
    changed = np.abs(after - before).sum(-1) > 40
    rows = np.nonzero(changed[:, changed.shape[1] // 2])[0]
    picture_rows = np.nonzero((np.abs(before - PURPLE).sum(-1) < 10).mean(1) > 0.2)[0]
    share = len(rows) / len(picture_rows)  # of the picture's height on screen
    assert 0.55 <= share <= 0.63, (len(rows), len(picture_rows))
