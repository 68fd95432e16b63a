"""The safety volatility windows across a market closure: the reopen jump is no one-bar return."""

from __future__ import annotations

import pickle

import numpy as np

from tickcast.config import SafetyConfig, WeeklySession, WeeklySessions
from tickcast.market.calendar import calendar_for
from tickcast.monitoring.loop_state import SafetyTracker
from tickcast.ticks import NS_PER_MIN

MON = 1_704_067_200 * 10**9  # 2024-01-01T00:00:00Z, a Monday
# 09:00-17:00 UTC every weekday.
DAY_SESSIONS = WeeklySessions(timezone="UTC", sessions=(
    WeeklySession(days=("mon", "tue", "wed", "thu", "fri"), open="09:00", close="17:00"),))


def _two_sessions(jump: float) -> tuple[np.ndarray, np.ndarray]:
    """Monday's and Tuesday's 480 bars of a calm random walk; Tuesday opens ``jump`` away."""
    rng = np.random.default_rng(3)
    r = rng.normal(0.0, 2e-4, 960)
    r[480] = jump  # the overnight move, seen on Tuesday's first bar
    close = 100.0 * np.exp(np.cumsum(r))
    ts = np.concatenate([MON + (9 * 60 + np.arange(480)) * NS_PER_MIN,
                         MON + (24 * 60 + 9 * 60 + np.arange(480)) * NS_PER_MIN])
    return ts, close


def test_the_reopen_jump_stays_out_of_the_volatility_windows() -> None:
    cfg = SafetyConfig(vol_short=15, vol_long=240)
    ts, close = _two_sessions(jump=0.03)  # a 3% gap at the open: 150 one-minute sigmas
    blind = SafetyTracker(cfg, 1.0, None)
    aware = SafetyTracker(cfg, 1.0, None, calendar=calendar_for(DAY_SESSIONS))
    seen = {}
    for name, tr in (("blind", blind), ("aware", aware)):
        tr.on_bars(ts, close)
        seen[name] = tr.step()
    # Taken as a one-minute return, the jump sends the short window's volatility through the
    # roof: CRISIS at Tuesday's open. With the calendar the windows hold in-session returns only.
    assert "CRISIS" in {s.regime for s in seen["blind"][480:500]}
    assert {s.regime for s in seen["aware"]} == {"NORMAL"}
    # The same history without the overnight jump gives the very same windows.
    ts2, close2 = _two_sessions(jump=0.0)
    calm = SafetyTracker(cfg, 1.0, None, calendar=calendar_for(DAY_SESSIONS))
    calm.on_bars(ts2, close2)
    ratios = [s.ratio for s in calm.step()]
    aware_ratios = [s.ratio for s in seen["aware"]]
    assert ratios[:240] == aware_ratios[:240] == [None] * 239 + [ratios[239]]
    np.testing.assert_allclose(aware_ratios[240:], ratios[240:], rtol=1e-9)
    # The paper accounts still mark the move: a position held over the closure bears it (both
    # trackers were flat here, without a champion, so both equities are untouched).
    assert aware.status.equity == blind.status.equity == 1.0


def test_warm_start_skips_the_reopen_too_and_the_tracker_pickles() -> None:
    cfg = SafetyConfig(vol_short=15, vol_long=240)
    ts, close = _two_sessions(jump=0.03)
    aware = SafetyTracker(cfg, 1.0, None, calendar=calendar_for(DAY_SESSIONS))
    aware.warm(ts, close)
    assert aware.status.regime == "NORMAL"
    back = pickle.loads(pickle.dumps(aware))
    assert back.calendar is aware.calendar  # the shared instance, rebuilt from its spec
    # A gap inside a session is not a reopen: that move still counts (as before calendars).
    morning = SafetyTracker(cfg, 1.0, None, calendar=calendar_for(DAY_SESSIONS))
    morning.warm(ts[:100], close[:100])  # Monday 09:00-10:39
    assert not morning._reopens(MON + 11 * 60 * NS_PER_MIN)
    assert morning._reopens(MON + (24 + 9) * 60 * NS_PER_MIN)
