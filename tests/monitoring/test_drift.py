"""Window drift statistics (incremental vs scipy), performance drift and the combined monitor."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy, ks_2samp, wasserstein_distance

from tickcast.config import DriftConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.concept import DriftKind
from tickcast.monitoring.drift import (
    DriftMonitor,
    PerformanceDrift,
    Reference,
    WindowDrift,
    level_of,
    psi_from_counts,
    to_score,
    two_sample_ks_w1,
)


def _psi_direct(ref: np.ndarray, win: np.ndarray, bins: int, eps: float) -> float:
    """PSI from scratch: quantile edges of the reference, both samples histogrammed."""
    edges = np.quantile(ref, np.arange(1, bins) / bins)
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=bins) / ref.size
    w = np.bincount(np.searchsorted(edges, win, side="right"), minlength=bins) / win.size
    r, w = np.maximum(r, eps), np.maximum(w, eps)
    return float(np.sum((w - r) * np.log(w / r)))


def _tvd_kl_direct(ref: np.ndarray, win: np.ndarray, bins: int, a: float) -> tuple[float, float]:
    """TVD and KL(P_ref || P_live) from scratch: np.histogram on the reference's quantile edges,
    KL by scipy.stats.entropy on histograms smoothed by ``a`` per bin."""
    inner = np.quantile(ref, np.arange(1, bins) / bins)
    # np.histogram's bins are half-open [e_k, e_k+1) like the monitor's, bar the last one,
    # which is closed; outer edges beyond every value keep the two identical.
    lo, hi = min(ref.min(), win.min()) - 1.0, max(ref.max(), win.max()) + 1.0
    # Tied inner edges make empty bins; np.histogram needs increasing edges, so count on
    # the distinct edges and put the empty bins back (they hold nothing in either sample).
    edges, first = np.unique(inner, return_index=True)
    last = np.r_[first[1:], inner.size] - 1  # the last copy of each distinct edge
    r_u = np.histogram(ref, np.r_[lo, edges, hi])[0]
    w_u = np.histogram(win, np.r_[lo, edges, hi])[0]
    r, w = np.zeros(bins), np.zeros(bins)
    r[np.r_[0, last + 1]], w[np.r_[0, last + 1]] = r_u, w_u
    tvd = 0.5 * np.abs(w / w.sum() - r / r.sum()).sum()
    kl = entropy(r + a, w + a)  # entropy(p, q) normalizes both and returns sum p log(p / q)
    return float(tvd), float(kl)


def _check_against_scipy(wd: WindowDrift, raw_ref: np.ndarray, stream: np.ndarray) -> None:
    window = stream[-wd.window:]
    assert np.array_equal(wd.values(), window)
    assert np.array_equal(wd.sorted_values(), np.sort(window.T, axis=1))
    st = wd.stats()
    for j in range(raw_ref.shape[1]):
        ks = ks_2samp(raw_ref[:, j], window[:, j]).statistic
        w1 = wasserstein_distance(raw_ref[:, j], window[:, j])
        assert math.isclose(st.ks[j], ks, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(st.wasserstein_raw[j], w1, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(st.wasserstein[j], w1 / wd.reference.scale[j], rel_tol=1e-9)
        psi = _psi_direct(raw_ref[:, j], window[:, j], wd.reference.psi_bins, wd.psi_epsilon)
        assert math.isclose(st.psi[j], psi, rel_tol=1e-9, abs_tol=1e-12)
        tvd, kl = _tvd_kl_direct(raw_ref[:, j], window[:, j], wd.reference.psi_bins,
                                 wd.kl_pseudocount)
        assert math.isclose(st.tvd[j], tvd, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(st.kl[j], kl, rel_tol=1e-9, abs_tol=1e-12)


def test_two_sample_ks_w1_equals_scipy_including_ties() -> None:
    rng = np.random.default_rng(0)
    for n, m, discrete in ((300, 80, False), (200, 200, True), (57, 13, True)):
        r = rng.normal(size=(3, n))
        w = rng.normal(0.3, 1.2, size=(3, m))
        if discrete:  # many ties, within and across samples
            r, w = np.round(r * 2) / 2, np.round(w * 2) / 2
        ks, w1 = two_sample_ks_w1(np.sort(r, axis=1), np.sort(w, axis=1))
        for j in range(3):
            assert math.isclose(ks[j], ks_2samp(r[j], w[j]).statistic, rel_tol=1e-12)
            assert math.isclose(w1[j], wasserstein_distance(r[j], w[j]), rel_tol=1e-9)


@pytest.mark.parametrize("discrete", [False, True])
def test_incremental_window_matches_scipy_through_mixed_batches(discrete: bool) -> None:
    rng = np.random.default_rng(42)
    raw_ref = rng.normal(size=(1500, 3)) * [1.0, 5.0, 0.1]
    stream = rng.normal(size=(4000, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, 0.05]
    if discrete:  # ties everywhere: evicting one of several equal values must stay exact
        raw_ref, stream = np.round(raw_ref), np.round(stream)
    ref = Reference.from_array(raw_ref, ["a", "b", "c"], psi_bins=10)
    wd = WindowDrift(ref, window=300)
    sizes = [1, 1, 5, 40, 1, 120, 200, 1, 1, 299, 300, 301, 17, 1, 64]
    pos = 0
    checks = 0
    while pos < stream.shape[0]:
        b = sizes[checks % len(sizes)]
        wd.update(stream[pos: pos + b] if b > 1 else stream[pos])
        pos = min(pos + b, stream.shape[0])
        checks += 1
        if pos >= 300 and checks % 3 == 0:
            _check_against_scipy(wd, raw_ref, stream[:pos])
    _check_against_scipy(wd, raw_ref, stream)
    # The PSI bin counts are maintained incrementally; compare with a recount.
    edges = ref.psi_edges
    recount = np.stack([np.bincount(np.searchsorted(edges[j], stream[-300:, j], side="right"),
                                    minlength=10) for j in range(3)])
    assert np.array_equal(wd.bin_counts(), recount)


def test_filling_window_matches_scipy() -> None:
    rng = np.random.default_rng(8)
    raw_ref = rng.normal(size=(500, 2))
    stream = rng.normal(size=(120, 2))
    wd = WindowDrift(Reference.from_array(raw_ref, ["x", "y"]), window=200)
    for i in range(0, 120, 30):
        for row in stream[i: i + 15]:
            wd.update(row)
        wd.update(stream[i + 15: i + 30])
        assert wd.count == i + 30
        st = wd.stats()
        for j in range(2):
            assert math.isclose(st.ks[j], ks_2samp(raw_ref[:, j], stream[: i + 30, j]).statistic,
                                rel_tol=1e-12)


def test_window_rejects_non_finite_rows_and_bad_shapes() -> None:
    ref = Reference.from_array(np.random.default_rng(1).normal(size=(100, 2)), ["a", "b"])
    wd = WindowDrift(ref, window=50)
    assert wd.update([[0.0, 1.0], [np.nan, 0.0], [1.0, -np.inf], [2.0, 2.0]]) == 2
    assert wd.rejected == 2 and wd.count == 2
    with pytest.raises(InvalidInput) as err:
        wd.update([1.0, 2.0, 3.0])
    assert err.value.field == "values"
    with pytest.raises(InvalidInput):
        WindowDrift(ref, window=10).stats()


def test_reference_construction_and_checks() -> None:
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"ret": rng.normal(size=400), "flag": np.r_[np.ones(340), np.zeros(60)],
                          "name": ["x"] * 400})
    frame.loc[:4, "ret"] = np.nan  # warm-up rows are dropped
    ref = Reference.from_frame(frame, psi_bins=5)
    assert ref.names == ("ret", "flag") and ref.n_rows == 395
    # "flag" has IQR 0 (85 % ones): W1 is scaled by its std instead.
    assert ref.scale[1] == pytest.approx(frame["flag"].iloc[5:].std(ddof=0))
    assert np.isclose(ref.psi_fractions.sum(axis=1), 1.0).all()
    with pytest.raises(InvalidInput, match="lacks"):
        Reference.from_frame(frame, columns=["ret", "volume"])
    with pytest.raises(InvalidInput, match="finite rows"):
        Reference.from_array(np.full((50, 1), np.nan), ["a"])
    with pytest.raises(InvalidInput, match="shape"):
        Reference.from_array(np.zeros((50, 2)), ["a"])
    with pytest.raises(InvalidInput, match="distinct"):
        Reference.from_array(np.zeros((50, 2)), ["a", "a"])


def test_reference_reads_parquet(tmp_path) -> None:
    frame = pd.DataFrame({"a": np.arange(100.0), "b": np.arange(100.0) ** 2})
    frame.to_parquet(tmp_path / "reference.parquet")
    ref = Reference.read_parquet(tmp_path / "reference.parquet", psi_bins=4, columns=["b", "a"])
    assert ref.names == ("b", "a")
    assert ref.sorted[1, -1] == 99.0


def test_psi_and_score_mapping() -> None:
    counts = np.array([[0, 100]])
    assert psi_from_counts(counts, np.array([[0.5, 0.5]]), 1e-4)[0] > 4  # empty bin: large, finite
    cfg = DriftConfig()
    assert to_score(cfg.psi_warning, cfg.psi_warning, cfg.psi_critical, 0.15, 0.3) == pytest.approx(0.15)
    assert to_score(cfg.psi_critical, cfg.psi_warning, cfg.psi_critical, 0.15, 0.3) == pytest.approx(0.3)
    assert to_score(1.6, 1.25, 1.6, 0.15, 0.3, origin=1.0) == pytest.approx(0.3)
    assert to_score(0.8, 1.25, 1.6, 0.15, 0.3, origin=1.0) == 0.0  # better than validation
    assert [level_of(s, cfg) for s in (0.1, 0.15, 0.29, 0.3)] == ["NORMAL", "WARNING", "WARNING",
                                                                   "CRITICAL"]


def test_performance_drift_matches_direct_computation() -> None:
    rng = np.random.default_rng(4)
    q = np.array([0.05, 0.5, 0.95])
    f = np.sort(rng.normal(size=(300, 3)), axis=1)
    y = rng.normal(size=300)
    perf = PerformanceDrift(0.4, 0.8, q, window=100)
    perf.update(f[:150], y[:150])
    for i in range(150, 300):
        perf.update(f[i], y[i])
    err = y[-100:, None] - f[-100:]
    pinball = np.maximum(q * err, (q - 1) * err).mean()
    mae = np.abs(err[:, 1]).mean()
    assert math.isclose(perf.pinball(), pinball, rel_tol=1e-12)
    assert math.isclose(perf.mae(), mae, rel_tol=1e-12)
    assert perf.ratios() == pytest.approx((pinball / 0.4, mae / 0.8))
    assert perf.update([[0.0, np.nan, 1.0]], [0.0]) == 0 and perf.rejected == 1
    with pytest.raises(InvalidInput) as err_:
        PerformanceDrift(float("nan"), 1.0)
    assert err_.value.field == "validation_pinball"
    with pytest.raises(ValueError, match="0.5"):
        PerformanceDrift(1.0, 1.0, quantiles=(0.1, 0.9))
    with pytest.raises(InvalidInput) as err_:
        perf.update(f[:3], y[:2])
    assert err_.value.field == "realized"


def _monitor(seed: int = 0, **overrides) -> tuple[DriftMonitor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    cfg = DriftConfig(**overrides)
    feats = Reference.from_array(rng.normal(size=(2000, 6)), [f"f{i}" for i in range(6)])
    preds = Reference.from_array(rng.normal(0.0, 1e-4, size=(1000, 1)), ["pred"])
    return DriftMonitor(cfg, feats, preds, validation_pinball=0.5, validation_mae=1.0), rng


def test_calm_stream_stays_normal_without_events() -> None:
    mon, rng = _monitor()
    events = []
    for _ in range(40):
        events += mon.update_features(rng.normal(size=(250, 6)))
        events += mon.update_predictions(rng.normal(0.0, 1e-4, size=(250, 1)))
    assert events == []
    rep = mon.report
    assert rep.level == "NORMAL" and not rep.retrain and rep.score < 0.15
    assert rep.performance_score is None  # no labels yet
    assert set(rep.features) == {f"f{i}" for i in range(6)}
    assert rep.events_seen["features"] == 10_000


def test_broad_feature_shift_goes_critical_with_retrain_and_evidence() -> None:
    mon, rng = _monitor()
    mon.update_features(rng.normal(size=(1000, 6)))
    shifted = rng.normal(size=(600, 6)) + [1.5, 1.5, 1.5, 1.5, 0, 0]
    events = []
    for i in range(0, 600, 20):
        events += mon.update_features(shifted[i: i + 20])
    kinds = [e["type"] for e in events]
    assert kinds[0] == "drift_change"  # the streaming detector speaks first
    assert kinds.count("drift_retrain") == 1
    levels = [(e["from"], e["to"]) for e in events if e["type"] == "drift_level"]
    assert levels[0] == ("NORMAL", "WARNING") and levels[-1][1] == "CRITICAL"
    rep = mon.report
    assert rep.level == "CRITICAL" and rep.retrain
    assert rep.drifted_features == ("f0", "f1", "f2", "f3")
    # Default scoring: feature score = mean over all columns of the column scores.
    assert rep.feature_score == pytest.approx(np.mean([v["score"] for v in rep.features.values()]))
    assert rep.drift_kind is DriftKind.COVARIATE and rep.concept_score is None  # no labels yet
    retrain = next(e for e in events if e["type"] == "drift_retrain")
    assert retrain["score"] > 0.2 and retrain["retrain_score"] == 0.2
    assert set(list(retrain["top_features"])[:4]) == {"f0", "f1", "f2", "f3"}


def _mapped_column_score(v: dict[str, float], cfg: DriftConfig) -> float:
    """A column's score written out: each measure mapped, capped at 1, weighted mean."""
    def m(x: float, lo: float, hi: float) -> float:
        return min(1.0, float(to_score(x, lo, hi, cfg.warning_score, cfg.critical_score)))
    parts = [(cfg.weight_ks, min(1.0, v["ks"])),
             (cfg.weight_psi, m(v["psi"], cfg.psi_warning, cfg.psi_critical)),
             (cfg.weight_w1, m(v["wasserstein"], cfg.w1_warning, cfg.w1_critical)),
             (cfg.weight_tvd, m(v["tvd"], cfg.tvd_warning, cfg.tvd_critical)),
             (cfg.weight_kl, m(v["kl"], cfg.kl_warning, cfg.kl_critical))]
    return sum(w * x for w, x in parts) / sum(w for w, _ in parts)


