"""Conformal calibration: finite-sample quantile, causality, regime change, state round trips."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from tickcast.config import load_settings
from tickcast.errors import InvalidInput
from training.conformal import ConformalCalibrator

CHANGE = 6000


def regime_change(seed: int, T: int = 12_000) -> tuple[np.ndarray, ...]:
    """Heteroscedastic returns (Student-t, intraday vol cycle) whose vol triples at CHANGE.

    The "model" does not know about the change: its quantiles stay fixed. ``sigma`` is the
    causal realized vol of the ten previous labels (all realized before the forecast).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    vol = 1e-3 * (1 + 0.5 * np.sin(2 * np.pi * t / 1440)) * np.where(t < CHANGE, 1.0, 3.0)
    y = vol * rng.standard_t(5, T) / math.sqrt(5 / 3)
    sq = np.concatenate((np.full(10, np.nan), y ** 2))
    sigma = np.sqrt(np.lib.stride_tricks.sliding_window_view(sq, 10)[:T].mean(axis=1))
    return y, np.full(T, -1.2e-3), np.full(T, 1.2e-3), sigma


def coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.mean((y >= lo) & (y <= hi)))


def test_scores_and_finite_sample_quantile() -> None:
    cal = ConformalCalibrator(alpha=0.1, window=50, scaled=False)
    s = cal.scores([0.5, -3.0, 0.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 2.0])
    np.testing.assert_allclose(s, [-0.5, 2.0, -1.0])
    cal.fit(np.arange(1.0, 20.0))  # 19 scores: k = ceil(0.9 * 20) = 18
    assert cal.offset == 18.0
    lo, hi = cal.interval(-1.0, 1.0)
    assert (float(lo), float(hi)) == (-19.0, 19.0)
    scaled = ConformalCalibrator(alpha=0.2, window=50, scaled=True)
    np.testing.assert_allclose(scaled.scores([3.0], [0.0], [1.0], [2.0]), [1.0])
    scaled.fit([1.0, 2.0, 3.0, 4.0])  # k = ceil(0.8 * 5) = 4
    lo, hi = scaled.interval([0.0], [1.0], [0.5])
    assert (lo[0], hi[0]) == (-2.0, 3.0)
    assert ConformalCalibrator(alpha=0.1, window=50).offset == 0.0  # nothing known yet


def test_sigma_floor_and_fallback() -> None:
    cal = ConformalCalibrator(alpha=0.1, window=100, scaled=True, sigma_floor=1e-4)
    cal.fit([1.0] * 20, sigmas=[2e-3] * 10 + [4e-3] * 10)
    np.testing.assert_allclose(cal.effective_sigma([5e-5, np.nan, 0.0, 2e-3]),
                               [1e-4, 3e-3, 3e-3, 2e-3])
    with pytest.raises(InvalidInput) as exc:
        cal.interval(0.0, 1.0)
    assert exc.value.field == "sigma"


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_coverage_is_nominal_after_a_regime_change(seed: int) -> None:
    y, q05, q95, sigma = regime_change(seed)
    cal_rows = slice(10, 2000)
    after = slice(CHANGE - 2000, None)  # rows after the change, in the backtest's frame
    results = {}
    for name, kw in {"scaled+aci": {"scaled": True, "aci_gamma": 0.005},
                     "unscaled+aci": {"scaled": False, "aci_gamma": 0.005}}.items():
        cal = ConformalCalibrator(alpha=0.1, window=720, **kw)
        cal.fit_residuals(y[cal_rows], q05[cal_rows], q95[cal_rows], sigma[cal_rows])
        lo, hi = cal.rolling_intervals(y[2000:], q05[2000:], q95[2000:], sigma[2000:])
        results[name] = coverage(y[2000:][after], lo[after], hi[after])
        assert 0.87 <= coverage(y[2000:CHANGE], lo[:CHANGE - 2000], hi[:CHANGE - 2000]) <= 0.93
    for name, cov in results.items():
        assert 0.87 <= cov <= 0.93, (name, cov)
    # The same offsets frozen at calibration time fail badly after the change.
    static = ConformalCalibrator(alpha=0.1, window=720, scaled=False)
    static.fit_residuals(y[cal_rows], q05[cal_rows], q95[cal_rows])
    lo, hi = static.interval(q05[CHANGE:], q95[CHANGE:])
    assert coverage(y[CHANGE:], lo, hi) < 0.75


