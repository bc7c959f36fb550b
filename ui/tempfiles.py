"""The app's own upload/cache folder and the sweeper that keeps it bounded.

No Gradio import here: app.py calls `private_temp_dir()` and sets GRADIO_TEMP_DIR before Gradio is
imported, because Gradio reads it at import time.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def sweep(folder: Path, max_age: float) -> int:
    """Delete files under `folder` not modified for `max_age` seconds, then the empty folders; -> count.

    Gradio's own `delete_cache` only knows files it tracked (not uploads that failed a check), and
    in one load-test run its background task stopped cleaning altogether; it iterates sets that
    request threads add to, which can end it with "Set changed size during iteration", unlogged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff = time.time() - max_age
    removed = 0
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_symlink() or path.is_file():
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            elif path.is_dir() and not any(path.iterdir()) and path.stat().st_mtime < cutoff:
                path.rmdir()
        except OSError:
            pass  # in use, already gone, not ours to delete
    return removed


def start_sweeper(folder: Path, max_age: float) -> threading.Thread | None:
    """A daemon thread running `sweep` every half of max_age (at most every 10 min); None when off."""
    if not max_age or max_age <= 0:
        return None
    every = max(1.0, min(max_age / 2, 600.0))

    def loop() -> None:
        while True:
            time.sleep(every)
            try:
                sweep(folder, max_age)
            except Exception:  # noqa: BLE001 - a sweep must never stop the sweeper
                log.exception("cleaning %s failed", folder)

    thread = threading.Thread(target=loop, daemon=True, name="ldm-temp-sweeper")
    thread.start()
    return thread


def private_temp_dir() -> Path:
    """Gradio's upload/cache folder for this app: GRADIO_TEMP_DIR if set, else a folder of our own
    (not the shared <tmp>/gradio, whose other users' files the sweeper must not touch)."""
    configured = os.environ.get("GRADIO_TEMP_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"ldm-webui-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
