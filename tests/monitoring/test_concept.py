"""Label drift (P(Y)), concept drift (P(Y|X)) and the evaluation rate of the drift monitor.

The concept test is checked on synthetic data whose truth is known: a linear relation, a model
fitted to it, then either the relation changes on unchanged inputs or the inputs change under
an unchanged relation.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp, norm

from tickcast.config import DriftConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.concept import DriftKind, classify_drift, standardized_residuals
from tickcast.monitoring.drift import LABEL_COLUMN, BaselineWindow, DriftMonitor, Reference, ReferenceSource

Z90 = float(norm.ppf(0.95))
BETA = np.array([0.8, -0.5])
NOISE = 0.5
NAMES = ("x1", "x2")


class LinearQuantileModel:
    """Least squares on the training rows; quantiles = fit +- normal quantiles of the residual sd."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        design = np.c_[np.ones(len(x)), x]
        self.coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        self.sd = float((y - design @ self.coef).std(ddof=design.shape[1]))

    def quantiles(self, x: np.ndarray) -> np.ndarray:
        m = np.c_[np.ones(len(x)), x] @ self.coef
        return np.c_[m - Z90 * self.sd, m, m + Z90 * self.sd]


def _relation(x: np.ndarray, rng: np.random.Generator, beta: np.ndarray = BETA) -> np.ndarray:
    return x @ beta + NOISE * rng.normal(size=len(x))


def _setup(seed: int) -> tuple[DriftMonitor, LinearQuantileModel, np.random.Generator]:
    """A monitor with training references and 1,000 calm live bars already fed."""
    rng = np.random.default_rng(seed)
    x_train = rng.normal(size=(5000, 2))
    y_train = _relation(x_train, rng)
    model = LinearQuantileModel(x_train, y_train)
    sample = rng.choice(5000, 2000, replace=False)
    frame = pd.DataFrame(x_train[sample], columns=list(NAMES))
    frame[LABEL_COLUMN] = y_train[sample]
    mon = DriftMonitor.from_frames(DriftConfig(detector_warmup=0), frame, NAMES)
    x = rng.normal(size=(1000, 2))
    _feed(mon, model, x, _relation(x, rng))
    return mon, model, rng


def _feed(mon: DriftMonitor, model: LinearQuantileModel, x: np.ndarray,
          y: np.ndarray) -> list[dict]:
    """One bar at a time, as the tracker does: the features, then the bar's realized label."""
    events: list[dict] = []
    for i in range(0, len(x), 25):
        events += mon.update_features(x[i: i + 25])
        events += mon.update_outcomes(model.quantiles(x[i: i + 25]), y[i: i + 25])
    return events


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_concept_fires_on_a_changed_relation_with_unchanged_inputs(seed: int) -> None:
    # Arrange: calm start -- the live residual reference is the first 500 labels.
    mon, model, rng = _setup(seed)
    calm = mon.report
    assert calm.drift_kind is DriftKind.NONE and calm.concept_score < 0.15
    assert calm.concept["reference"] == "live" and calm.labels["reference"] == "model"
    # Act: the sign of x1's effect flips; the inputs keep their law, and so does P(Y)
    # (x1 is symmetric), so neither feature nor label drift can see it.
    x = rng.normal(size=(500, 2))
    events = _feed(mon, model, x, _relation(x, rng, beta=np.array([-0.8, -0.5])))
    # Assert
    rep = mon.report
    assert rep.concept_score >= 0.3 and rep.level == "CRITICAL" and rep.retrain
    assert rep.feature_score < 0.15 and rep.label_score < 0.15
    assert rep.drift_kind is DriftKind.CONCEPT
    kinds = [(e["from"], e["to"]) for e in events if e["type"] == "drift_kind"]
    assert kinds == [("none", "concept")]
    # The evidence: far more realized values outside the forecast interval than 10 %.
    outside = rep.concept["share_below_lower"] + 1 - rep.concept["share_below_upper"]
    assert outside > 0.3 and rep.concept["levels"] == [0.05, 0.5, 0.95]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_concept_stays_quiet_on_changed_inputs_with_an_unchanged_relation(seed: int) -> None:
    # Arrange
    mon, model, rng = _setup(seed)
    # Act: both inputs move (mean +1.5, scale x1.5 and x0.5); the relation is the same.
    x = rng.normal(size=(500, 2)) * [1.5, 0.5] + [1.5, -1.0]
    events = _feed(mon, model, x, _relation(x, rng))
    # Assert: inputs and labels drift, the residuals do not.
    rep = mon.report
    assert rep.feature_score >= 0.3 and rep.label_score >= 0.3
    assert rep.concept_score < 0.15
    assert rep.drift_kind is DriftKind.COVARIATE
    assert [(e["from"], e["to"]) for e in events if e["type"] == "drift_kind"] == [
        ("none", "covariate")]
    assert 0.85 <= rep.concept["share_below_upper"] - rep.concept["share_below_lower"] <= 0.95


