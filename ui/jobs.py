"""The running generations, by browser session, so the Stop button reaches the worker thread."""
from __future__ import annotations

import threading


class Jobs:
    """Cancel flags of the running generations, by session."""

    def __init__(self) -> None:
        self._lock = threading.Condition()  # notified when a run finishes (`stop` waits for that)
        self._flags: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, set()).add(flag)
        return flag

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            self._flags.get(session, set()).discard(flag)
            self._lock.notify_all()

    def cancel(self, session: str) -> int:
        """Ask every run of this session to stop at its next step; returns how many were asked."""
        with self._lock:
            flags = [f for f in self._flags.get(session, ()) if not f.is_set()]
        for f in flags:
            f.set()
        return len(flags)

    def stop(self, session: str, timeout: float) -> int:
        """`cancel`, then wait up to `timeout` seconds for those runs to finish (they stop at their next step),
        so that their last progress message is out before the caller reports them stopped. Returns how many
        were asked."""
        with self._lock:
            asked = {f for f in self._flags.get(session, ()) if not f.is_set()}
            for f in asked:
                f.set()
            self._lock.wait_for(lambda: not asked & self._flags.get(session, set()), timeout)
        return len(asked)

    def active(self) -> int:
        """Runs not yet asked to stop, over all sessions (forgetting those that were)."""
        with self._lock:
            for session in list(self._flags):
                self._flags[session] = {f for f in self._flags[session] if not f.is_set()}
                if not self._flags[session]:
                    del self._flags[session]
            return sum(len(flags) for flags in self._flags.values())
