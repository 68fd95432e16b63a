"""Pairing of logged forecasts with realized returns, the comparison and the decision rules."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tickcast.config import ControllerConfig
from tickcast.monitoring.pnl import paper_returns, sharpe_ratio
from tickcast.monitoring.shadow_eval import (Comparison, Decision, Forecast, ForecastJoin,
                                             PairedSample, SlaFigures, compare_forecasts,
                                             decide_promotion, decide_rollback, parse_prediction,
                                             pinball_matrix, sla_since)
from training.evaluation import diebold_mariano, pinball_losses

MIN = 60_000_000_000


def _entry(**over: str) -> dict[bytes, bytes]:
    base = {"request_id": "r1", "asset": "BTC-USD", "slot": "blue", "version": "v1",
            "bar_ts": str(5 * MIN), "pred": "0.0001", "lo": "-0.001", "hi": "0.0012",
            "price": "20000.5", "ts": "123", "shadow": "0"}
    base.update(over)
    return {k.encode(): v.encode() for k, v in base.items()}


def _fc(version: str, bar: int, pred: float = 0.0, half: float = 1e-3) -> Forecast:
    return Forecast("BTC-USD", "blue", version, bar * MIN, pred, pred - half, pred + half)


# ----------------------------------------------------------------------------- parsing
def test_parse_prediction_reads_every_field() -> None:
    f, why = parse_prediction(_entry(shadow="1"))
    assert why is None and f is not None
    assert (f.asset, f.version, f.bar_ts, f.shadow, f.price, f.ts) == ("BTC-USD", "v1", 5 * MIN,
                                                                       True, 20000.5, 123)
    assert f.quantiles == (-0.001, 0.0001, 0.0012)


@pytest.mark.parametrize("over, reason", [
    ({"version": ""}, "missing:version"),
    ({"bar_ts": "x"}, "bad_number:bar_ts"),
    ({"bar_ts": "-1"}, "explicit_features"),
    ({"pred": "abc"}, "bad_number:pred"),
    ({"hi": "inf"}, "non_finite"),
    ({"lo": "0.01", "hi": "0.0"}, "bad_interval"),
])
def test_parse_prediction_rejects_with_a_reason(over: dict[str, str], reason: str) -> None:
    f, why = parse_prediction(_entry(**over))
    assert f is None and why == reason


def test_parse_prediction_tolerates_bad_optional_fields() -> None:
    f, why = parse_prediction(_entry(price="n/a", ts="later"))
    assert why is None and f is not None and math.isnan(f.price) and f.ts == 0


# ----------------------------------------------------------------------------- join
def test_join_pairs_first_forecast_per_bar_with_the_realized_return() -> None:
    join = ForecastJoin(("cand", "inc"), horizon=1, freq_ns=MIN)
    assert join.add([_fc("cand", 1, 0.002), _fc("inc", 1, 0.0), _fc("cand", 1, 0.5),
                     _fc("other", 1), _fc("inc", 2, 0.001)]) == 3
    assert join.duplicates == 1
    join.add_closes([MIN, 2 * MIN], [100.0, 101.0])
    assert join.settle() == 1  # bar 2 lacks the candidate and its label
    y, f, ts = join.take()
    assert ts.tolist() == [MIN]
    assert y[0] == pytest.approx(math.log(101.0 / 100.0))
    assert f[0, 0].tolist() == pytest.approx([0.001, 0.002, 0.003])  # the first, not 0.5
    # A late copy of a completed bar does not come back.
    join.add([_fc("cand", 1, 0.9), _fc("inc", 1, 0.9)])
    join.add_closes([3 * MIN], [102.0])
    assert join.settle() == 0 and join.take()[0].size == 0


def test_join_uses_the_horizon_and_times_out_incomplete_bars() -> None:
    join = ForecastJoin(("v",), horizon=2, freq_ns=MIN, timeout_bars=3)
    join.add([_fc("v", 0, 0.0), _fc("v", 1, 0.0)])
    join.add_closes([0, MIN, 2 * MIN], [100.0, 100.5, 99.0])
    assert join.settle() == 1
    y, _, ts = join.take()
    assert ts.tolist() == [0] and y[0] == pytest.approx(math.log(99.0 / 100.0))
    assert join.needed_range() == (MIN, 3 * MIN + 1)
    # Bar 3 (bar 1's label bar) never closes: bar 1 waits until its label bar is 3 bars older
    # than the newest close.
    join.add_closes([5 * MIN], [98.0])
    assert join.settle() == 0 and join.pending == 1
    join.add_closes([6 * MIN], [98.0])
    join.settle()
    assert join.pending == 0 and join.dropped == {"unlabeled": 1}


def test_join_drops_bars_missing_a_version_and_ignores_earlier_bars() -> None:
    join = ForecastJoin(("a", "b"), horizon=1, freq_ns=MIN, since_bar_ts=2 * MIN, timeout_bars=1)
    assert join.add([_fc("a", 1), _fc("b", 1)]) == 0  # before the evaluation started
    join.add([_fc("a", 2)])
    join.add_closes([2 * MIN, 3 * MIN, 4 * MIN], [1.0, 1.0, 1.0])
    join.settle()
    assert join.dropped == {"unpaired": 1} and join.completed == 0


def test_join_and_sample_pickle_round_trip() -> None:
    join = ForecastJoin(("a", "b"), horizon=1, freq_ns=MIN)
    join.add([_fc("a", 1, 0.001), _fc("b", 1)])
    join.add_closes([MIN], [100.0])
    copy = pickle.loads(pickle.dumps(join))
    for j in (join, copy):
        j.add_closes([2 * MIN], [100.2])
        assert j.settle() == 1
    np.testing.assert_array_equal(join.take()[1], copy.take()[1])
    sample = PairedSample("a", "b")
    sample.extend(np.array([0.1]), np.zeros((1, 2, 3)), np.array([7]))
    again = pickle.loads(pickle.dumps(sample))
    assert again.n == 1 and again.bar_ts == [7]


def test_join_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ForecastJoin(("a", "a"), 1, MIN)
    with pytest.raises(ValueError):
        ForecastJoin(("a",), 0, MIN)
    join = ForecastJoin(("a",), 1, MIN)
    with pytest.raises(Exception, match="differ in length"):
        join.add_closes([1, 2], [1.0])


# ----------------------------------------------------------------------------- comparison
def _pair(n: int, seed: int, edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Realized returns, a candidate that knows ``edge`` of the signal, a flat incumbent."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1e-3, n)
    y = edge * x + rng.normal(0, 6e-4, n)
    cand = np.column_stack([edge * x - 1.2e-3, edge * x, edge * x + 1.2e-3])
    inc = np.tile([-1.5e-3, 0.0, 1.5e-3], (n, 1))
    return y, cand, inc


def test_compare_matches_the_statistics_computed_by_hand() -> None:
    y, cand, inc = _pair(300, 1, 0.6)
    c = compare_forecasts(y, cand, inc, fee_bp=1.0, periods_per_year=525_600, horizon=1)
    la = np.mean([pinball_losses(y, cand[:, i], q) for i, q in enumerate((0.05, 0.5, 0.95))], axis=0)
    lb = np.mean([pinball_losses(y, inc[:, i], q) for i, q in enumerate((0.05, 0.5, 0.95))], axis=0)
    np.testing.assert_allclose(pinball_matrix(y, cand), la, rtol=1e-12)
    dm = diebold_mariano(la, lb, h=1)
    assert c.n == 300 and c.dm_stat == pytest.approx(dm.stat) and c.dm_p == pytest.approx(dm.p)
    assert c.p_candidate_better == pytest.approx(dm.p_a_better)
    assert c.p_candidate_worse == pytest.approx(1 - dm.p_a_better)
    assert c.loss_candidate == pytest.approx(la.mean()) and c.loss_incumbent == pytest.approx(lb.mean())
    rets = paper_returns(np.sign(cand[:, 1]), np.expm1(y), 1.0)
    assert c.sharpe_candidate == pytest.approx(sharpe_ratio(rets, 525_600))
    assert c.sharpe_incumbent == 0.0  # a flat forecast never trades
    assert c.to_dict()["candidate"] == "candidate"


def test_compare_rejects_bad_shapes_and_values() -> None:
    y, cand, inc = _pair(10, 2, 0.5)
    with pytest.raises(Exception, match="shape"):
        compare_forecasts(y, cand[:5], inc, fee_bp=1.0, periods_per_year=1.0)
    cand[0, 0] = np.nan
    with pytest.raises(Exception, match="non-finite"):
        compare_forecasts(y, cand, inc, fee_bp=1.0, periods_per_year=1.0)
    with pytest.raises(Exception, match="at least 2"):
        compare_forecasts(y[:1], inc[:1], inc[:1], fee_bp=1.0, periods_per_year=1.0)


# ----------------------------------------------------------------------------- promotion
CFG = ControllerConfig(min_paired=200, dm_alpha=0.05, watch_labels=150, sla_min_requests=20,
                       max_error_rate=0.05, max_sla_violation_rate=0.05)


def _cmp(seed: int, edge: float, n: int = 200, swap: bool = False) -> Comparison:
    y, cand, inc = _pair(n, seed, edge)
    if swap:
        cand, inc = inc, cand
    return compare_forecasts(y, cand, inc, fee_bp=0.0, periods_per_year=525_600)


def test_promotion_waits_for_enough_pairs() -> None:
    d = decide_promotion(_cmp(3, 0.6, n=50), 50, CFG)
    assert d.action == "wait" and d.evidence["paired"] == 50


def test_a_significantly_better_challenger_is_promoted_with_its_evidence() -> None:
    d = decide_promotion(_cmp(3, 0.6), 200, CFG)
    assert d.action == "promote"
    assert d.evidence["p_candidate_better"] < 0.05 and d.evidence["n"] == 200
    assert d.evidence["sharpe_candidate"] >= d.evidence["sharpe_incumbent"]
    assert "Diebold-Mariano" in d.evidence["test"]


def test_a_worse_or_equal_challenger_is_rejected() -> None:
    worse = decide_promotion(_cmp(4, 0.6, swap=True), 200, CFG)
    assert worse.action == "reject" and "not significantly better" in worse.reason
    y, cand, _ = _pair(200, 5, 0.6)
    same = compare_forecasts(y, cand, cand.copy(), fee_bp=0.0, periods_per_year=525_600)
    d = decide_promotion(same, 200, CFG)
    assert d.action == "reject" and same.dm_stat == 0.0 and same.p_candidate_better == 0.5


def test_a_better_loss_with_a_worse_sharpe_is_rejected() -> None:
    c = _cmp(3, 0.6)
    worse_sharpe = Comparison(**{**c.__dict__, "sharpe_candidate": c.sharpe_incumbent - 1.0})
    d = decide_promotion(worse_sharpe, 200, CFG)
    assert d.action == "reject" and "Sharpe" in d.reason
    tolerant = ControllerConfig(min_paired=200, sharpe_tolerance=2.0)
    assert decide_promotion(worse_sharpe, 200, tolerant).action == "promote"


# ----------------------------------------------------------------------------- rollback
def test_rollback_on_a_significantly_worse_new_champion() -> None:
    d = decide_rollback(_cmp(6, 0.6, n=150, swap=True), 150, SlaFigures(100, 0, 0), CFG)
    assert d.action == "rollback" and d.evidence["p_candidate_worse"] < 0.05
    keep = decide_rollback(_cmp(6, 0.6, n=150), 150, SlaFigures(100, 0, 0), CFG)
    assert keep.action == "keep"
    assert decide_rollback(None, 20, None, CFG).action == "wait"


@pytest.mark.parametrize("sla, action", [
    (SlaFigures(requests=100, errors=6, slow=0), "rollback"),  # 6 % errors > 5 %
    (SlaFigures(requests=100, errors=0, slow=6), "rollback"),  # latency SLA broken
    (SlaFigures(requests=100, errors=5, slow=5), "wait"),  # at the limits: not broken
    (SlaFigures(requests=10, errors=10, slow=10), "wait"),  # too few requests to judge
])
def test_rollback_on_a_broken_serving_sla(sla: SlaFigures, action: str) -> None:
    d = decide_rollback(None, 3, sla, CFG)
    assert d.action == action
    assert d.evidence["sla"]["requests"] == sla.requests


def test_sla_since_counts_from_the_baseline_and_survives_replica_restarts() -> None:
    buckets = [1.0, 10.0, 100.0]
    base = {"r1": {"buckets_ms": buckets, "requests": {"predict|blue|200": 50},
                   "sla_violations": {}, "latency_hist": {"predict|blue": [50, 0, 0, 0]}}}
    now = {"r1": {"buckets_ms": buckets,
                  "requests": {"predict|blue|200": 148, "predict|none|503": 2, "other|none|404": 9},
                  "sla_violations": {"predict|blue": 1},
                  "latency_hist": {"predict|blue": [50, 97, 2, 1]}},
           "r2": {"buckets_ms": buckets, "requests": {"batch|green|200": 3}, "sla_violations": {},
                  "latency_hist": {"batch|green": [0, 3, 0, 0]}}}
    sla = sla_since(base, now)
    assert (sla.requests, sla.errors, sla.slow) == (103, 2, 1)
    assert sla.p99_ms == 100.0 and sla.error_rate == pytest.approx(2 / 103)
    restarted = {"r1": {"buckets_ms": buckets, "requests": {"predict|blue|200": 4},
                        "sla_violations": {}, "latency_hist": {"predict|blue": [4, 0, 0, 0]}}}
    assert sla_since(base, restarted).requests == 4
    assert sla_since({}, {}) == SlaFigures(0, 0, 0, None)


def test_decisions_are_plain_data() -> None:
    d = Decision("reject", "why", {"a": 1})
    assert d.to_dict() == {"action": "reject", "reason": "why", "evidence": {"a": 1}}
    assert pickle.loads(pickle.dumps(d)) == d
