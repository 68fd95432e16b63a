"""A circuit breaker for calls to a dependency (Redis, a feed, a model store).

States, as in resilience4j:

- ``CLOSED``: calls pass; each outcome (failed? slow?) enters a sliding window, either the last
  ``window_size`` calls (``window_type="count"``) or the calls of the last ``window_size``
  seconds (``"time"``). Once the window holds at least ``min_calls`` calls, a failure rate
  ``>= failure_rate_threshold`` or a slow-call rate ``>= slow_call_rate_threshold`` opens the
  breaker. A call is slow when it takes longer than ``slow_call_s``; a slow call that succeeds
  still returns its result to the caller.
- ``OPEN``: calls are refused at once with :class:`~tickcast.errors.CircuitOpen` (no load on a
  dependency that is down, no caller stuck behind its timeouts). After the open period the
  breaker turns ``HALF_OPEN``.
- ``HALF_OPEN``: up to ``half_open_probes`` trial calls are let through (concurrently or one
  after another); further calls are refused. When all of them succeed the breaker closes with a
  fresh window; when one fails (or is slow) it opens again for ``backoff_multiplier`` times the
  previous open period, capped at ``max_open_s``. Closing resets the open period to ``open_s``.

Outcomes of calls admitted in an earlier state (e.g. a slow call that started while closed and
ends after the breaker opened) are counted in the totals but do not move the state machine.
The clock is injectable so tests step time by hand. The breaker is thread-safe; the guarded
function runs outside its lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from enum import Enum
from typing import Any, Callable, TypeVar

from tickcast.config import BreakerConfig
from tickcast.errors import CircuitOpen, InvalidInput

T = TypeVar("T")


class BreakerState(str, Enum):
    """State of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Failure-rate and slow-call circuit breaker with half-open probes and backoff.

    Parameters
    ----------
    cfg
        Window, thresholds, open period and probe count (:class:`tickcast.config.BreakerConfig`).
    name
        Name of the guarded dependency, used in errors and stats.
    clock
        Monotonic clock in seconds; inject a manual clock in tests.
    ignore_exceptions
        Exception types that are the caller's fault (e.g. ``InvalidInput``): they propagate
        without counting as a failure of the dependency.

    Raises
    ------
    InvalidInput
        Empty name or a clock that is not callable.

    Examples
    --------
    >>> from tickcast.config import BreakerConfig
    >>> now = [0.0]
    >>> cb = CircuitBreaker(BreakerConfig(window_size=4, min_calls=2, open_s=1.0,
    ...                                   half_open_probes=1), "redis", clock=lambda: now[0])
    >>> def down() -> None:
    ...     raise ConnectionError("refused")
    >>> for _ in range(2):
    ...     try:
    ...         cb.call(down)
    ...     except ConnectionError:
    ...         pass
    >>> cb.state.value
    'open'
    >>> now[0] = 1.0
    >>> cb.state.value, cb.call(lambda: "ok"), cb.state.value
    ('half_open', 'ok', 'closed')
    """

    def __init__(
        self,
        cfg: BreakerConfig,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        ignore_exceptions: tuple[type[BaseException], ...] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidInput("breaker name must be a non-empty string", field="name")
        if not callable(clock):
            raise InvalidInput("clock must be callable", field="clock")
        self.cfg = cfg
        self.name = name
        self._clock = clock
        self._ignore = tuple(ignore_exceptions)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._state = BreakerState.CLOSED
        self._window: deque[tuple[float, bool, bool]] = deque()  # (time, failed, slow)
        self._window_failed = 0
        self._window_slow = 0
        self._level = 0  # how many times the open period was multiplied
        self._open_for = self.cfg.open_s
        self._opened_at = 0.0
        self._generation = 0  # bumped on every transition; tags admitted calls
        self._probes_started = 0
        self._probes_ok = 0
        self._totals = {"calls": 0, "successes": 0, "failures": 0, "slow": 0, "rejected": 0,
                        "opened": 0, "ignored": 0}

    # ---- pickling: the lock is rebuilt, times are rebased onto the new clock -----------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_pickled_now"] = self._clock()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        pickled_now = state.pop("_pickled_now")
        self.__dict__.update(state)
        self._lock = threading.Lock()
        # Monotonic clocks differ between processes and hosts: keep ages, not absolute times.
        shift = self._clock() - pickled_now
        self._opened_at += shift
        self._window = deque((t + shift, f, s) for t, f, s in self._window)
        # Probes in flight belonged to the old process; their outcomes will never arrive.
        self._probes_started = self._probes_ok

    # ---- state machine ---------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self._open_for:
            self._state = BreakerState.HALF_OPEN
            self._generation += 1
            self._probes_started = 0
            self._probes_ok = 0

    def _evict(self, now: float) -> None:
        cfg = self.cfg
        window = self._window
        if cfg.window_type == "count":
            while len(window) > cfg.window_size:
                self._drop_oldest()
        else:
            horizon = now - cfg.window_size
            while window and window[0][0] <= horizon:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, failed, slow = self._window.popleft()
        self._window_failed -= failed
        self._window_slow -= slow

    def _clear_window(self) -> None:
        self._window.clear()
        self._window_failed = 0
        self._window_slow = 0

    def _trip(self, now: float, level: int) -> None:
        cfg = self.cfg
        self._state = BreakerState.OPEN
        self._level = level
        self._open_for = min(cfg.open_s * cfg.backoff_multiplier ** level, cfg.max_open_s)
        self._opened_at = now
        self._generation += 1
        self._totals["opened"] += 1
        self._clear_window()

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._level = 0
        self._open_for = self.cfg.open_s
        self._generation += 1
        self._clear_window()

    def acquire(self) -> int:
        """Ask permission for one call; return a token for :meth:`record`.

        For callers that cannot wrap their call in :meth:`call` (e.g. async code). Every token
        must be handed back through :meth:`record` or :meth:`release`.

        Raises
        ------
        CircuitOpen
            The breaker is open, or half-open with all probe slots taken.
        """
        with self._lock:
            now = self._clock()
            self._advance(now)
            if self._state is BreakerState.OPEN:
                self._totals["rejected"] += 1
                wait = max(0.0, self._open_for - (now - self._opened_at))
                raise self._refusal(f"circuit '{self.name}' is open; next probe in {wait:.3f}s", wait)
            if self._state is BreakerState.HALF_OPEN:
                if self._probes_started >= self.cfg.half_open_probes:
                    self._totals["rejected"] += 1
                    raise self._refusal(
                        f"circuit '{self.name}' is half-open with all {self.cfg.half_open_probes} probes in flight", 0.0
                    )
                self._probes_started += 1
            return self._generation

    @staticmethod
    def _refusal(message: str, retry_after_s: float) -> CircuitOpen:
        exc = CircuitOpen(message)
        exc.retry_after_s = retry_after_s  # type: ignore[attr-defined]
        return exc

    def record(self, token: int, duration_s: float, failed: bool) -> None:
        """Record the outcome of a call admitted by :meth:`acquire`.

        A call longer than ``slow_call_s`` is slow. While half-open a slow probe counts as a
        failed one: a dependency that answers that slowly has not recovered.
        """
        with self._lock:
            now = self._clock()
            slow = duration_s > self.cfg.slow_call_s
            totals = self._totals
            totals["calls"] += 1
            totals["failures" if failed else "successes"] += 1
            totals["slow"] += slow
            if token != self._generation:
                return
            if self._state is BreakerState.CLOSED:
                self._window.append((now, failed, slow))
                self._window_failed += failed
                self._window_slow += slow
                self._evict(now)
                n = len(self._window)
                if n >= self.cfg.min_calls and (
                    self._window_failed / n >= self.cfg.failure_rate_threshold
                    or self._window_slow / n >= self.cfg.slow_call_rate_threshold
                ):
                    self._trip(now, level=0)
            elif self._state is BreakerState.HALF_OPEN:
                if failed or slow:
                    self._trip(now, level=self._level + 1)
                else:
                    self._probes_ok += 1
                    if self._probes_ok >= self.cfg.half_open_probes:
                        self._close()

    def release(self, token: int) -> None:
        """Hand back a permit without an outcome (the call raised an ignored exception)."""
        with self._lock:
            self._totals["ignored"] += 1
            if token == self._generation and self._state is BreakerState.HALF_OPEN:
                self._probes_started = max(self._probes_ok, self._probes_started - 1)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` through the breaker and return its result.

        Raises
        ------
        CircuitOpen
            Refused without calling ``fn`` (open, or half-open with no probe slot).
        Exception
            Whatever ``fn`` raised, after recording it as a failure (unless ignored).
        """
        token = self.acquire()
        start = self._clock()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if self._ignore and isinstance(exc, self._ignore):
                self.release(token)
            else:
                self.record(token, self._clock() - start, failed=True)
            raise
        except BaseException:
            # KeyboardInterrupt / SystemExit say nothing about the dependency.
            self.release(token)
            raise
        self.record(token, self._clock() - start, failed=False)
        return result

    @property
    def state(self) -> BreakerState:
        """Current state (an open breaker whose period elapsed reports ``HALF_OPEN``)."""
        with self._lock:
            self._advance(self._clock())
            return self._state

    def reset(self) -> None:
        """Force the breaker closed with an empty window and the initial open period."""
        with self._lock:
            totals = self._totals
            self._reset()
            self._totals = totals

    def stats(self) -> dict[str, Any]:
        """JSON-ready counters: state, window rates, open period and lifetime totals."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            if self._state is BreakerState.CLOSED and self.cfg.window_type == "time":
                self._evict(now)
            n = len(self._window)
            retry_in = 0.0
            if self._state is BreakerState.OPEN:
                retry_in = max(0.0, self._open_for - (now - self._opened_at))
            return {
                "name": self.name,
                "state": self._state.value,
                "window_calls": n,
                "window_failures": self._window_failed,
                "window_slow": self._window_slow,
                "failure_rate": self._window_failed / n if n else 0.0,
                "slow_rate": self._window_slow / n if n else 0.0,
                "open_for_s": self._open_for,
                "retry_in_s": retry_in,
                "half_open_probes_ok": self._probes_ok if self._state is BreakerState.HALF_OPEN else 0,
                **self._totals,
            }
