import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import torch  # noqa: E402

import tiny  # noqa: E402

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
