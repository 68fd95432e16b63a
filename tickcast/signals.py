"""SIGINT and SIGTERM for a ``tickcast`` command: stop, and clean up what it started.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM end the process on the spot,
which skips every ``finally:`` block: an embedded Redis, a private Ray instance or a detached
server the command started would outlive it. :func:`handled` (around every CLI command) makes both
signals raise :class:`Interrupted` in the main thread instead, so that a signal unwinds a
command exactly as an error does, through its clean-up.

* The first signal raises (unless the command is in :meth:`StopSignals.graceful` mode, where it
  only sets :attr:`StopSignals.stop`: a server that has finished starting leaves its serving
  loop and stops normally).
* Later signals are noted and ignored, so the clean-up started by the first one is never cut
  short halfway (SIGKILL still ends the process at once).

:class:`Interrupted` derives from ``KeyboardInterrupt``: ``except Exception`` clauses, of which
wiring code has many, do not swallow it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived: the command unwinds through its clean-up.

    >>> Interrupted(signal.SIGTERM).exit_code, Interrupted(signal.SIGTERM).name
    (143, 'SIGTERM')
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM handling of the main thread (see the module docstring).

    Attributes
    ----------
    stop
        Set by the first signal.
    received
        Number of the first signal received, None before.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received: int | None = None
        self._graceful = False
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopSignals:
        """Handle SIGINT and SIGTERM (from the main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            # os.write: a print here could re-enter a write the main thread is in.
            os.write(2, f"{signal.Signals(signum).name}: already stopping (cleaning up what "
                        f"was started); SIGKILL ends it at once\n".encode())
            return
        self.received = signum
        self.stop.set()
        if not self._graceful:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def graceful(self) -> Iterator[threading.Event]:
        """Within the block a signal only sets :attr:`stop` (yielded); one that arrived before
        the block is raised on entry."""
        if self.received is not None:
            raise Interrupted(self.received)
        self._graceful = True
        try:
            yield self.stop
        finally:
            self._graceful = False


_installed: StopSignals | None = None


@contextlib.contextmanager
def handled() -> Iterator[StopSignals | None]:
    """A :class:`StopSignals` installed for the block (the CLI runs each command in one);
    None, and nothing installed, outside the main thread."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous, _installed = _installed, StopSignals().install()
    try:
        yield _installed
    except KeyboardInterrupt as exc:
        # Ray's blocking calls run the handler, then raise a KeyboardInterrupt of their own
        # in place of the handler's exception: name the signal that caused it again.
        if isinstance(exc, Interrupted) or _installed.received is None:
            raise
        raise Interrupted(_installed.received) from None
    finally:
        _installed.uninstall()
        _installed = previous


def installed() -> StopSignals | None:
    """The handler :func:`handled` set up in this process, if any (None in library use)."""
    return _installed


__all__ = ["STOP_SIGNALS", "Interrupted", "StopSignals", "handled", "installed"]
