"""Safety state: regime hysteresis, halt and recovery, multipliers, paper P&L, pickling."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tickcast.config import SafetyConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.pnl import PaperPnL, max_drawdown, paper_returns, sharpe_ratio, signal_positions
from tickcast.monitoring.book import BookKind, BookUpdate
from tickcast.monitoring.safety import REGIMES, HaltSource, SafetyState


def _closes(returns: np.ndarray, start: float = 100.0) -> np.ndarray:
    """Closes whose bar log returns are ``returns`` (first close has no return)."""
    return start * np.exp(np.r_[0.0, np.cumsum(returns)])


def _regime_events(statuses):
    return [(s.bar, e["from"], e["to"]) for s in statuses for e in s.events if e["type"] == "regime"]


def test_regime_steps_up_at_once_and_down_only_after_recovery_bars() -> None:
    cfg = SafetyConfig(vol_short=5, vol_long=40, elevated_ratio=1.5, crisis_ratio=2.5,
                       recovery_bars=4)
    a = 1e-3
    calm = a * np.resize([1.0, -1.0], 60)  # |r| = a: ratio exactly 1 once the long window fills
    shock = 6 * a * np.resize([1.0, -1.0], 4)
    after = a * np.resize([1.0, -1.0], 30)
    state = SafetyState(cfg, fee_bp=0.0)
    statuses = [state.update(c) for c in _closes(np.r_[calm, shock, after])]
    # Bars: 1 = first close; calm returns at bars 2..61; shocks at 62..65; calm from 66.
    # Ratios (short/long, squared-return means): shock 1 -> 2.07, shock 4 -> 2.54 (crisis);
    # calm 1 -> 2.54 (still crisis: streak 0), calm 2..3 -> 2.21, 1.83 (elevated), calm 4..5
    # -> 1.33, 0.47 (normal): four bars below crisis -> the highest target seen, ELEVATED.
    assert _regime_events(statuses) == [(62, "NORMAL", "ELEVATED"), (65, "ELEVATED", "CRISIS"),
                                        (70, "CRISIS", "ELEVATED"), (74, "ELEVATED", "NORMAL")]
    crisis = next(e for s in statuses for e in s.events if e.get("to") == "CRISIS")
    assert crisis["ratio"] == pytest.approx(math.sqrt(29 / 4.5))
    assert crisis["crisis_ratio"] == 2.5 and crisis["vol_short"] == pytest.approx(a * math.sqrt(29))
    down = next(e for s in statuses for e in s.events if e.get("from") == "CRISIS")
    assert down["bars_below"] == 4 and down["recovery_bars"] == 4
    assert [s.multiplier for s in statuses[60:66]] == [1.0, 0.5, 0.5, 0.5, 0.2, 0.2]
    assert statuses[59].ratio == pytest.approx(1.0)


def _reference_regimes(returns: np.ndarray, cfg: SafetyConfig) -> list[str]:
    """The regime rules written out plainly over the full history (no ring buffer)."""
    regime, streak, peak, out = 0, 0, 0, []
    for t in range(returns.size):
        if t + 1 >= cfg.vol_long:
            vl = math.sqrt(np.mean(returns[t + 1 - cfg.vol_long: t + 1] ** 2))
            vs = math.sqrt(np.mean(returns[t + 1 - cfg.vol_short: t + 1] ** 2))
            ratio = vs / vl if vl > 0 else 1.0
            target = 2 if ratio >= cfg.crisis_ratio else 1 if ratio >= cfg.elevated_ratio else 0
            if target > regime:
                regime, streak = target, 0
            elif target < regime:
                peak = target if streak == 0 else max(peak, target)
                streak += 1
                if streak >= cfg.recovery_bars:
                    regime, streak = peak, 0
            else:
                streak = 0
        out.append(REGIMES[regime])
    return out


def test_regime_path_matches_the_rules_on_switching_volatility() -> None:
    cfg = SafetyConfig(vol_short=8, vol_long=60, recovery_bars=6)
    rng = np.random.default_rng(17)
    blocks = [rng.normal(0, 1e-3 * rng.choice([1.0, 1.0, 3.0, 8.0]), rng.integers(5, 60))
              for _ in range(60)]
    returns = np.concatenate(blocks)
    state = SafetyState(cfg)
    got = [state.update(c).regime for c in _closes(returns)][1:]
    want = _reference_regimes(returns, cfg)
    assert got == want
    assert len(set(got)) == 3  # the data visits every regime


def test_flat_prices_give_ratio_one() -> None:
    state = SafetyState(SafetyConfig(vol_short=3, vol_long=5))
    statuses = [state.update(50.0) for _ in range(10)]
    assert statuses[-1].ratio == 1.0 and statuses[-1].regime == "NORMAL"
    assert statuses[3].ratio is None  # long window not yet full


def _halt_cfg(**kw) -> SafetyConfig:
    base = {"max_drawdown": 0.05, "halt_resume_drawdown": 0.02, "halt_recovery_bars": 10,
            "vol_long": 1000, "vol_short": 10}
    base.update(kw)
    return SafetyConfig(**base)


def test_halt_on_drawdown_and_resume_after_recovery_bars_and_recovered_drawdown() -> None:
    state = SafetyState(_halt_cfg(), fee_bp=0.0)
    closes = 100 * np.r_[1.0, 0.99 ** np.arange(1, 7), 0.99 ** 6 * 1.01 ** np.arange(1, 15)]
    statuses = [state.update(c, forecast=5e-4) for c in closes]  # always long (5 bp: beyond the 1 bp fee + 1 bp half spread)
    halts = [(s.bar, e) for s in statuses for e in s.events if e["type"] == "halt"]
    assert len(halts) == 1 and halts[0][0] == 7  # six 1 % losses: drawdown 5.85 % > 5 %
    ev = halts[0][1]
    assert ev["drawdown"] == pytest.approx(1 - 0.99 ** 6) and ev["max_drawdown"] == 0.05
    assert ev["multiplier"] == 0.0
    assert statuses[6].halted and statuses[6].multiplier == 0.0 and statuses[6].position == 0.0
    # The shadow account recovers (new high after 7 up bars) but the halt lasts 10 bars.
    assert statuses[14].drawdown == 0.0 and statuses[15].halted
    resumes = [(s.bar, e) for s in statuses for e in s.events if e["type"] == "resume"]
    assert [b for b, _ in resumes] == [17]
    assert resumes[0][1]["bars_halted"] == 10 and resumes[0][1]["halt_resume_drawdown"] == 0.02
    assert statuses[16].multiplier == 1.0 and statuses[16].position == 1.0
    # The managed account held nothing while halted.
    halted_equity = {round(s.equity, 12) for s in statuses[6:16]}
    assert len(halted_equity) == 1


def test_halt_persists_until_the_drawdown_recovers() -> None:
    state = SafetyState(_halt_cfg(), fee_bp=0.0)
    # Lose 7 %, then drift flat for 20 bars: recovery bars pass but the drawdown does not.
    closes = 100 * np.r_[1.0, 0.93, np.full(20, 0.93), 0.93 * 1.01 ** np.arange(1, 9)]
    statuses = [state.update(c, forecast=5e-4) for c in closes]
    assert statuses[1].halted and all(s.halted for s in statuses[1:26])
    first_ok = next(i for i, s in enumerate(statuses) if not s.halted and i > 1)
    assert statuses[first_ok].drawdown <= 0.02
    assert statuses[first_ok - 1].drawdown > 0.02


def test_wide_interval_cuts_exposure_and_logs_both_switches() -> None:
    cfg = SafetyConfig()
    state = SafetyState(cfg, fee_bp=0.0)
    s1 = state.update(100.0, forecast=5e-4, interval_bp=30.0)
    s2 = state.update(100.1, forecast=5e-4, interval_bp=80.0)
    s3 = state.update(100.2, forecast=5e-4, interval_bp=90.0)
    s4 = state.update(100.3, forecast=5e-4, interval_bp=20.0)
    assert [s.multiplier for s in (s1, s2, s3, s4)] == [1.0, 0.5, 0.5, 1.0]
    assert s1.events == () and s3.events == ()
    (on,), (off,) = s2.events, s4.events
    assert on["type"] == "wide_interval" and on["active"] and on["interval_bp"] == 80.0
    assert on["wide_interval_bp"] == cfg.wide_interval_bp and on["multiplier"] == 0.5
    assert not off["active"] and off["multiplier"] == 1.0


def test_interval_sizing_and_no_forecast_is_flat() -> None:
    state = SafetyState(SafetyConfig(sizing="interval"), fee_bp=0.0)
    assert state.update(100.0, forecast=0.001, interval_bp=40.0).position == pytest.approx(0.5)
    assert state.update(100.0, forecast=-0.01, interval_bp=40.0).position == -1.0
    assert state.update(100.0).position == 0.0


def test_bad_inputs_name_the_field_and_leave_the_state_unchanged() -> None:
    state = SafetyState(SafetyConfig())
    state.update(100.0, forecast=5e-4)
    before = pickle.dumps(state)
    for kwargs, field in (({"bar_close": 0.0}, "bar_close"), ({"bar_close": -5}, "bar_close"),
                          ({"bar_close": float("nan")}, "bar_close"), ({"bar_close": "x"}, "bar_close"),
                          ({"bar_close": True}, "bar_close"),
                          ({"bar_close": 100.0, "forecast": float("inf")}, "forecast"),
                          ({"bar_close": 100.0, "interval_bp": -1.0}, "interval_bp")):
        with pytest.raises(InvalidInput) as err:
            state.update(**kwargs)
        assert err.value.field == field
    assert pickle.dumps(state) == before


def test_reset_pnl_lifts_a_halt_and_keeps_the_regime() -> None:
    state = SafetyState(_halt_cfg(), fee_bp=0.0)
    state.update(100.0, forecast=5e-4)
    assert state.update(90.0, forecast=5e-4).halted
    status = state.reset_pnl("promoted v7", ts=123)
    assert not status.halted and status.multiplier == 1.0 and status.equity == 1.0
    (ev,) = status.events
    assert ev["type"] == "pnl_reset" and ev["was_halted"] and ev["reason"] == "promoted v7"
    assert not state.update(89.0, forecast=5e-4).halted  # fresh peak: 0 % drawdown on entry


def test_status_fields_for_redis_and_json() -> None:
    state = SafetyState(SafetyConfig())
    status = state.update(100.0, ts=1_700_000_000_000_000_000)
    fields = status.to_redis_fields(updated_ns=5)
    assert fields == {"regime": "NORMAL", "multiplier": "1.0", "halted": "0", "updated": "5"}
    assert status.to_dict()["ts"] == 1_700_000_000_000_000_000


def test_managed_equity_matches_vectorized_paper_returns() -> None:
    rng = np.random.default_rng(3)
    returns = rng.normal(0, 2e-3, 300)
    forecasts = rng.normal(0, 1e-3, 301)
    widths = rng.uniform(10, 90, 301)
    state = SafetyState(SafetyConfig(vol_short=10, vol_long=50), fee_bp=1.5)
    statuses = [state.update(c, forecast=f, interval_bp=w)
                for c, f, w in zip(_closes(returns), forecasts, widths)]
    positions = np.array([s.position for s in statuses])
    assert not any(s.halted for s in statuses)
    assert set(np.abs(positions).round(6)) <= {0.0, 0.1, 0.2, 0.25, 0.5, 1.0}
    # Flat exactly where the edge does not beat the cost (1.5 bp fee + 1 bp half spread).
    np.testing.assert_array_equal(positions == 0.0, np.abs(forecasts) <= 2.5e-4)
    simple = np.expm1(returns)
    net = paper_returns(positions[:-1], simple, fee_bp=1.5)
    final_fee = 1 - abs(positions[-1] - positions[-2]) * 1.5e-4
    assert statuses[-1].equity == pytest.approx(np.prod(1 + net) * final_fee, rel=1e-12)


def test_pickle_round_trip_mid_stream() -> None:
    rng = np.random.default_rng(8)
    closes = _closes(np.r_[rng.normal(0, 1e-3, 80), rng.normal(0, 5e-3, 40)])
    forecasts = rng.normal(0, 1e-3, closes.size)
    state = SafetyState(SafetyConfig(vol_short=5, vol_long=40, recovery_bars=3), fee_bp=1.0)
    for c, f in zip(closes[:70], forecasts[:70]):
        state.update(c, forecast=f, interval_bp=50.0)
    clone = pickle.loads(pickle.dumps(state))
    a = [state.update(c, forecast=f, interval_bp=50.0, ts=i).to_dict()
         for i, (c, f) in enumerate(zip(closes[70:], forecasts[70:]))]
    b = [clone.update(c, forecast=f, interval_bp=50.0, ts=i).to_dict()
         for i, (c, f) in enumerate(zip(closes[70:], forecasts[70:]))]
    assert a == b and any(d["events"] for d in a)


def test_config_orders_are_validated() -> None:
    from tickcast.config import load_settings
    from tickcast.errors import ConfigError

    for override in ("safety.vol_short=300", "safety.crisis_ratio=1.0",
                     "safety.halt_resume_drawdown=0.2", "drift.min_window=1000",
                     "drift.psi_critical=0.05", "drift.detector=adwin",
                     "drift.kl_critical=0.05", "drift.tvd_warning=0.5", "drift.score_components=[]",
                     "drift.score_components=[concept, concept]", "drift.psi_bins=600",
                     "drift.score_components=[drift]", "safety.half_spread_bp=-1",
                     "safety.book_max_abs_position=0"):
        with pytest.raises(ConfigError):
            load_settings(overrides=[override], env={})
    with pytest.raises(ConfigError):
        load_settings(overrides=["safety.multipliers={NORMAL: 1.0, CRISIS: 0.2}"], env={})


def test_paper_pnl_helpers_agree() -> None:
    rng = np.random.default_rng(1)
    pos = signal_positions(rng.normal(size=200))
    r = rng.normal(0, 0.01, 200)
    pnl = PaperPnL(fee_bp=2.0)
    for p, x in zip(pos, r):
        pnl.rebalance(p)
        pnl.mark(x)
    net = paper_returns(pos, r, fee_bp=2.0)
    assert pnl.equity == pytest.approx(np.prod(1 + net), rel=1e-12)
    assert pnl.worst_drawdown == pytest.approx(max_drawdown(net), rel=1e-9)
    assert sharpe_ratio([0.01, 0.01, 0.01], 252) == 0.0
    assert sharpe_ratio(net, 525_600) == pytest.approx(net.mean() / net.std(ddof=1) * math.sqrt(525_600))
    with pytest.raises(InvalidInput):
        paper_returns([1.0, 0.0], [0.01], fee_bp=1.0)


# ----------------------------------------------------------------------------------------
# deadband: a model without skill stays flat; a real loss still halts, and trading resumes
# ----------------------------------------------------------------------------------------
WEEK = 10_080  # one-minute bars


def _week_returns(seed: int) -> np.ndarray:
    """A simulated week of 1-minute log returns: fat tails (t, 4 dof) and volatility that
    switches between calm, normal and stormy stretches (3, 8, 25 bp per bar)."""
    rng = np.random.default_rng(seed)
    vols, out = [3e-4, 8e-4, 25e-4], []
    while sum(len(b) for b in out) < WEEK:
        n = int(rng.integers(60, 720))
        out.append(rng.choice(vols, p=[0.3, 0.6, 0.1]) * rng.standard_t(4, n) / math.sqrt(2.0))
    return np.concatenate(out)[:WEEK]


def _flipping(n: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """A median that keeps its sign for ~10 bars at a time (geometric runs)."""
    runs = rng.geometric(0.1, n)
    signs = np.repeat(np.resize([1.0, -1.0], n), runs)[:n]
    return size * signs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_no_skill_signal_over_a_simulated_week_never_halts(seed: int) -> None:
    # Arrange: forecasts independent of the future, as small as a no-skill median is.
    r = _week_returns(seed)
    rng = np.random.default_rng(100 + seed)
    signals = {"noise_0.3bp": rng.normal(0.0, 0.3e-4, WEEK + 1),
               "flip_10_bars_0.3bp": _flipping(WEEK + 1, 0.3e-4, rng)}
    for name, fc in signals.items():
        # Act
        state = SafetyState(SafetyConfig(), fee_bp=1.0)
        statuses = [state.update(c, forecast=f, interval_bp=40.0)
                    for c, f in zip(_closes(r), fc)]
        # Assert: flat throughout, no fee paid, never halted.
        assert not any(s.halted for s in statuses), name
        assert state.shadow.fees == 0.0 and state.managed.equity == 1.0, name
        # The same signal without the deadband bleeds fees into a halt within the week,
        # so the figures above are the deadband's doing.
        old = SafetyState(SafetyConfig(deadband=False), fee_bp=1.0)
        old_statuses = [old.update(c, forecast=f, interval_bp=40.0) for c, f in zip(_closes(r), fc)]
        assert any(s.halted for s in old_statuses), name


def test_a_real_loss_beyond_max_drawdown_halts_and_trading_resumes() -> None:
    # Arrange: a confident long (5 bp, beyond the 2 bp cost) through a quiet week, with a
    # 7 % grind down over 700 bars in its middle (too slow for the volatility regime to
    # cut the exposure), then an 8 % climb back.
    cfg = SafetyConfig()
    r = _week_returns(7) * 0.3
    crash_at, rebound_at = 5_000, 5_700
    r[crash_at:rebound_at] += math.log(0.93) / 700
    r[rebound_at: rebound_at + 700] += math.log(1.08) / 700
    state = SafetyState(cfg, fee_bp=1.0)
    # Act
    statuses = [state.update(c, forecast=5e-4, interval_bp=40.0) for c in _closes(r)]
    # Assert: halted once, on the paper account, when the drawdown passed 5 %.
    halts = [(s.bar, e) for s in statuses for e in s.events if e["type"] == "halt"]
    resumes = [(s.bar, e) for s in statuses for e in s.events if e["type"] == "resume"]
    assert len(halts) == 1
    bar, ev = halts[0]
    assert crash_at < bar <= rebound_at and ev["source"] == "paper"
    assert ev["drawdown"] > cfg.max_drawdown >= statuses[bar - 2].drawdown
    assert statuses[bar - 1].multiplier == 0.0 and statuses[bar - 1].position == 0.0
    # Resumed once the recovery bars passed and the shadow drawdown was back under 2.5 %.
    assert len(resumes) == 1
    rbar, rev = resumes[0]
    assert rbar - bar >= cfg.halt_recovery_bars and rev["drawdown"] <= cfg.halt_resume_drawdown
    # Here the drawdown, not the wait, decided: the bar before was halted above 2.5 %.
    assert statuses[rbar - 2].halted and statuses[rbar - 2].drawdown > cfg.halt_resume_drawdown
    assert not statuses[-1].halted and statuses[-1].position > 0


# ----------------------------------------------------------------------------------------
# the user's own book
# ----------------------------------------------------------------------------------------
def _pnl(ts: int, pnl: float, capital: float | None = None) -> BookUpdate:
    return BookUpdate("X", ts, BookKind.PNL, pnl, capital)


def test_the_halt_follows_the_users_pnl_and_resumes_with_it() -> None:
    cfg = SafetyConfig(halt_recovery_bars=10)
    state = SafetyState(cfg, fee_bp=1.0)
    closes = _closes(np.full(200, 1e-5))
    # No skill: the paper accounts stay flat; the user's book is what carries risk.
    for i in range(5):
        state.update(closes[i], forecast=0.2e-4)
    assert state.apply_book(_pnl(5, 0.0, capital=100_000.0)) is None
    pnl_path = {10: -3_000.0, 20: -6_000.0, 25: -4_000.0, 40: -2_000.0}
    statuses = []
    for i in range(5, 60):
        if i in pnl_path:
            state.apply_book(_pnl(i, pnl_path[i]))
        statuses.append(state.update(closes[i], forecast=0.2e-4))
    by_bar = {s.bar: s for s in statuses}
    halts = [e for s in statuses for e in s.events if e["type"] == "halt"]
    resumes = [e for s in statuses for e in s.events if e["type"] == "resume"]
    # -6 % of the capital: halted at that bar, on the book; the paper account is untouched.
    assert len(halts) == 1 and halts[0]["source"] == "book" and halts[0]["bar"] == 21
    assert halts[0]["drawdown"] == pytest.approx(0.06) and halts[0]["equity"] == 94_000.0
    assert by_bar[21].source is HaltSource.BOOK and by_bar[21].paper_drawdown == 0.0
    assert by_bar[21].multiplier == 0.0 and by_bar[21].book["kind"] == "pnl"
    # -4 % after 5 bars: still above the resume level; -2 % at bar 41 (20 bars on): resumed.
    assert all(by_bar[b].halted for b in range(21, 41))
    assert len(resumes) == 1 and resumes[0]["bar"] == 41 and resumes[0]["source"] == "book"
    # A new champion does not lift a halt on the user's book.
    state.apply_book(_pnl(70, -7_000.0))
    assert state.update(closes[60], forecast=0.2e-4).halted
    reset = state.reset_pnl("promoted v2")
    assert reset.halted and reset.events[0]["halt_kept"]


def test_a_flat_book_stays_halted_until_the_user_rebases_it() -> None:
    cfg = SafetyConfig(halt_recovery_bars=5)
    state = SafetyState(cfg, fee_bp=1.0)
    r = np.r_[np.zeros(3), np.full(3, math.log(0.98)), np.zeros(40)]
    closes = _closes(r)
    statuses = []
    for i, c in enumerate(closes):
        if i == 0:
            state.apply_book(BookUpdate("X", i, BookKind.POSITION, 1.5))
        if i == 8:  # the user obeys the halt: flat
            state.apply_book(BookUpdate("X", i, BookKind.POSITION, 0.0))
        if i == 30:  # ... and rebases the book (a new capital: a new high-water mark)
            state.apply_book(BookUpdate("X", i, BookKind.POSITION, 0.0, capital=1.0))
        statuses.append(state.update(c))
    # Marked positions: 1.5 x three 2 % falls = a drawdown of 1 - (1 - 0.0297)^3 > 5 %.
    halt_bar = next(s.bar for s in statuses if s.halted)
    # Bar 6 (statuses[5]) closes the second 2 % fall of a 1.5x long: drawdown 1 - 0.97^2.
    assert halt_bar == 6 and statuses[5].drawdown == pytest.approx(1 - 0.97 ** 2)
    assert statuses[6].drawdown == pytest.approx(1 - 0.97 ** 3)  # the user still held
    assert all(s.halted for s in statuses[5:30])  # flat from bar 9: the drawdown cannot recover
    assert statuses[29].drawdown == pytest.approx(1 - 0.97 ** 3)
    assert not statuses[30].halted and statuses[30].events[0]["type"] == "resume"
    # Clearing the book hands the halt back to the paper account.
    cleared = state.clear_book("user left", ts=99)
    assert cleared.source is HaltSource.PAPER and cleared.events[0]["type"] == "book_cleared"


def test_book_state_survives_a_pickle_round_trip() -> None:
    state = SafetyState(SafetyConfig(), fee_bp=1.0)
    state.update(100.0)
    state.apply_book(BookUpdate("X", 1, BookKind.POSITION, 0.5))
    clone = pickle.loads(pickle.dumps(state))
    a = [state.update(c).to_dict() for c in (99.0, 97.0, 98.0)]
    b = [clone.update(c).to_dict() for c in (99.0, 97.0, 98.0)]
    assert a == b and a[-1]["book"]["position"] == 0.5 and a[-1]["source"] == "book"


def test_tracker_applies_book_updates_in_time_order_between_bars() -> None:
    from tickcast.monitoring.book import decode_book_entry
    from tickcast.monitoring.loop_state import SafetyTracker

    tr = SafetyTracker(SafetyConfig(halt_recovery_bars=3), fee_bp=1.0, champion="v1")
    minute = 60
    tr.on_bars([i * minute for i in range(5)], [100.0] * 5)
    entries = [  # arrival order differs from time order
        {b"asset": b"X", b"ts": str(150).encode(), b"pnl": b"-7000"},
        {b"asset": b"X", b"ts": str(30).encode(), b"pnl": b"0", b"capital": b"100000"},
        {b"asset": b"X", b"ts": str(30).encode(), b"pnl": b"-50"},  # same ts: stale
        {b"asset": b"X", b"ts": b"oops", b"pnl": b"1"},  # rejected at decoding
    ]
    tr.on_book(decode_book_entry("X", e) for e in entries)
    statuses = tr.step()
    # Bars 0..3 processed (bar 4 waits for its forecast); the capital update applied before
    # bar 60, the -7 % before bar 180, whose close halts.
    assert [s.bar for s in statuses] == [1, 2, 3, 4]
    assert [s.halted for s in statuses] == [False, False, False, True]
    assert statuses[3].source is HaltSource.BOOK and statuses[3].drawdown == pytest.approx(0.07)
    assert tr.book_applied == 2 and tr.book_rejected == {"stale": 1, "bad_ts": 1}
    d = tr.to_dict()
    assert d["source"] == "book" and d["book"]["equity"] == 93_000.0 and d["book_pending"] == 0
    # A P&L update for a book that no capital was ever given to is rejected.
    tr.clear_book("operator")
    tr.on_book([BookUpdate("X", 200, BookKind.PNL, 5.0)])
    tr.on_bars([5 * minute], [100.0])
    tr.step()
    assert tr.book_rejected["missing_capital"] == 1 and tr.to_dict()["source"] == "paper"
