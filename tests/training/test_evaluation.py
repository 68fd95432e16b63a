"""Forecast statistics checked against hand computations, scipy and loop formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tickcast.config import ControllerConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.shadow_eval import compare_forecasts, decide_promotion, pinball_matrix
from training.evaluation import (
    DMResult,
    diebold_mariano,
    directional_accuracy,
    directional_counts,
    evaluate,
    interval_coverage,
    interval_width_bp,
    mae,
    pinball_loss,
    pinball_losses,
    rmse,
    sign_strategy,
    wilson_interval,
)


def dm_loop(a: list[float], b: list[float], h: int) -> tuple[float, float]:
    """Diebold-Mariano (1995) with the HLN (1997) correction, written out with plain loops."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    dbar = sum(d) / n
    gam = []
    for k in range(h):
        s = 0.0
        for t in range(k, n):
            s += (d[t] - dbar) * (d[t - k] - dbar)
        gam.append(s / n)
    var = (gam[0] + 2 * sum(gam[1:])) / n
    dm = dbar / math.sqrt(var)
    hln = dm * math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    p = 2 * (1 - stats.t.cdf(abs(hln), n - 1))
    return hln, p


def test_pinball_by_hand() -> None:
    y = np.array([0.01, -0.02, 0.0, 0.005])
    f = np.array([0.0, 0.0, 0.01, 0.005])
    q = 0.05
    # y above the quantile: q * (y - f); below: (1 - q) * (f - y).
    by_hand = [0.05 * 0.01, 0.95 * 0.02, 0.95 * 0.01, 0.0]
    np.testing.assert_allclose(pinball_losses(y, f, q), by_hand, rtol=1e-12)
    assert pinball_loss(y, f, q) == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    # At q = 0.5 the pinball loss is half the absolute error.
    assert pinball_loss(y, f, 0.5) == pytest.approx(0.5 * mae(y, f), rel=1e-12)
    with pytest.raises(InvalidInput) as exc:
        pinball_loss(y, f, 1.0)
    assert exc.value.field == "q"


def test_point_and_interval_metrics_by_hand() -> None:
    y = np.array([1e-4, -3e-4, 2e-4, 0.0])
    p = np.array([0.0, -1e-4, 1e-4, 1e-4])
    assert mae(y, p) == pytest.approx((1e-4 + 2e-4 + 1e-4 + 1e-4) / 4, rel=1e-12)
    assert rmse(y, p) == pytest.approx(math.sqrt((1e-8 + 4e-8 + 1e-8 + 1e-8) / 4), rel=1e-12)
    lo, hi = np.full(4, -2e-4), np.full(4, 2e-4)
    assert interval_coverage(y, lo, hi) == 0.75  # bounds inclusive: 2e-4 counts
    assert interval_width_bp(lo, hi) == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (517, 1000), (1, 2), (60, 100)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_directional_accuracy_excludes_zero_returns() -> None:
    y = np.array([0.1, -0.2, 0.0, 0.3, -0.1, 0.0])
    p = np.array([0.5, -0.1, 0.7, -0.2, 0.0, -0.3])
    hits, n, zero = directional_counts(y, p)
    assert (hits, n, zero) == (2, 4, 2)  # the 0.0 forecast is a miss, not excluded
    acc, lo, hi = directional_accuracy(y, p)
    ci = stats.binomtest(2, 4).proportion_ci(method="wilson")
    assert acc == 0.5 and lo == pytest.approx(ci.low) and hi == pytest.approx(ci.high)
    acc, lo, hi = directional_accuracy([0.0, 0.0], [1.0, -1.0])
    assert math.isnan(acc) and (lo, hi) == (0.0, 1.0)