def test_scoring_weights_and_top_fraction_follow_the_config() -> None:
    rng = np.random.default_rng(12)
    ref = Reference.from_array(rng.normal(size=(2000, 4)), ["a", "b", "c", "d"])
    live = rng.normal(size=(500, 4)) + [1.0, 0.0, 0.0, 0.0]
    only_ks = {"weight_psi": 0.0, "weight_w1": 0.0, "weight_tvd": 0.0, "weight_kl": 0.0}
    configs = {"default": DriftConfig(), "ks": DriftConfig(**only_ks),
               "kl": DriftConfig(**{**only_ks, "weight_ks": 0.0, "weight_kl": 1.0}),
               "equal": DriftConfig(weight_psi=1.0, weight_w1=1.0, weight_tvd=1.0, weight_kl=1.0),
               "top": DriftConfig(feature_top_fraction=0.25)}
    reports = {}
    for name, cfg in configs.items():
        mon = DriftMonitor(cfg, ref)
        mon.update_features(live)
        reports[name] = mon.report
    st = reports["default"].features
    # Every measure counts by default: PSI, W1, TVD and KL each carry weight.
    default = DriftConfig()
    assert min(default.weight_psi, default.weight_w1, default.weight_tvd, default.weight_kl) > 0
    for name in ("default", "ks", "kl", "equal"):
        want = np.mean([_mapped_column_score(v, configs[name]) for v in st.values()])
        assert reports[name].feature_score == pytest.approx(want, rel=1e-12)
    assert reports["ks"].feature_score == pytest.approx(np.mean([v["ks"] for v in st.values()]))
    top = _mapped_column_score(st["a"], configs["top"])  # the top 1 of 4
    assert reports["top"].feature_score == pytest.approx(top)
    # The shifted column carries the score: the other measures agree with KS on it.
    assert st["a"]["tvd"] > 0.3 and st["a"]["kl"] > 0.3 and max(
        st[k]["tvd"] for k in "bcd") < 0.15


