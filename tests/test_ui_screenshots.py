"""tools/ui_screenshots.py (the docs' pictures of every tab) still runs against the current UI: it
drives every tab on the demo model and writes one screenshot per tab."""
from __future__ import annotations

import sys

import pytest
from PIL import Image
from conftest import CHROMIUM, ROOT

pytestmark = pytest.mark.browser


def test_the_screenshot_tool_shoots_every_tab(tmp_path):
    if not (ROOT / "weights" / "demo").exists():
        pytest.skip("the demo model is not in weights/demo")
    sys.path.insert(0, str(ROOT / "tools"))
    import ui_screenshots

    shots = ui_screenshots.main(["--out", str(tmp_path), "--steps", "2", "--chromium", str(CHROMIUM)])
    assert [p.name for p in shots] == [f"ui-{tab}.png" for tab in ui_screenshots.TABS]
    for path in shots:
        with Image.open(path) as image:
            assert image.width == 1400 and image.height > 600, path
    assert not (ROOT / "docs" / "screenshot.png").samefile(shots[0])