def test_sign_strategy_by_hand_with_fees() -> None:
    y = np.log(np.array([1.01, 0.98, 1.02, 1.0]))
    pred = np.array([1.0, -1.0, -1.0, 0.0])
    fee_bp = 10.0
    # positions 1, -1, -1, 0: changes 1, 2, 0, 1 (units) at 10 bp each.
    r = [0.01 - 0.001, 0.02 - 0.002, -0.02, 0.0 - 0.001]
    out = sign_strategy(y, pred, fee_bp, periods_per_year=100)
    assert out["turnover"] == 4.0
    assert out["total_return"] == pytest.approx(np.prod(1 + np.array(r)) - 1, rel=1e-12)
    assert out["sharpe"] == pytest.approx(np.mean(r) / np.std(r, ddof=1) * 10, rel=1e-12)
    flat = sign_strategy(y, np.zeros(4), fee_bp)
    assert flat["sharpe"] == 0.0 and flat["total_return"] == 0.0
    with pytest.raises(InvalidInput) as exc:
        sign_strategy(y, pred, -1.0)
    assert exc.value.field == "fee_bp"


@pytest.mark.parametrize("h", [1, 2, 5])
def test_diebold_mariano_matches_loop_formula(h: int) -> None:
    rng = np.random.default_rng(h)
    e = rng.normal(size=300)
    a = np.abs(e + rng.normal(0, 0.3, 300))
    b = np.abs(e + 0.1 + rng.normal(0, 0.3, 300))
    res = diebold_mariano(a, b, h=h)
    stat, p = dm_loop(a.tolist(), b.tolist(), h)
    assert isinstance(res, DMResult) and res.n == 300 and res.h == h
    assert res.stat == pytest.approx(stat, rel=1e-10)
    assert res.p == pytest.approx(p, rel=1e-8)
    assert res.mean_diff == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert res.p_a_better == pytest.approx(stats.t.cdf(stat, 299), rel=1e-8)


def test_diebold_mariano_sanity() -> None:
    rng = np.random.default_rng(11)
    y = rng.normal(size=400)
    same = np.abs(y - 0.1)
    r = diebold_mariano(same, same.copy())
    assert (r.stat, r.p, r.mean_diff) == (0.0, 1.0, 0.0)
    good, bad = np.abs(y - y * 0.8), np.abs(y)
    r = diebold_mariano(good, bad)
    assert r.stat < -5 and r.p < 1e-6 and r.p_a_better < 1e-6
    r = diebold_mariano(bad, good)
    assert r.stat > 5 and r.p_a_better > 1 - 1e-6
    # Constant, nonzero difference: no noise at all, the better one is certainly better, so
    # the one-sided p-value of "a is better" is 0 (the limit of t.cdf at -inf), and 1 the other
    # way round.
    r = diebold_mariano(np.full(50, 1.0), np.full(50, 2.0))
    assert r.stat == -math.inf and r.p == 0.0 and r.p_a_better == 0.0
    r = diebold_mariano(np.full(50, 2.0), np.full(50, 1.0))
    assert r.stat == math.inf and r.p == 0.0 and r.p_a_better == 1.0


def test_diebold_mariano_same_sign_differences_agree_with_the_t_limit() -> None:
    # Every difference negative (a always better): with noise the p-value comes from the t
    # distribution and is tiny; without noise it must be its limit, 0, not 1.
    rng = np.random.default_rng(5)
    b = 1.0 + rng.random(60)
    noisy = diebold_mariano(b - 0.5 - 0.1 * rng.random(60), b)
    constant = diebold_mariano(b - 0.5, b)
    assert noisy.p_a_better < 1e-10 and constant.p_a_better == 0.0
    assert noisy.p_a_better == pytest.approx(stats.t.cdf(noisy.stat, 59), rel=1e-8)


@pytest.mark.parametrize("noise", [0.0, 1e-5])
def test_decide_promotion_accepts_a_challenger_that_is_always_better(noise: float) -> None:
    # The challenger's forecast is the realized return itself, the champion's is off by 2 bp
    # every bar: the challenger's pinball loss is lower on every bar. With noise = 0 the
    # returns are all the same, so every loss difference is the same number (no variance).
    n = 300
    rng = np.random.default_rng(9)
    y = 5e-4 + noise * rng.standard_normal(n)
    half = 3e-4
    challenger = np.column_stack([y - half, y, y + half])
    champion = challenger + 2e-4
    cmp = compare_forecasts(y, challenger, champion, fee_bp=1.0, periods_per_year=525_600)
    assert (pinball_matrix(y, challenger) < pinball_matrix(y, champion)).all()
    assert cmp.dm_stat < 0 and cmp.p_candidate_better < 1e-6 and cmp.p_candidate_worse > 0.99
    decision = decide_promotion(cmp, n, ControllerConfig(min_paired=200))
    assert decision.action == "promote", decision.reason