def test_standardizing_makes_residuals_blind_to_a_heteroscedastic_input_shift() -> None:
    # The truth: y = x1 + (0.2 + 0.6 |x2|) e, forecast by its true quantiles. The inputs'
    # spread triples: raw residuals widen with it, standardized ones keep their law.
    rng = np.random.default_rng(11)

    def sample(n: int, spread: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 2)) * [1.0, spread]
        s = 0.2 + 0.6 * np.abs(x[:, 1])
        y = x[:, 0] + s * rng.normal(size=n)
        f = np.c_[x[:, 0] - Z90 * s, x[:, 0], x[:, 0] + Z90 * s]
        return x, y, f

    _, y0, f0 = sample(3000, 1.0)
    _, y1, f1 = sample(3000, 3.0)
    raw = ks_2samp(y0 - f0[:, 1], y1 - f1[:, 1]).statistic
    z = ks_2samp(standardized_residuals(f0, y0), standardized_residuals(f1, y1)).statistic
    assert raw > 0.1 and z < 0.05  # KS at n = 3,000 + 3,000: 0.035 is the 5 % level


def test_standardized_residuals_are_quantile_units_and_reject_bad_rows() -> None:
    f = np.array([[-2.0, 0.0, 1.0], [-2.0, 0.0, 1.0], [-1.0, 1.0, 1.0], [np.nan, 0.0, 1.0]])
    z = standardized_residuals(f, np.array([-2.0, 1.0, 2.0, -1.0]))
    assert z[:2].tolist() == [-1.0, 1.0]  # on the lower / upper quantile: -1 / +1
    assert np.isnan(z[2:]).all()  # zero upper half-interval; a NaN quantile
    with pytest.raises(InvalidInput) as err:
        standardized_residuals(f, np.zeros(3))
    assert err.value.field == "forecasts"
    assert classify_drift(0.2, None, 0.15) is DriftKind.COVARIATE


def test_label_drift_against_model_labels_and_against_first_live_labels() -> None:
    rng = np.random.default_rng(5)
    ref_frame = pd.DataFrame({"a": rng.normal(size=1000), LABEL_COLUMN: rng.normal(0, 1e-3, 1000)})
    cfg = DriftConfig(window=300, min_window=100, eval_every=20, live_reference_labels=200)
    with_model = DriftMonitor.from_frames(cfg, ref_frame, ["a"])
    without = DriftMonitor.from_frames(cfg, ref_frame.drop(columns=[LABEL_COLUMN]), ["a"])
    assert with_model.labels.source is ReferenceSource.MODEL
    assert without.labels.source is ReferenceSource.LIVE
    f = np.tile([-2e-3, 0.0, 2e-3], (600, 1))
    # Live returns three times as volatile as the training labels, from the start.
    y = rng.normal(0, 3e-3, 600)
    for mon in (with_model, without):
        for i in range(0, 600, 30):
            mon.update_outcomes(f[i: i + 30], y[i: i + 30])
    # Against the model's labels the change shows; against the first live labels it cannot
    # (the live reference already holds the new volatility).
    assert with_model.report.label_score >= 0.3
    assert without.report.label_score < 0.15 and without.report.labels["reference_rows"] == 200
    assert without.report.labels["window"] == 300
    # The label window equals a direct KS of the last 300 labels against the reference.
    want = ks_2samp(ref_frame[LABEL_COLUMN], y[-300:]).statistic
    assert math.isclose(with_model.report.labels["ks"], want, rel_tol=1e-12)
    # Labels are reported, and count toward the score only when configured.
    assert with_model.report.score < with_model.report.label_score
    counted = DriftMonitor.from_frames(cfg.model_copy(update={"score_components": ("labels",)}),
                                       ref_frame, ["a"])
    for i in range(0, 600, 30):
        counted.update_outcomes(f[i: i + 30], y[i: i + 30])
    assert counted.report.score == counted.report.label_score