def test_detector_alarm_raises_warning_before_the_window_sees_the_shift() -> None:
    mon, rng = _monitor(seed=3)
    mon.update_features(rng.normal(size=(2000, 6)))
    events = []
    for i in range(150):
        row = rng.normal(size=6)
        row[4] += 1.0
        events += mon.update_features(row)
        if any(e["type"] == "drift_change" for e in events):
            break
    change = next(e for e in events if e["type"] == "drift_change")
    assert change["column"] == "f4" and change["side"] == "up"
    assert mon.report.change_detected and mon.level == "WARNING"
    assert mon.report.feature_score < 0.15  # the window statistics lag behind
    # Calm again: after alarm_hold_events the level returns to NORMAL.
    back = []
    for _ in range(12):
        back += mon.update_features(rng.normal(size=(50, 6)))
    assert ("WARNING", "NORMAL") in [(e["from"], e["to"]) for e in back if e["type"] == "drift_level"]


def test_prediction_and_performance_drift_count_in_the_score() -> None:
    mon, rng = _monitor(seed=5)
    mon.update_features(rng.normal(size=(1000, 6)))
    events = mon.update_predictions(rng.normal(0.0, 1e-4, size=(600, 1)) + 3e-4)
    assert [e["type"] for e in events if e["type"] != "drift_change"] == ["drift_level", "drift_retrain"]
    assert mon.report.prediction_score > 0.3 and mon.report.level == "CRITICAL"

    mon2, rng = _monitor(seed=6)
    mon2.update_features(rng.normal(size=(1000, 6)))
    realized = rng.normal(0.0, 4.0, size=200)  # four times the validation scale
    forecasts = np.tile([-6.6, 0.0, 6.6], (200, 1))  # a calibrated 90 % interval for it
    events = mon2.update_outcomes(forecasts, realized)
    rep = mon2.report
    assert rep.performance["labels"] == 200
    worst = max(rep.performance["pinball_ratio"], rep.performance["mae_ratio"])
    assert worst > 1.6
    assert rep.performance_score == pytest.approx(min(1.0, float(to_score(worst, 1.25, 1.6, 0.15, 0.3,
                                                                          origin=1.0))))
    assert rep.score == rep.performance_score
    assert rep.level == "CRITICAL" and any(e["type"] == "drift_retrain" for e in events)


