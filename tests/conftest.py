import contextlib
import os
import socket
import sys
import time
from pathlib import Path

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


@contextlib.contextmanager
def launched(demo):
    """`demo` (a built Gradio app) served on a free loopback port; yields its URL and closes it afterwards."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def set_number(page, elem_id: str, value) -> None:
    """Type `value` into the number box of the slider with `elem_id` in a Playwright page, as a user would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    time.sleep(0.3)


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
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")
    with playwright_api.sync_playwright() as p:
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