@pytest.mark.parametrize("horizon", [1, 3])
def test_rolling_intervals_are_causal(horizon: int) -> None:
    y, q05, q95, sigma = regime_change(4, T=1500)
    base = ConformalCalibrator(alpha=0.1, window=200, scaled=True, aci_gamma=0.01)
    base.fit_residuals(y[10:400], q05[10:400], q95[10:400], sigma[10:400])
    j = 900
    a, b = pickle.loads(pickle.dumps(base)), pickle.loads(pickle.dumps(base))
    lo_a, hi_a = a.rolling_intervals(y[400:], q05[400:], q95[400:], sigma[400:], horizon=horizon)
    y2 = y.copy()
    y2[400 + j] = 1.0  # an absurd label at row j
    lo_b, hi_b = b.rolling_intervals(y2[400:], q05[400:], q95[400:], sigma[400:], horizon=horizon)
    k = j + horizon  # the first row allowed to know label j
    np.testing.assert_array_equal(lo_a[:k], lo_b[:k])
    np.testing.assert_array_equal(hi_a[:k], hi_b[:k])
    assert not np.array_equal(hi_a[k:], hi_b[k:])


def test_gaps_in_labels_and_forecasts() -> None:
    y, q05, q95, sigma = regime_change(5, T=600)
    y[100:110] = np.nan
    q05 = q05.copy()
    q05[300] = np.nan
    cal = ConformalCalibrator(alpha=0.1, window=100, scaled=True, aci_gamma=0.005)
    cal.fit_residuals(y[10:110], q05[10:110], q95[10:110], sigma[10:110])
    lo, hi = cal.rolling_intervals(y, q05, q95, sigma)
    assert math.isnan(lo[300]) and math.isnan(hi[300])
    assert np.isfinite(lo[301:]).all()
    assert cal.updates == 600 - 1 - 10 - 1  # last label pending, 10 NaN labels, 1 NaN forecast


def test_aci_widens_after_misses_and_stays_bounded() -> None:
    cal = ConformalCalibrator(alpha=0.1, window=100, scaled=False, aci_gamma=0.05)
    cal.fit(np.linspace(0.0, 1.0, 100))
    before = cal.offset
    assert [cal.update(10.0, -0.1, 0.1) for _ in range(3)] == [False, False, True]
    assert cal.alpha_t < 0.1 and cal.offset == pytest.approx(9.9)  # widened to the big score
    # Ever larger misses: alpha_t is held at 0 (no windup) and the offset stays finite.
    for i in range(50):
        assert cal.update(100.0 * (i + 1), -0.1, 0.1) is False
    assert cal.alpha_t == 0.0 and math.isfinite(cal.offset)
    # Back to calm: every covered label raises alpha_t by gamma * alpha.
    for _ in range(4):
        assert cal.update(0.0, -0.1, 0.1) is True
    assert cal.alpha_t == pytest.approx(4 * 0.05 * 0.1) and before < cal.offset
    assert cal.update(float("nan"), 0.0, 0.0) is None


def test_state_json_and_pickle_round_trip() -> None:
    y, q05, q95, sigma = regime_change(6, T=3000)
    cal = ConformalCalibrator.from_config(load_settings().model)
    assert (cal.alpha, cal.window, cal.scaled) == (pytest.approx(0.1), 720, True)
    cal.fit_residuals(y[10:1000], q05[10:1000], q95[10:1000], sigma[10:1000])
    cal.rolling_intervals(y[1000:2000], q05[1000:2000], q95[1000:2000], sigma[1000:2000])
    state = json.loads(json.dumps(cal.state()))
    assert state["method"] == "split_conformal_rolling+aci" and state["n_scores"] == 720
    assert 0.8 < state["recent_coverage"] < 1.0
    clones = [ConformalCalibrator.from_state(state), pickle.loads(pickle.dumps(cal))]
    for clone in clones:
        assert clone.offset == cal.offset and clone.alpha_t == cal.alpha_t
        lo_c, hi_c = clone.interval(q05[2000:], q95[2000:], sigma[2000:])
        lo, hi = cal.interval(q05[2000:], q95[2000:], sigma[2000:])
        np.testing.assert_array_equal(lo_c, lo)
        np.testing.assert_array_equal(hi_c, hi)
    a, b = clones[0], clones[1]
    np.testing.assert_array_equal(a.rolling_intervals(y[2000:], q05[2000:], q95[2000:], sigma[2000:])[1],
                                  b.rolling_intervals(y[2000:], q05[2000:], q95[2000:], sigma[2000:])[1])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ConformalCalibrator(alpha=1.5)
    with pytest.raises(ValueError, match="window"):
        ConformalCalibrator(window=1)
    with pytest.raises(ValueError, match="aci_gamma"):
        ConformalCalibrator(aci_gamma=-0.1)
    with pytest.raises(InvalidInput) as exc:
        ConformalCalibrator.from_state({"alpha": 0.1, "window": 10, "scaled": True})
    assert exc.value.field == "aci_gamma"
    with pytest.raises(InvalidInput) as exc:
        ConformalCalibrator().rolling_intervals([0.0, 1.0], [0.0], [0.0], [1.0])
    assert exc.value.field == "y"
    with pytest.raises(InvalidInput) as exc:
        ConformalCalibrator().rolling_intervals([0.0], [0.0], [0.0], [1.0], horizon=0)
    assert exc.value.field == "horizon"