def test_monitor_without_optional_parts_rejects_those_updates() -> None:
    rng = np.random.default_rng(0)
    mon = DriftMonitor(DriftConfig(), Reference.from_array(rng.normal(size=(100, 2)), ["a", "b"]))
    with pytest.raises(InvalidInput) as err:
        mon.update_predictions([0.1])
    assert err.value.field == "predictions"
    with pytest.raises(InvalidInput) as err:
        mon.update_features([1.0, 2.0, 3.0])
    assert err.value.field == "features"
    with pytest.raises(InvalidInput) as err:
        mon.update_outcomes([[0.0, 0.0, 0.0]], [0.0, 1.0])
    assert err.value.field == "realized"
    with pytest.raises(InvalidInput) as err:
        mon.update_outcomes([0.0, 0.0], [0.0])
    assert err.value.field == "forecasts"
    # Without validation figures, outcomes still feed label and concept drift.
    mon.update_outcomes(np.tile([-1.0, 0.0, 1.0], (60, 1)), rng.normal(size=60))
    assert mon.performance is None and mon.labels.n_baseline == 60
    mon.refresh()
    assert mon.report.performance_score is None and mon.report.events_seen["labels"] == 60


def test_monitor_pickle_round_trip_mid_stream() -> None:
    mon, rng = _monitor(seed=9)
    mon.update_features(rng.normal(size=(700, 6)))
    mon.update_predictions(rng.normal(0.0, 1e-4, size=(300, 1)))
    mon.update_outcomes(np.tile([-1.0, 0.0, 1.0], (100, 1)), rng.normal(size=100))
    clone = pickle.loads(pickle.dumps(mon))
    tail = rng.normal(size=(400, 6)) + [0.8, 0, 0, 0, 0, 0]
    ev_a = [mon.update_features(tail[i: i + 25]) for i in range(0, 400, 25)]
    ev_b = [clone.update_features(tail[i: i + 25]) for i in range(0, 400, 25)]
    assert ev_a == ev_b and any(ev_a)
    assert mon.report.to_dict() == clone.report.to_dict()
    wd = pickle.loads(pickle.dumps(mon.features))
    assert np.array_equal(wd.sorted_values(), mon.features.sorted_values())


