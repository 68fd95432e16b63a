"""A daemon thread that calls one function at a fixed period (the replica's refreshers)."""

from __future__ import annotations

import threading
from typing import Callable


class PeriodicThread:
    """Calls ``step`` every ``period_s`` seconds on a daemon thread, from :meth:`start` until
    :meth:`stop`. ``step`` handles its own errors: one that escapes ends the thread, which
    the replica's health check then reports.
    """

    def __init__(self, name: str, period_s: float, step: Callable[[], object]) -> None:
        self.name = name
        self.period_s = period_s
        self._step = step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Started and not ended."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (the first call happens one period from now)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to end and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._step()
