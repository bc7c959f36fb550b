"""The model hash of a big checkpoint (issue 17 item 15): computed once per loaded weights, in the
background from the moment the UI has the model, never blocking a first request's sampling or
another model's hash; the infotext still carries the right hash. A sparse file stands in for the
multi-GB weights (reading it costs time, not disk)."""
from __future__ import annotations

import errno
import gc
import hashlib
import os
import shutil
import threading
import time
import weakref

import pytest

import ldm
import tiny

BIG = 384 << 20  # bytes of fake weights: a few seconds of hashing on a busy CI core


@pytest.fixture
def big_pipe(base_model, tmp_path):
    folder = tmp_path / "big-model"
    shutil.copytree(base_model, folder)
    pipe = ldm.load(folder, device="cpu", dtype="float32")
    with open(folder / "unet" / "zz-fake-weights.safetensors", "wb") as fh:  # hashed with the U-Net's weights
        fh.truncate(BIG)
    return pipe


def expected_hash(pipe) -> str:
    h = hashlib.sha256()
    for f in sorted((pipe.components.path / "unet").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def test_first_request_samples_while_the_hash_is_computed_and_its_infotext_has_the_hash(big_pipe):
    from ui import streaming, tasks
    from ui.state import Context, Options, Pipes

    ctx = Context(Pipes(big_pipe), Options(outputs=None, preview_every=0))  # the UI starts hashing here
    started = time.monotonic()
    first_step = None
    out = None
    for item in tasks.txt2img(ctx, prompt="a red circle", steps=2, seed=1):
        if isinstance(item, streaming.Step) and first_step is None:
            first_step = time.monotonic() - started
            hashed_at_first_step = big_pipe.components.weights_hash.known
        elif isinstance(item, streaming.Output):
            out = item
    assert first_step is not None and hashed_at_first_step is None, "sampling waited for the hash"
    assert f"Model hash: {expected_hash(big_pipe)}" in out.infotexts[0]


def test_the_hash_is_shared_by_pipelines_on_the_same_weights(big_pipe):
    """A VAE switch or other options make a new Pipeline on the same weights: no second multi-GB read."""
    value = big_pipe.model_hash
    started = time.monotonic()
    assert big_pipe.with_options(max_batch=2).model_hash == value
    assert big_pipe.with_vae(None).model_hash == value
    assert time.monotonic() - started < 0.5


def test_one_models_hash_does_not_wait_for_anothers(big_pipe, base_pipe):
    """While the big model is hashed, a small model's hash (another tab's pipeline, the API's model list)
    is answered at once."""
    big_pipe.start_hashing()
    time.sleep(0.2)
    assert big_pipe.components.weights_hash.known is None  # still reading
    small = base_pipe.with_options()
    done = threading.Event()
    threading.Thread(target=lambda: (small.model_hash, done.set()), daemon=True).start()
    assert done.wait(2.0), "the small model's hash waited for the big one's"
    assert big_pipe.model_hash == expected_hash(big_pipe)  # waits for the background computation


def test_a_folder_model_is_hashed_once_through_the_folders_cache(tmp_path):
    """Model.model_hash of a checkpoint from the models folder is the folder's cached hash (ldm-hashes.json):
    a restart does not read the file again."""
    lib = ldm.Library(tmp_path / "models")
    folder = tiny.save_model(lib.root / "Stable-diffusion" / "m")
    pipe = ldm.load(folder, device="cpu", dtype="float32", models_dir=lib.root)
    value = pipe.model_hash
    assert lib.cached_short_hash(lib.entry_at("checkpoints", folder)) == value


class GatedWeights:
    """A FIFO among a model's hashed U-Net files: hashing blocks opening it until `release()` writes
    `DATA`, so a test holds the hash mid-computation without patching how it is computed."""

    DATA = b"gated weights"

    def __init__(self, folder):
        self.fifo = folder / "unet" / "zz-gate.safetensors"  # sorted last: hashed after the real weights
        os.mkfifo(self.fifo)

    def release(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a hash opens it to read
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        os.write(fd, self.DATA)
        os.close(fd)

    def expected_hash(self) -> str:
        h = hashlib.sha256()
        for f in sorted((self.fifo.parent).glob("*.safetensors")):
            h.update(self.DATA if f == self.fifo else f.read_bytes())
        return h.hexdigest()[:10]


def test_a_background_hash_does_not_keep_a_dropped_model_alive(base_model, tmp_path):
    """While its file is being read, a model's hash holds only the path: dropping the model (a checkpoint
    switch) frees its pipeline at once, and the hash still completes for the handle."""
    folder = shutil.copytree(base_model, tmp_path / "m")
    pipe = ldm.load(folder, device="cpu", dtype="float32")
    gate = GatedWeights(folder)
    handle = pipe.start_hashing()
    dropped = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert dropped() is None, "the hashing thread keeps the dropped model alive"
    assert handle.known is None  # still waiting for the gated file
    gate.release()
    deadline = time.monotonic() + 30
    while handle.known is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handle.known == gate.expected_hash()