def test_diebold_mariano_size_under_the_null() -> None:
    rng = np.random.default_rng(123)
    rejections = 0
    trials = 400
    for _ in range(trials):
        y = rng.normal(size=120)
        a = np.abs(y - rng.normal(0, 0.5, 120))
        b = np.abs(y - rng.normal(0, 0.5, 120))
        rejections += diebold_mariano(a, b).p < 0.05
    assert 0.025 <= rejections / trials <= 0.08


def test_diebold_mariano_rejects_bad_input() -> None:
    with pytest.raises(InvalidInput) as exc:
        diebold_mariano([1.0, 2.0], [1.0])
    assert exc.value.field == "loss_a"
    with pytest.raises(InvalidInput) as exc:
        diebold_mariano([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])
    assert exc.value.field == "loss_a"
    with pytest.raises(InvalidInput) as exc:
        diebold_mariano([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], h=0)
    assert exc.value.field == "h"
    with pytest.raises(InvalidInput):
        diebold_mariano([1.0], [2.0])


def synthetic(n: int, signal: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1e-3, n)  # a predictable part
    y = signal * x + rng.normal(0, 1e-3, n)
    q50 = signal * x
    s = 1.645e-3
    return y, q50 - s, q50, q50 + s


def test_evaluate_verdict_when_the_model_has_skill() -> None:
    y, q05, q50, q95 = synthetic(3000, 1.0, 1)
    out = evaluate(y, q05, q50, q95, fee_bp=0.0)
    assert out["n"] == 3000 and out["n_dropped"] == 0
    assert 0.88 <= out["coverage_90"] <= 0.92
    assert out["interval_width_bp"] == pytest.approx(2 * 16.45, rel=1e-9)
    assert out["directional_accuracy"] > 0.6
    lo, hi = out["directional_ci95"]
    assert lo < out["directional_accuracy"] < hi
    assert out["dm_vs_random_walk"]["stat"] < 0 and out["dm_vs_random_walk"]["p"] < 0.05
    assert out["dm_vs_random_walk"]["loss"] == "absolute_error_of_median"
    assert out["verdict"].startswith("The model beats the random walk at 5%")
    assert out["sharpe"] > 0 and out["total_return"] > 0
    assert out["pinball"] == pytest.approx(np.mean([pinball_loss(y, f, q) for f, q in
                                                    ((q05, .05), (q50, .5), (q95, .95))]))
    json.dumps(out)  # the backtest writes it into the model card


def test_evaluate_verdict_without_skill_and_with_gaps() -> None:
    y, q05, q50, q95 = synthetic(2000, 0.0, 2)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1e-3, 2000)  # a forecast that is pure noise is worse than zero
    y[::100] = np.nan
    out = evaluate(y, q05 + noise, q50 + noise, q95 + noise, fee_bp=1.0)
    assert out["n"] == 1980 and out["n_dropped"] == 20
    assert "WORSE than the random walk" in out["verdict"] or "does not beat" in out["verdict"]
    assert out["dm_vs_random_walk"]["p_model_better"] > 0.5
    # Calibrated bounds replace [q05, q95] for coverage and width.
    out2 = evaluate(y, q05, q50, q95, 1.0, lo=q05 - 1.0, hi=q95 + 1.0)
    assert out2["coverage_90"] == 1.0
    with pytest.raises(InvalidInput) as exc:
        evaluate(y, q05, q50, q95, 1.0, lo=q05)
    assert exc.value.field == "hi"


def test_evaluate_small_and_empty_inputs() -> None:
    out = evaluate([np.nan], [0.0], [0.0], [0.0], 1.0)
    assert out["n"] == 0 and "No realized labels" in out["verdict"]
    out = evaluate([0.001], [-0.01], [0.0], [0.01], 1.0)
    assert out["n"] == 1 and "Too few labels" in out["verdict"]
    with pytest.raises(InvalidInput) as exc:
        evaluate([0.1, 0.2], [0.0], [0.0, 0.0], [0.0, 0.0], 1.0)
    assert exc.value.field == "y"
