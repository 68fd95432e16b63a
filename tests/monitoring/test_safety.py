"""Safety state: regime hysteresis, halt and recovery, multipliers, paper P&L, pickling."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tickcast.config import SafetyConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.pnl import PaperPnL, max_drawdown, paper_returns, sharpe_ratio, signal_positions
from tickcast.monitoring.safety import REGIMES, SafetyState


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
                     "drift.psi_critical=0.05", "drift.detector=adwin"):
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
