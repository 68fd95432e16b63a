"""CircuitBreaker state machine with a hand-stepped clock."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest

from tickcast.config import BreakerConfig, load_settings
from tickcast.errors import CircuitOpen, InvalidInput
from tickcast.storage.breaker import BreakerState, CircuitBreaker


class ManualClock:
    """A picklable clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cfg(**kw: Any) -> BreakerConfig:
    base = dict(window_type="count", window_size=10, min_calls=4, failure_rate_threshold=0.5,
                slow_call_s=1.0, slow_call_rate_threshold=0.75, open_s=1.0, backoff_multiplier=2.0,
                max_open_s=5.0, half_open_probes=2)
    base.update(kw)
    return BreakerConfig(**base)


def ok() -> str:
    return "ok"


def boom() -> None:
    raise ConnectionError("down")


def fail(cb: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            cb.call(boom)


def test_opens_at_failure_rate_after_min_calls() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(), "redis", clock)
    fail(cb, 3)  # 3/3 failed but below min_calls: stays closed
    assert cb.state is BreakerState.CLOSED
    cb.call(ok)  # the 4th call reaches min_calls: 3 failed of 4 = 75% >= 50%
    assert cb.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as err:
        cb.call(ok)
    assert err.value.status == 503 and "redis" in err.value.message
    assert err.value.retry_after_s == pytest.approx(1.0)  # type: ignore[attr-defined]
    stats = cb.stats()
    assert stats["rejected"] == 1 and stats["opened"] == 1 and stats["state"] == "open"


def test_failure_rate_threshold_is_inclusive_and_successes_keep_it_closed() -> None:
    cb = CircuitBreaker(cfg(min_calls=4), "x", ManualClock())
    for _ in range(3):
        cb.call(ok)
    fail(cb, 1)  # 1/4 = 25%
    assert cb.state is BreakerState.CLOSED
    fail(cb, 2)  # 3/6 = 50% -> opens
    assert cb.state is BreakerState.OPEN


def test_count_window_forgets_old_calls() -> None:
    cb = CircuitBreaker(cfg(window_size=4, min_calls=4, failure_rate_threshold=0.75), "x", ManualClock())
    fail(cb, 2)
    for _ in range(4):
        cb.call(ok)  # the two failures slide out of the 4-call window
    assert cb.stats()["window_failures"] == 0
    fail(cb, 2)  # 2/4 < 75%
    assert cb.state is BreakerState.CLOSED
    fail(cb, 1)  # 3/4
    assert cb.state is BreakerState.OPEN


def test_time_window_forgets_calls_older_than_window() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(window_type="time", window_size=10, min_calls=3), "x", clock)
    fail(cb, 2)
    clock.advance(11)  # both failures are now outside the 10 s window
    cb.call(ok)
    fail(cb, 1)
    stats = cb.stats()
    assert stats["window_calls"] == 2 and cb.state is BreakerState.CLOSED
    fail(cb, 1)  # 2 failures of 3 within 10 s
    assert cb.state is BreakerState.OPEN


def test_slow_calls_open_the_breaker_but_return_results() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(min_calls=4, slow_call_rate_threshold=0.8), "x", clock)

    def slow() -> str:
        clock.advance(1.5)
        return "late"

    for _ in range(3):
        assert cb.call(slow) == "late"  # a slow success still returns its value
    cb.call(ok)
    assert cb.state is BreakerState.CLOSED  # 3 slow of 4 = 75% < 80%
    assert cb.stats()["slow_rate"] == pytest.approx(0.75)
    assert cb.call(slow) == "late"
    assert cb.state is BreakerState.OPEN  # 4 slow of 5 = 80% >= 80%
    assert cb.stats()["slow"] == 4


def test_half_open_probes_close_after_all_succeed() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(), "x", clock)
    fail(cb, 4)
    clock.advance(0.99)
    assert cb.state is BreakerState.OPEN
    clock.advance(0.01)
    assert cb.state is BreakerState.HALF_OPEN
    cb.call(ok)
    assert cb.state is BreakerState.HALF_OPEN  # 1 of 2 probes
    cb.call(ok)
    assert cb.state is BreakerState.CLOSED
    assert cb.stats()["window_calls"] == 0  # fresh window after closing