def test_baseline_window_never_overlaps_its_live_reference() -> None:
    rng = np.random.default_rng(6)
    stream = rng.normal(size=(700, 1))
    stream[3] = np.nan
    bw = BaselineWindow(("y",), window=300, baseline=250)
    sizes = [1, 7, 100, 1, 300, 291]
    pos = 0
    for b in sizes:
        bw.update(stream[pos: pos + b])
        pos += b
    finite = stream[np.isfinite(stream[:, 0])]
    assert bw.ready and bw.rejected == 1
    np.testing.assert_array_equal(np.sort(bw.drift.reference.sorted[0]), np.sort(finite[:250, 0]))
    np.testing.assert_array_equal(bw.drift.values(), finite[-300:])
    assert bw.stats(min_window=300) is not None and bw.stats(min_window=301) is None
    with pytest.raises(ValueError, match="baseline"):
        BaselineWindow(("y",), window=100, baseline=5)


@pytest.mark.parametrize("batch", [1, 7, 50, 500, 5000])
def test_the_monitor_evaluates_every_eval_every_events_whatever_the_batch(batch: int) -> None:
    rng = np.random.default_rng(7)
    ref = Reference.from_array(rng.normal(size=(2000, 3)), ["a", "b", "c"])
    mon = DriftMonitor(DriftConfig(), ref)
    live = rng.normal(size=(5000, 3))
    live[[10, 2000, 4999], 1] = np.nan  # rejected rows do not count toward the rate
    for i in range(0, 5000, batch):
        mon.update_features(live[i: i + batch])
    accepted = 5000 - 3
    assert mon.evaluations == accepted // DriftConfig().eval_every == 99
    assert mon.features.n_seen == accepted and mon.report.evaluations == 99
    assert mon.report.events_seen["features"] == 99 * 50  # as of the last evaluation


def test_batches_and_single_events_give_the_same_reports_when_no_detector_alarms() -> None:
    rng = np.random.default_rng(8)
    ref = Reference.from_array(rng.normal(size=(2000, 2)), ["a", "b"])
    # A slow drift the window statistics see; the detector is made too dull to alarm.
    cfg = DriftConfig(ph_threshold=1e9, cusum_h=1e9)
    live = rng.normal(size=(3000, 2)) + np.linspace(0, 1.2, 3000)[:, None] * [1.0, 0.0]
    one, batched = DriftMonitor(cfg, ref), DriftMonitor(cfg, ref)
    ev_one = [e for row in live for e in one.update_features(row)]
    ev_batched = [e for i in range(0, 3000, 400) for e in batched.update_features(live[i: i + 400])]
    assert ev_one == ev_batched and [e["to"] for e in ev_one if e["type"] == "drift_level"]
    assert one.report.to_dict() == batched.report.to_dict()


def test_outcome_windows_survive_a_pickle_round_trip() -> None:
    mon, model, rng = _setup(9)
    clone = pickle.loads(pickle.dumps(mon))
    x = rng.normal(size=(300, 2))
    y = _relation(x, rng, beta=np.array([0.0, 0.5]))
    assert _feed(mon, model, x, y) == _feed(clone, model, x, y)
    assert mon.report.to_dict() == clone.report.to_dict()
    assert mon.report.concept_score is not None
