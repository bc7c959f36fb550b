import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import torch  # noqa: E402

import tiny  # noqa: E402

# Debian's Chromium, driven by Playwright (Playwright's own browser download does not work here).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    """A loopback port nobody listens on right now, for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_missing() -> str | None:
    """Why browser tests cannot run here (Debian's Chromium or the playwright package missing), or None."""
    if not CHROMIUM.exists():
        return f"browser tests need Chromium at {CHROMIUM}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need the playwright package"
    return None


@contextlib.contextmanager
def launched(demo):
    """`demo` (a built Gradio app) served on a free loopback port; yields its URL and closes it afterwards."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


class Served(NamedTuple):
    url: str
    demo: Any
    outputs: Path


@contextlib.contextmanager
def served_ui(tmp_path_factory, pipes, outputs: str, models=None, **options):
    """The app's UI (`ui.build`) for `pipes` (a pipeline or a `ui.state.Pipes`) and `models`, with
    `Options(**options)` and its outputs in a new temporary folder named `outputs`, on a free loopback
    port: yields Served(url, demo, outputs folder) and closes it afterwards."""
    from ui import build
    from ui.state import Options, Pipes

    folder = tmp_path_factory.mktemp(outputs)
    demo = build(pipes if isinstance(pipes, Pipes) else Pipes(pipes), Options(outputs=folder, **options),
                 *([] if models is None else [models]))
    del pipes, models  # the demo holds them (a checkpoint switch can free the first pipeline)
    with launched(demo) as url:
        yield Served(url, demo, folder)


def set_number(page, elem_id: str, value) -> None:
    """Type `value` into the number box of the slider with `elem_id` in a Playwright page, as a user would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    time.sleep(0.3)


NEXT_FRAME = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


def _canvas_shot(canvas):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)


def _brush_ring(page, editor: str) -> tuple[float | None, bool, tuple[float, float]]:
    """(radius in screen px, dot shown, the picture's half width and height on screen) of the ring Gradio's
    image editor draws around the pointer for its brush, from two shots with the pointer at the middle of
    the canvas and 6 px right of it: what differs is the ring and its centre dot at both places. The
    radius is None when only the dots show (a white ring past the picture is invisible on the white
    canvas). The pointer cannot hide the ring: it stays where it was when the pointer leaves the canvas."""
    import numpy as np

    canvas = page.locator(f"{editor} canvas").first
    box = canvas.bounding_box()
    x, y = box["width"] / 2, box["height"] / 2
    shots = []
    for dx in (0, 6):
        page.mouse.move(box["x"] + x + dx - 1, box["y"] + y)
        page.mouse.move(box["x"] + x + dx, box["y"] + y)
        page.evaluate(NEXT_FRAME)
        shots.append(_canvas_shot(canvas))
    page.mouse.move(5, 5)
    ys, xs = np.nonzero(np.abs(shots[0] - shots[1]).sum(-1) > 60)
    distance = np.hypot(xs - (x + 3), ys - y)  # from between the two centres: the rings' sides average out
    ring = distance[distance > 7]
    row, column = shots[0][shots[0].shape[0] // 2], shots[0][:, shots[0].shape[1] // 2]
    half = (float((row.min(-1) < 250).sum() / 2), float((column.min(-1) < 250).sum() / 2))  # not the white canvas
    return (float(np.median(ring)) if len(ring) > 20 else None), bool((np.hypot(xs - x, ys - y) <= 2).any()), half


def wait_for_brush(page, radius: float, editor: str = "#inpaint-editor", timeout: float = 60) -> None:
    """Until the editor's brush is `radius` px of the picture, as the ring around the pointer shows it
    (Gradio 6.31 applies a new brush only after exporting the editor's picture: seconds for a large one).
    A ring past the picture's corners counts once only its centre dot shows."""
    import math

    zoom = float(page.inner_text(f"{editor} .zoom-number").strip().rstrip("%")) / 100
    expected = radius * zoom  # screen px
    deadline = time.monotonic() + timeout
    seen = half = None
    while time.monotonic() < deadline:
        seen, dot, half = _brush_ring(page, editor)
        if dot and min(half) > 0:
            if expected > math.hypot(*half) + 3:
                if seen is None:
                    return
            elif seen is not None and abs(seen - expected) <= 2 + 0.03 * expected:
                return
        time.sleep(0.2)
    ring = "not drawn past its centre dot" if seen is None else f"{seen:.1f} px"
    raise AssertionError(f"the editor's brush ring is {ring}, not {expected:.1f} px (radius {radius} at zoom "
                         f"{zoom:.2f}; the picture's half width and height {half} px) after {timeout} s")


# Tiny models gain nothing from threads, and spinning OpenMP threads collapse when the cores are busy.
torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    return tiny.save_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def vpred_model(tmp_path_factory) -> Path:
    sched = {**tiny.SD15_SCHEDULER, "prediction_type": "v_prediction"}
    return tiny.save_model(tmp_path_factory.mktemp("tiny-vpred"), scheduler=sched, unet_model=tiny.unet(seed=3))


@pytest.fixture(scope="session")
def base_pipe(base_model):
    import ldm

    return ldm.load(base_model, device="cpu", dtype="float32")  # parity with diffusers needs fp32; the CPU default may be bf16


def pytest_configure(config):
    # Browser tests (tests/test_browser.py) start headless Chromium; deselect with -m "not browser".
    config.addinivalue_line("markers", "browser: drives the web UI in headless Chromium via Playwright")
    config.addinivalue_line("markers", "slow: load test, minutes (CI runs it as a separate step: -m slow)")


def pytest_collection_modifyitems(config, items):
    # The one skip rule for tests marked `browser` (every tests/test_browser_*.py module is): no Chromium or
    # no playwright, no browser test, with the reason.
    marked = [item for item in items if item.get_closest_marker("browser")]
    reason = browser_missing() if marked else None
    for item in marked if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


# ---- web server tests (tests/test_web_*.py, tests/test_load.py) ----------------------------------


class WebApp:
    """A real app on loopback, launched with app.py's security settings (ui.security.launch_kwargs)."""

    def __init__(self, demo, port: int, outputs, auth):
        self.demo, self.port, self.outputs, self.auth = demo, port, outputs, auth
        self.url = f"http://127.0.0.1:{port}/"
        self.ctx = demo.ldm_context

    def client(self, **kwargs):
        from gradio_client import Client

        return Client(self.url, auth=self.auth[0] if self.auth else None, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, for a module's browser tests (they skip without it)."""
    if reason := browser_missing():
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    """The UI at the module's `url` fixture, loaded, in a 1400x1000 page."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#txt2img-prompt textarea", timeout=60_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def launch_web_app(tmp_path_factory):
    """launch_web_app(pipes, auth=[("u", "p")], **Options fields) -> WebApp; all closed after the module."""
    from ui import build
    from ui.state import Options
    from ui.security import launch_kwargs

    apps = []

    def launch(pipes, *, auth=None, outputs="default", **options) -> WebApp:
        if outputs == "default":
            outputs = tmp_path_factory.mktemp("web-outputs")
        opts = Options(outputs=outputs, **options)
        demo = build(pipes, opts)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs(auth=auth, max_upload_mb=opts.max_upload_mb, outputs=outputs))
        app = WebApp(demo, port, outputs, auth)
        apps.append(app)
        return app

    yield launch
    for app in apps:
        app.demo.close()

