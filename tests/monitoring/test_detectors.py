"""Change detectors: batch == one event at a time, delay, false alarms, ARL, pickling."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tickcast.config import DriftConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.detectors import (
    CusumDetector,
    PageHinkleyDetector,
    _lindley,
    cusum_arl,
    make_detector,
)

DETECTORS = [
    pytest.param(lambda m, s: PageHinkleyDetector(m, s, delta=0.5, threshold=16.0, min_events=30),
                 id="page_hinkley"),
    pytest.param(lambda m, s: CusumDetector(m, s, k=0.5, h=16.0), id="cusum"),
]


def _key(alarms):
    return [(a.index, a.feature, a.side) for a in alarms]


def test_lindley_closed_form_matches_the_recursion() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(-0.2, 1.0, size=(400, 3))
    start = np.array([0.0, 2.5, 7.0])
    got = _lindley(start, y)
    s = start.copy()
    for t in range(y.shape[0]):
        s = np.maximum(0.0, s + y[t])
        assert np.allclose(got[t], s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(CusumDetector, {"k": 0.5, "h": 5.0}),
                                    (PageHinkleyDetector, {"delta": 0.3, "threshold": 5.0,
                                                           "min_events": 20})])
def test_batches_give_the_same_alarms_as_single_events(cls, kw) -> None:
    # Low thresholds so that many alarms (and resets inside batches) happen.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    x[3000:, 1] += 2.0
    mean, std = [0.0, 1.0, -1.0], [1.0, 2.0, 0.5]
    one = cls(mean, std, **kw)
    seq = []
    for row in x:
        seq.extend(one.update(row))
    for sizes in ([6000], [1, 7, 250, 1000, 2742, 2000], [3] * 2000):
        det = cls(mean, std, **kw)
        got = []
        start = 0
        for b in sizes:
            got.extend(det.update(x[start: start + b]))
            start += b
        assert len(seq) > 20
        assert _key(got) == _key(seq)
        for a, b in zip(got, seq):
            assert math.isclose(a.statistic, b.statistic, rel_tol=1e-9)
        assert np.allclose(det.statistic, one.statistic, atol=1e-9)
        assert det.n_seen == one.n_seen == 6000
        assert det.alarms_total == len(seq)


@pytest.mark.parametrize("make", DETECTORS)
def test_no_false_alarm_over_100k_stationary_events_then_fast_detection(make) -> None:
    rng = np.random.default_rng(2024)
    ref = rng.normal(size=(2000, 5))
    live = rng.normal(size=(101_000, 5))
    live[100_000:, 3] += 1.0  # 1-sigma shift of one feature
    det = make(ref.mean(axis=0), ref.std(axis=0))
    alarms = []
    for i in range(0, live.shape[0], 500):
        alarms.extend(det.update(live[i: i + 500]))
    assert [a for a in alarms if a.index < 100_000] == []
    first = next(a for a in alarms if a.index >= 100_000)
    assert first.feature == 3 and first.side == "up"
    delay = first.index - 100_000 + 1
    assert 5 <= delay <= 80  # mean ~36 (Siegmund); one seed varies around it


def test_downward_shift_is_detected_on_the_down_side() -> None:
    rng = np.random.default_rng(5)
    det = CusumDetector([10.0, 10.0], [2.0, 2.0], k=0.5, h=18.0)
    x = rng.normal(10.0, 2.0, size=(3000, 2))
    x[2000:, 0] -= 2.0
    alarms = det.update(x)
    assert alarms and alarms[0].feature == 0 and alarms[0].side == "down"
    assert alarms[0].index >= 2000


def test_mean_delay_over_seeds_matches_siegmund() -> None:
    delays = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        det = CusumDetector([0.0], [1.0], k=0.5, h=18.0)
        x = rng.normal(size=(400, 1)) + 1.0
        delays.append(det.update(x)[0].index + 1)
    predicted = cusum_arl(0.5, 18.0, shift=1.0)
    assert abs(np.mean(delays) - predicted) < 0.15 * predicted


def test_in_control_run_length_matches_siegmund() -> None:
    # Low threshold -> many alarms: the mean spacing estimates the two-sided ARL0.
    rng = np.random.default_rng(9)
    det = CusumDetector([0.0], [1.0], k=0.5, h=4.0)
    alarms = det.update(rng.normal(size=(300_000, 1)))
    one_sided = cusum_arl(0.5, 4.0)
    two_sided = one_sided / 2.0  # two independent-ish sides, same ARL each
    spacing = 300_000 / len(alarms)
    assert abs(spacing - two_sided) < 0.12 * two_sided


def test_page_hinkley_ignores_a_constant_offset_from_the_reference() -> None:
    # The running mean absorbs an offset; CUSUM against the reference flags it.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 1)) + 0.8
    ph = PageHinkleyDetector([0.0], [1.0], delta=0.5, threshold=18.0, min_events=30)
    cu = CusumDetector([0.0], [1.0], k=0.5, h=18.0)
    assert ph.update(x) == ()
    assert len(cu.update(x)) > 10


def test_min_events_gates_page_hinkley_alarms() -> None:
    det = PageHinkleyDetector([0.0], [1.0], delta=0.0, threshold=0.5, min_events=50)
    x = np.r_[np.zeros(10), np.full(20, 5.0)][:, None]
    assert det.update(x) == ()
    assert det.statistic[0] > 0.5  # evidence accumulated, alarm held back
    assert det.update(np.full((30, 1), 5.0))[0].index == 49


def test_non_finite_rows_are_rejected_and_not_counted() -> None:
    det = PageHinkleyDetector([0.0, 0.0], [1.0, 1.0])
    det.update([[0.1, 0.2], [np.nan, 0.0], [0.0, np.inf], [0.3, 0.1]])
    det.update([np.nan, 1.0])
    assert det.n_seen == 2 and det.rejected == 3
    assert np.isfinite(det.statistic).all() and np.isfinite(det.running_mean).all()


def test_bad_shapes_and_parameters() -> None:
    det = CusumDetector([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(InvalidInput) as err:
        det.update([[1.0, 2.0, 3.0]])
    assert err.value.field == "values"
    with pytest.raises(InvalidInput):
        det.update(["a", "b"])
    with pytest.raises(ValueError, match="h"):
        CusumDetector([0.0], [1.0], h=0.0)
    with pytest.raises(ValueError, match="k"):
        CusumDetector([0.0], [1.0], k=-1.0)
    with pytest.raises(ValueError, match="same"):
        PageHinkleyDetector([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="min_events"):
        PageHinkleyDetector([0.0], [1.0], min_events=0)
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("adwin", [0.0], [1.0], ph_delta=0.5, ph_threshold=18, ph_min_events=30,
                      cusum_k=0.5, cusum_h=18)


def test_zero_std_reference_column_is_scaled_by_one() -> None:
    det = CusumDetector([1.0], [0.0], k=0.5, h=3.0)
    alarms = det.update(np.full((10, 1), 2.0))  # +1 per event after standardization
    assert alarms and alarms[0].index == 6  # 0.5 per event exceeds 3 at the 7th


@pytest.mark.parametrize("kind", ["page_hinkley", "cusum"])
def test_make_detector_from_config_and_pickle_round_trip(kind: str) -> None:
    cfg = DriftConfig(detector=kind)
    det = make_detector(cfg.detector, [0.0, 0.0], [1.0, 1.0], ph_delta=cfg.ph_delta,
                        ph_threshold=cfg.ph_threshold, ph_min_events=cfg.ph_min_events,
                        cusum_k=cfg.cusum_k, cusum_h=cfg.cusum_h)
    assert det.name == kind
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 2))
    x[1500:, 1] += 1.5
    det.update(x[:1000])
    clone = pickle.loads(pickle.dumps(det))
    a = det.update(x[1000:])
    b = clone.update(x[1000:])
    assert a and a == b
    assert np.array_equal(det.statistic, clone.statistic)


def test_siegmund_arl_reasoning_behind_the_defaults() -> None:
    cfg = DriftConfig()
    arl0 = cusum_arl(cfg.ph_delta, cfg.ph_threshold)
    # Ten one-sided tests (five features) over 100,000 events: expected false alarms < 0.02.
    assert 10 * 100_000 / arl0 < 0.02
    assert cusum_arl(cfg.ph_delta, cfg.ph_threshold, shift=1.0) < 35


def _ar1(rng: np.random.Generator, n: int, rho: float, f: int) -> np.ndarray:
    """Stationary AR(1) columns with unit marginal variance."""
    e = rng.normal(size=(n, f)) * math.sqrt(1 - rho * rho)
    x = np.empty((n, f))
    x[0] = rng.normal(size=f)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return x


def test_warmup_rescales_autocorrelated_features_and_stops_false_alarms() -> None:
    rng = np.random.default_rng(31)
    x = _ar1(rng, 60_000, 0.95, 2)
    x[:, 1] = rng.normal(size=60_000)  # an independent column next to a persistent one
    plain = PageHinkleyDetector([0.0, 0.0], [1.0, 1.0])
    assert len(plain.update(x)) > 20  # the iid assumption fails on the AR(1) column
    det = PageHinkleyDetector([0.0, 0.0], [1.0, 1.0], warmup=500)
    assert det.update(x[:499]) == () and det.warming_up
    assert det.update(x[499:]) == ()
    assert not det.warming_up and det.n_seen == 60_000
    infl = det.inflation
    assert 20 < infl[0] < 80  # (1 + 0.95) / (1 - 0.95) = 39, estimated from 500 events
    assert infl[1] < 1.6  # independent values: no (or a negligible) correction


def test_warmup_keeps_fast_detection_on_independent_values() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 3))
    x[2000:, 2] += 1.0
    det = CusumDetector([0.0] * 3, [1.0] * 3, warmup=500)
    alarms = det.update(x)
    assert alarms and alarms[0].feature == 2 and 2000 <= alarms[0].index < 2100


def test_warmup_batches_single_events_and_pickle_agree() -> None:
    rng = np.random.default_rng(6)
    x = _ar1(rng, 4000, 0.6, 2)
    x[3000:, 0] += 3.0
    a = PageHinkleyDetector([0.0, 0.0], [1.0, 1.0], warmup=300)
    b = PageHinkleyDetector([0.0, 0.0], [1.0, 1.0], warmup=300)
    got_a = list(a.update(x[:150]))
    clone = pickle.loads(pickle.dumps(a))  # mid warm-up
    got_a += a.update(x[150:])
    got_c = list(clone.update(x[150:]))
    got_b = [al for row in x for al in b.update(row)]
    assert got_a and _key(got_a) == _key(got_b) == _key(got_c)
    assert np.allclose(a.inflation, b.inflation) and np.array_equal(a.inflation, clone.inflation)


def test_warmup_parameter_checks() -> None:
    with pytest.raises(ValueError, match="warmup"):
        CusumDetector([0.0], [1.0], warmup=10)
    with pytest.raises(ValueError, match="max_inflation"):
        PageHinkleyDetector([0.0], [1.0], max_inflation=0.5)
