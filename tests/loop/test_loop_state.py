"""The per-asset trackers the drift and safety actors hold (pure, no Ray, no Redis)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tickcast.config import DriftConfig, SafetyConfig
from tickcast.monitoring.drift import DriftMonitor, Reference
from tickcast.monitoring.loop_state import DriftTracker, SafetyTracker
from tickcast.monitoring.safety import SafetyState
from tickcast.monitoring.shadow_eval import Forecast

MIN = 60
NAMES = ("f0", "f1", "f2")


def _tracker(seed: int = 0, performance: bool = True) -> DriftTracker:
    rng = np.random.default_rng(seed)
    ref = Reference.from_array(rng.normal(size=(1000, 3)), NAMES)
    preds = Reference.from_array(rng.normal(0, 1e-3, size=(1000, 1)), ["pred"])
    cfg = DriftConfig(window=100, min_window=50, eval_every=10, performance_window=50,
                      performance_min_labels=20, detector_warmup=0)
    mon = DriftMonitor(cfg, ref, preds, validation_pinball=4e-4 if performance else None,
                       validation_mae=1e-3 if performance else None, input_names=NAMES)
    return DriftTracker("X", "v1", mon, horizon=1, freq_ns=MIN, timeout_bars=5)


def test_features_are_reordered_by_name_and_each_bar_counts_once() -> None:
    tr = _tracker()
    rng = np.random.default_rng(1)
    rows = [(MIN * i, ("f2", "extra", "f0", "f1"), np.r_[rng.normal(), 9.0, rng.normal(size=2)])
            for i in range(60)]
    rows += [(MIN * 59, ("f2", "extra", "f0", "f1"), np.zeros(4))]  # a re-published bar
    rows += [(MIN * 60, ("f0", "f1"), np.zeros(2))]  # schema without f2
    tr.on_features(rows)
    assert tr.counts["features"] == 60
    assert tr.rejected == {"stale_bar": 1, "schema": 1}
    # The window holds the reordered values: f2 in the third column.
    win = tr.monitor.features.values()
    np.testing.assert_allclose(win[0], [rows[0][2][2], rows[0][2][3], rows[0][2][0]])
    assert tr.level == "NORMAL" and tr.status()["counts"]["features"] == 60


def test_a_feature_shift_goes_critical_and_raises_the_retrain_flag() -> None:
    tr = _tracker()
    rng = np.random.default_rng(2)
    tr.on_features([(MIN * i, NAMES, rng.normal(size=3)) for i in range(60)])
    events = tr.on_features([(MIN * (60 + i), NAMES, rng.normal(size=3) + 2.0) for i in range(100)])
    kinds = [e["type"] for e in events]
    assert "drift_level" in kinds and "drift_retrain" in kinds
    assert tr.level == "CRITICAL" and tr.retrain and tr.score >= 0.3


def test_forecasts_feed_prediction_drift_and_labels_feed_performance() -> None:
    tr = _tracker()
    rng = np.random.default_rng(3)
    fcs = [Forecast("X", "blue", "v1", MIN * i, float(rng.normal(0, 1e-3)), -2e-3, 2e-3)
           for i in range(80)]
    fcs.append(Forecast("X", "green", "v2", MIN * 3, 0.5, 0.0, 1.0))  # another version: ignored
    tr.on_forecasts(fcs + fcs[:5])  # repeats of bars already seen: ignored
    assert tr.counts["forecasts"] == 80
    assert tr.monitor.predictions is not None and tr.monitor.predictions.count == 80
    assert tr.closes_needed() == (0, 80 * MIN + 1)
    # Realized returns 4x larger than the validation MAE: performance drift.
    closes = 100.0 * np.exp(np.cumsum(np.r_[0.0, rng.normal(0, 5e-3, 80)]))
    events = tr.on_closes(np.arange(81) * MIN, closes)
    assert tr.counts["labels"] == 80
    perf = tr.monitor.report.performance
    assert perf["labels"] == 50 and perf["mae_ratio"] > 2
    assert tr.monitor.report.performance_score == 1.0
    assert any(e["type"] == "drift_level" for e in events) and tr.level == "CRITICAL"


def test_drift_tracker_round_trips_through_pickle() -> None:
    tr = _tracker()
    rng = np.random.default_rng(4)
    tr.on_features([(MIN * i, NAMES, rng.normal(size=3)) for i in range(55)])
    copy = pickle.loads(pickle.dumps(tr))
    more = [(MIN * (55 + i), NAMES, rng.normal(size=3) + 1.0) for i in range(30)]
    tr.on_features(more)
    copy.on_features(more)
    assert copy.score == pytest.approx(tr.score) and copy.level == tr.level
    assert copy.status()["counts"] == tr.status()["counts"]


# ----------------------------------------------------------------------------- safety
def _fc(bar: int, pred: float, version: str = "v1", width: float = 2e-3) -> Forecast:
    return Forecast("X", "blue", version, bar * MIN, pred, pred - width / 2, pred + width / 2)


def test_each_bar_is_processed_once_in_order_with_its_forecast() -> None:
    cfg = SafetyConfig(vol_short=3, vol_long=10, recovery_bars=2)
    tr = SafetyTracker(cfg, fee_bp=0.0, champion="v1")
    closes = 100 * np.exp(np.cumsum(np.full(6, 1e-3)))
    tr.on_forecasts([_fc(0, 1e-3), _fc(1, -1e-3), _fc(2, 1e-3, version="v9")])
    tr.on_bars(np.arange(6) * MIN, closes)
    done = tr.step()
    # Bars 0..4 go (4 waits for its forecast until bar 5 exists); bar 5 waits.
    assert [s.bar for s in done] == [1, 2, 3, 4, 5]
    assert tr.counts == {"bars": 5, "with_forecast": 2, "without_forecast": 3, "warm_bars": 0}
    tr.on_forecasts([_fc(5, 2e-3)])
    last = tr.step()
    assert [s.position for s in last] == [1.0] and tr.last_done_ts == 5 * MIN
    # The same closes fed straight to SafetyState give the same account.
    ref = SafetyState(cfg, fee_bp=0.0)
    for i, c in enumerate(closes):
        fc = {0: 1e-3, 1: -1e-3, 5: 2e-3}.get(i)
        ref.update(c, fc, None if fc is None else 20.0, ts=i * MIN)
    assert tr.status.equity == pytest.approx(ref.status.equity)
    tr.on_bars([2 * MIN], [1.0])  # an old bar again: ignored
    assert tr.step() == [] and tr.to_dict()["queued"] == 0


def test_warm_start_fills_the_windows_and_a_new_champion_resets_the_pnl() -> None:
    cfg = SafetyConfig(vol_short=3, vol_long=10, max_drawdown=0.01, halt_resume_drawdown=0.005)
    tr = SafetyTracker(cfg, fee_bp=0.0, champion="v1")
    rng = np.random.default_rng(5)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 12)))
    st = tr.warm(np.arange(12) * MIN, closes)
    assert st.ratio is not None and tr.counts["warm_bars"] == 12 and tr.last_done_ts == 11 * MIN
    # Lose money with the champion's signal until the drawdown halts trading.
    price = closes[-1]
    for i in range(12, 30):
        tr.on_forecasts([_fc(i, 1e-3)])
        price *= 0.996
        tr.on_bars([i * MIN], [price])
        tr.step()
    tr.on_bars([30 * MIN], [price])
    tr.step()
    assert tr.status.halted and tr.status.multiplier == 0.0
    reset = tr.new_champion("v2", ts=30 * MIN)
    assert not reset.halted and reset.events[0]["type"] == "pnl_reset"
    assert tr.champion == "v2"
    copy = pickle.loads(pickle.dumps(tr))
    assert copy.to_dict() == tr.to_dict()


def test_bad_closes_are_skipped_not_fatal() -> None:
    tr = SafetyTracker(SafetyConfig(), 1.0, None)
    tr.on_bars([0, MIN, 2 * MIN], [100.0, math.nan, -1.0])
    tr.on_bars([3 * MIN], [101.0])
    assert [s.bar for s in tr.step()] == [1]


def test_actor_checkpoints_round_trip_through_pickle() -> None:
    """What the three actors checkpoint (their whole state) pickles and comes back equal."""
    from actors.controller import AssetLoop, ControllerState
    from actors.asset_drift import DriftActorState
    from actors.asset_safety import SafetyActorState
    from tickcast.monitoring.shadow_eval import ForecastJoin, PairedSample

    loop = AssetLoop("X", champion="v1", phase="shadow", candidate="v2", incumbent="v1",
                     join=ForecastJoin(("v2", "v1"), 1, MIN), sample=PairedSample("v2", "v1"),
                     decided=["v0"], alert={"score": 0.4})
    loop.join.add([Forecast("X", "green", "v2", MIN, 0.0, -1.0, 1.0)])
    state = ControllerState({"X": loop}, seq=3)
    back = pickle.loads(pickle.dumps(state))
    assert back.assets["X"].to_dict() == loop.to_dict() and back.seq == 3
    drift = DriftActorState("X", "1-0", "2-0", _tracker(), seq=7, notified=True)
    again = pickle.loads(pickle.dumps(drift))
    assert again.tracker.status() == drift.tracker.status() and again.seq == 7
    safety = SafetyActorState("X", "3-0", SafetyTracker(SafetyConfig(), 1.0, "v1"), seq=2)
    assert pickle.loads(pickle.dumps(safety)).tracker.to_dict() == safety.tracker.to_dict()