def test_from_frames_watches_all_but_excluded_features() -> None:
    rng = np.random.default_rng(21)
    names = ["ret_1", "tod_sin", "rv_short", "tod_cos"]
    frame = pd.DataFrame(rng.normal(size=(800, 4)), columns=names)
    preds = pd.DataFrame({"pred": rng.normal(0, 1e-4, 500), "width": rng.uniform(10, 20, 500)})
    cfg = DriftConfig()
    mon = DriftMonitor.from_frames(cfg, frame, names, preds, validation_pinball=1e-4,
                                   validation_mae=2e-4)
    assert mon.features.reference.names == ("ret_1", "rv_short")
    assert mon.input_names == tuple(names)
    rows = rng.normal(size=(600, 4))
    rows[:, 1] += 5.0  # a wild excluded column does not count
    mon.update_features(rows)
    assert mon.report.level == "NORMAL"
    assert set(mon.report.features) == {"ret_1", "rv_short"}
    np.testing.assert_array_equal(mon.features.values(), rows[-cfg.window:][:, [0, 2]])
    assert mon.predictions is not None and mon.predictions.reference.names == ("pred", "width")
    with pytest.raises(InvalidInput) as err:
        DriftMonitor.from_frames(cfg, frame.drop(columns=["rv_short"]), names)
    assert err.value.field == "reference"
    with pytest.raises(InvalidInput) as err:
        DriftMonitor(cfg, mon.features.reference, input_names=["ret_1"])
    assert err.value.field == "input_names"
