"""The app's own upload/cache folder and the sweeper that keeps it bounded; per-process temp
folders (`owned_temp_dir`: the Saver's temp PNGs) removed at exit, and those of dead processes swept.

No Gradio import here: app.py calls `private_temp_dir()` and sets GRADIO_TEMP_DIR before Gradio is
imported, because Gradio reads it at import time.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
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


def owned_temp_dir(owner: object, prefix: str) -> Path:
    """A new `<tmp>/<prefix><pid>-xxxx` folder, deleted with everything in it when `owner` is
    garbage-collected or the process exits. Folders of the same prefix left by processes that are
    gone (killed, crashed) are deleted first."""
    sweep_dead(Path(tempfile.gettempdir()), prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    weakref.finalize(owner, shutil.rmtree, str(path), True)
    return path


def sweep_dead(folder: Path, prefix: str) -> int:
    """Delete `folder/<prefix><pid>-*` folders of this user whose process no longer exists; -> count."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = 0
    for path in folder.glob(prefix + "*"):
        match = pattern.match(path.name)
        try:
            if (match and path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
                    and not pid_alive(int(match[1]))):
                shutil.rmtree(path)
                removed += 1
        except OSError:
            pass  # in use, already gone, not ours to delete
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