def test_half_open_failure_reopens_with_backoff_up_to_max() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(open_s=1.0, backoff_multiplier=2.0, max_open_s=5.0), "x", clock)
    fail(cb, 4)
    periods = []
    for _ in range(4):
        periods.append(cb.stats()["open_for_s"])
        clock.advance(periods[-1])
        assert cb.state is BreakerState.HALF_OPEN
        fail(cb, 1)
        assert cb.state is BreakerState.OPEN
    periods.append(cb.stats()["open_for_s"])
    assert periods == [1.0, 2.0, 4.0, 5.0, 5.0]
    # Recovery resets the period.
    clock.advance(5.0)
    cb.call(ok)
    cb.call(ok)
    assert cb.state is BreakerState.CLOSED
    fail(cb, 4)
    assert cb.stats()["open_for_s"] == 1.0


def test_slow_probe_counts_as_failed() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(), "x", clock)
    fail(cb, 4)
    clock.advance(1.0)

    def slow() -> str:
        clock.advance(2.0)
        return "late"

    assert cb.call(slow) == "late"
    assert cb.state is BreakerState.OPEN and cb.stats()["open_for_s"] == 2.0


def test_half_open_limits_concurrent_probes() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(half_open_probes=2), "x", clock)
    fail(cb, 4)
    clock.advance(1.0)
    t1, t2 = cb.acquire(), cb.acquire()
    with pytest.raises(CircuitOpen):
        cb.acquire()  # both probe slots are in flight
    cb.record(t1, 0.01, failed=False)
    cb.record(t2, 0.01, failed=False)
    assert cb.state is BreakerState.CLOSED


def test_late_outcome_from_previous_state_is_ignored() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(), "x", clock)
    straggler = cb.acquire()  # admitted while closed
    fail(cb, 4)
    clock.advance(1.0)
    assert cb.state is BreakerState.HALF_OPEN
    cb.record(straggler, 0.01, failed=True)  # must not re-open the half-open breaker
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.stats()["failures"] == 5


def test_ignored_exceptions_do_not_count_and_release_probe() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(half_open_probes=1), "x", clock, ignore_exceptions=(InvalidInput,))

    def bad_input() -> None:
        raise InvalidInput("caller error", field="x")

    for _ in range(10):
        with pytest.raises(InvalidInput):
            cb.call(bad_input)
    assert cb.state is BreakerState.CLOSED and cb.stats()["window_calls"] == 0
    fail(cb, 4)
    clock.advance(1.0)
    with pytest.raises(InvalidInput):
        cb.call(bad_input)  # the probe slot comes back
    cb.call(ok)
    assert cb.state is BreakerState.CLOSED


def test_thread_safety_counts_every_call() -> None:
    cb = CircuitBreaker(cfg(window_size=1000, min_calls=1000), "x")
    def work() -> None:
        for _ in range(500):
            cb.call(ok)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cb.stats()
    assert stats["calls"] == 2000 and stats["successes"] == 2000 and stats["window_calls"] == 1000


def test_pickle_round_trip_keeps_state_and_remaining_open_time() -> None:
    clock = ManualClock()
    cb = CircuitBreaker(cfg(), "redis", clock)
    fail(cb, 4)
    clock.advance(0.4)
    copy = pickle.loads(pickle.dumps(cb))
    assert copy.state is BreakerState.OPEN and copy.name == "redis"
    assert copy.stats()["retry_in_s"] == pytest.approx(0.6)
    copy._clock.advance(0.6)  # the copy has its own clock (a copy of the manual one)
    assert copy.state is BreakerState.HALF_OPEN
    copy.call(ok)
    copy.call(ok)
    assert copy.state is BreakerState.CLOSED
    # Real monotonic clock pickles too.
    real = CircuitBreaker(cfg(), "y")
    assert pickle.loads(pickle.dumps(real)).state is BreakerState.CLOSED


def test_reset_and_validation() -> None:
    cb = CircuitBreaker(cfg(), "x", ManualClock())
    fail(cb, 4)
    cb.reset()
    assert cb.state is BreakerState.CLOSED and cb.stats()["opened"] == 1
    with pytest.raises(InvalidInput):
        CircuitBreaker(cfg(), "")
    with pytest.raises(InvalidInput):
        CircuitBreaker(cfg(), "x", clock=5)  # type: ignore[arg-type]


def test_defaults_come_from_config() -> None:
    settings = load_settings(overrides=["breaker.window_type=time", "breaker.half_open_probes=1"])
    cb = CircuitBreaker(settings.breaker, "redis")
    assert cb.cfg.window_type == "time" and cb.cfg.half_open_probes == 1
    start = time.monotonic()
    assert cb.call(ok) == "ok" and time.monotonic() - start < 1.0
