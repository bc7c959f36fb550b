"""The running generations, by browser session, so the Stop button reaches the worker thread."""
from __future__ import annotations

import threading


class Jobs:
    """Cancel flags of the running generations, by session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, set()).add(flag)
        return flag

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            self._flags.get(session, set()).discard(flag)

    def cancel(self, session: str) -> int:
        """Ask every run of this session to stop at its next step; returns how many were asked."""
        with self._lock:
            flags = [f for f in self._flags.get(session, ()) if not f.is_set()]
        for f in flags:
            f.set()
        return len(flags)

    def active(self) -> int:
        """Runs not yet asked to stop, over all sessions (forgetting those that were)."""
        with self._lock:
            for session in list(self._flags):
                self._flags[session] = {f for f in self._flags[session] if not f.is_set()}
                if not self._flags[session]:
                    del self._flags[session]
            return sum(len(flags) for flags in self._flags.values())
