"""Offline feature definitions: values checked against independent formulas, gap rules, labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tickcast.config import FeatureConfig, load_settings
from tickcast.errors import InvalidInput
from tickcast.features.definitions import (
    FEATURE_NAMES,
    compute_features,
    feature_names,
    make_labels,
    schema_hash,
    seeded_ema,
)

MIN = 60_000_000_000
SMALL = FeatureConfig(return_lags=(1, 2, 4), vol_short=3, vol_long=6, momentum=4, rsi=3,
                      macd=(2, 4, 2), volume_z=4, gap_age_cap=7)


def random_bars(n: int, seed: int = 0, start_min: int = 28_000_000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    return pd.DataFrame({
        "ts": (start_min + np.arange(n, dtype=np.int64)) * MIN,
        "open": close, "high": close * 1.0005, "low": close * 0.9995, "close": close,
        "volume": rng.gamma(2.0, 3.0, n), "vwap": close * (1 + rng.normal(0, 1e-4, n)),
        "ticks": rng.integers(1, 50, n), "providers": rng.integers(1, 4, n),
        "confidence": rng.uniform(0, 5, n), "imputed": [""] * n,
    })


def test_feature_names_exact_default_list() -> None:
    assert FEATURE_NAMES == (
        "ret_1", "ret_2", "ret_3", "ret_5", "ret_10", "ret_15", "ret_30",
        "rv_short", "rv_long", "rv_ratio", "momentum", "rsi",
        "macd", "macd_signal", "macd_hist", "volume_z", "vwap_dev",
        "confidence_bp", "providers", "minutes_since_gap", "tod_sin", "tod_cos")
    assert feature_names(load_settings()) == FEATURE_NAMES
    assert feature_names(SMALL)[:3] == ("ret_1", "ret_2", "ret_4")


def test_schema_hash_is_stable_and_tracks_value_config() -> None:
    h = schema_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert schema_hash(FeatureConfig()) == h == schema_hash(load_settings())
    assert schema_hash(FeatureConfig(return_lags=(1, 2))) != h
    assert schema_hash(FeatureConfig(rsi=21)) != h
    # How many bars are kept for amendments does not change any value.
    assert schema_hash(FeatureConfig(amend_depth=9)) == h


def test_values_match_independent_formulas() -> None:
    bars = random_bars(80)
    f = compute_features(bars, SMALL)
    c = bars["close"].to_numpy()
    lc = np.log(c)
    r = np.diff(lc, prepend=np.nan)
    t = 50
    assert f.index[t] == bars["ts"][t]
    assert f["ret_1"].iloc[t] == pytest.approx(math.log(c[t] / c[t - 1]), rel=1e-12)
    assert f["ret_4"].iloc[t] == pytest.approx(math.log(c[t] / c[t - 4]), rel=1e-12)
    assert f["rv_short"].iloc[t] == pytest.approx(math.sqrt(np.mean(r[t - 2:t + 1] ** 2)), rel=1e-12)
    assert f["rv_long"].iloc[t] == pytest.approx(math.sqrt(np.mean(r[t - 5:t + 1] ** 2)), rel=1e-12)
    assert f["rv_ratio"].iloc[t] == pytest.approx(f["rv_short"].iloc[t] / f["rv_long"].iloc[t], rel=1e-12)
    w = r[t - 3:t + 1]
    assert f["momentum"].iloc[t] == pytest.approx(w.sum() / math.sqrt((w ** 2).sum()), rel=1e-9)
    lv = np.log1p(bars["volume"].to_numpy()[t - 3:t + 1])
    assert f["volume_z"].iloc[t] == pytest.approx((lv[-1] - lv.mean()) / lv.std(ddof=1), rel=1e-9)
    assert f["vwap_dev"].iloc[t] == pytest.approx(math.log(c[t] / bars["vwap"][t]), rel=1e-9)
    assert f["confidence_bp"].iloc[t] == bars["confidence"][t]
    assert f["providers"].iloc[t] == bars["providers"][t]
    assert f["minutes_since_gap"].iloc[t] == 7.0  # capped
    assert f["minutes_since_gap"].iloc[:3].tolist() == [1.0, 2.0, 3.0]
    minute = (bars["ts"][t] // MIN) % 1440
    assert f["tod_sin"].iloc[t] == pytest.approx(math.sin(2 * math.pi * minute / 1440), abs=1e-15)
    assert f["tod_cos"].iloc[t] == pytest.approx(math.cos(2 * math.pi * minute / 1440), abs=1e-15)


def wilder_rsi_loop(r: np.ndarray, n: int) -> list[float]:
    """Textbook Wilder RSI on one gap-free series of returns (r[0] is NaN)."""
    out = [math.nan] * len(r)
    gains = [max(x, 0.0) for x in r[1:]]
    losses = [max(-x, 0.0) for x in r[1:]]
    ag, al = sum(gains[:n]) / n, sum(losses[:n]) / n
    out[n] = 100 * ag / (ag + al)
    for i in range(n, len(gains)):
        ag = (ag * (n - 1) + gains[i]) / n
        al = (al * (n - 1) + losses[i]) / n
        out[i + 1] = 100 * ag / (ag + al)
    return out


def ema_loop(x: np.ndarray, n: int) -> list[float]:
    a = 2 / (n + 1)
    out = [math.nan] * len(x)
    first = next(i for i, v in enumerate(x) if math.isfinite(v))
    y = sum(x[first:first + n]) / n
    out[first + n - 1] = y
    for i in range(first + n, len(x)):
        y = a * x[i] + (1 - a) * y
        out[i] = y
    return out


def test_rsi_and_macd_match_textbook_loops() -> None:
    bars = random_bars(60, seed=3)
    f = compute_features(bars, SMALL)
    c = bars["close"].to_numpy()
    r = np.diff(np.log(c), prepend=np.nan)
    np.testing.assert_allclose(f["rsi"].to_numpy(), wilder_rsi_loop(r, 3), rtol=1e-10, equal_nan=True)
    fast, slow = np.array(ema_loop(c, 2)), np.array(ema_loop(c, 4))
    line = (fast - slow) / c
    signal = np.array(ema_loop(line, 2))
    np.testing.assert_allclose(f["macd"].to_numpy(), line, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(f["macd_signal"].to_numpy(), signal, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(f["macd_hist"].to_numpy(), line - signal, rtol=1e-9, atol=1e-15,
                               equal_nan=True)
    # Warm-up: RSI needs rsi returns (rsi + 1 bars); the MACD signal needs slow + signal - 1 bars.
    assert f["rsi"].first_valid_index() == bars["ts"][3]
    assert f["macd_signal"].first_valid_index() == bars["ts"][4]


def test_seeded_ema_restarts_at_breaks() -> None:
    x = np.array([1.0, 2.0, 3.0, np.nan, 4.0, 5.0, 6.0, 7.0])
    out = seeded_ema(x, 2, 0.5)
    assert math.isnan(out[0]) and out[1] == 1.5 and out[2] == 2.25
    assert math.isnan(out[3]) and math.isnan(out[4])
    assert out[5] == 4.5 and out[6] == 5.25 and out[7] == 6.125


def test_gap_and_imputed_bars_never_cross_windows() -> None:
    bars = random_bars(60, seed=1)
    bars.loc[30, "imputed"] = "ffill"  # an imputed bar
    bars = bars.drop(index=[40, 41]).reset_index(drop=True)  # a 2-minute gap
    f = compute_features(bars, SMALL)
    ts = bars["ts"].to_numpy()
    row = {t: i for i, t in enumerate(ts)}
    imp = row[bars["ts"][30]]
    after_gap = row[(28_000_000 + 42) * MIN]
    # The imputed bar itself: every input of it is missing.
    for name in ("ret_1", "rv_short", "rsi", "macd", "vwap_dev", "confidence_bp", "providers"):
        assert math.isnan(f[name].iloc[imp]), name
    assert f["minutes_since_gap"].iloc[imp] == 0.0
    # Returns resume once both ends are valid and the window holds no invalid slot.
    assert math.isnan(f["ret_1"].iloc[imp + 1]) and not math.isnan(f["ret_1"].iloc[imp + 2])
    assert math.isnan(f["ret_4"].iloc[imp + 4]) and not math.isnan(f["ret_4"].iloc[imp + 5])
    assert math.isnan(f["rv_long"].iloc[imp + 6]) and not math.isnan(f["rv_long"].iloc[imp + 7])
    assert f["minutes_since_gap"].iloc[imp + 1] == 1.0
    # After the 2-minute gap the first bar has no return and counts from 1 again.
    assert math.isnan(f["ret_1"].iloc[after_gap])
    assert f["minutes_since_gap"].iloc[after_gap] == 1.0
    assert math.isnan(f["rsi"].iloc[after_gap + 2]) and not math.isnan(f["rsi"].iloc[after_gap + 3])
    # The gap's minutes have no row at all.
    assert (28_000_000 + 40) * MIN not in f.index


def test_long_gap_is_a_clean_restart() -> None:
    a, b = random_bars(50, seed=4), random_bars(70, seed=5, start_min=28_000_000 + 14_400)
    both = compute_features(pd.concat([a, b], ignore_index=True), SMALL)
    alone = compute_features(b, SMALL)
    pd.testing.assert_frame_equal(both.loc[alone.index], alone)


def test_features_are_causal() -> None:
    bars = random_bars(90, seed=6)
    full = compute_features(bars, SMALL)
    part = compute_features(bars.iloc[:55], SMALL)
    pd.testing.assert_frame_equal(full.iloc[:55], part)


def test_input_order_does_not_matter_and_empty_is_fine() -> None:
    bars = random_bars(40, seed=7)
    shuffled = bars.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(compute_features(shuffled, SMALL), compute_features(bars, SMALL))
    empty = compute_features(bars.iloc[:0], SMALL)
    assert list(empty.columns) == list(feature_names(SMALL)) and len(empty) == 0
    assert len(make_labels(bars.iloc[:0], 1)) == 0


def test_labels_exclude_gaps_imputed_and_unrealized() -> None:
    bars = random_bars(20, seed=8)
    bars.loc[5, "imputed"] = "interpolate"
    bars = bars.drop(index=[12]).reset_index(drop=True)
    c = bars["close"].to_numpy()
    lab = make_labels(bars, 1)
    assert lab.index.tolist() == bars["ts"].tolist()
    assert lab.iloc[0] == pytest.approx(math.log(c[1] / c[0]), rel=1e-12)
    assert math.isnan(lab.iloc[4])  # the next bar is imputed
    assert math.isnan(lab.iloc[5])  # the bar itself is imputed
    assert not math.isnan(lab.iloc[6])
    assert math.isnan(lab.iloc[11])  # the next minute is missing
    assert math.isnan(lab.iloc[-1])  # not realized yet
    lab3 = make_labels(bars, 3)
    assert lab3.iloc[0] == pytest.approx(math.log(c[3] / c[0]), rel=1e-12)
    assert all(math.isnan(lab3.iloc[i]) for i in (2, 3, 4, 5))  # (t, t+3] holds the imputed bar
    assert all(math.isnan(lab3.iloc[i]) for i in (9, 10, 11))  # (t, t+3] holds the gap
    assert not math.isnan(lab3.iloc[12]) and lab3.iloc[-3:].isna().all()
    # Every label that survives is a return between two real, consecutive-grid bars.
    pos = {t: i for i, t in enumerate(bars["ts"])}
    for t, v in lab3.dropna().items():
        i, j = pos[t], pos.get(t + 3 * MIN)
        assert j is not None and v == pytest.approx(math.log(c[j] / c[i]), rel=1e-12)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.drop(columns=["close"]), "close"),
    (lambda b: b.drop(columns=["ts"]), "ts"),
    (lambda b: b.assign(ts=b["ts"].astype(float)), "ts"),
    (lambda b: b.assign(ts=pd.array([None] + b["ts"].tolist()[1:], dtype="Int64")), "ts"),
    (lambda b: b.assign(ts=b["ts"] + 7), "ts"),
    (lambda b: pd.concat([b, b.iloc[:1]], ignore_index=True), "ts"),
    (lambda b: b.assign(close=["x"] * len(b)), "close"),
    (lambda b: b.assign(volume=[None, "y"] + [1.0] * (len(b) - 2)), "volume"),
])
def test_bad_input_is_rejected_naming_the_field(mutate, field) -> None:
    bars = random_bars(10)
    with pytest.raises(InvalidInput) as exc:
        compute_features(mutate(bars), SMALL)
    assert exc.value.field == field


def test_bad_horizon_and_config_are_rejected() -> None:
    with pytest.raises(InvalidInput) as exc:
        make_labels(random_bars(5), 0)
    assert exc.value.field == "horizon"
    with pytest.raises(InvalidInput):
        compute_features(random_bars(5), {"rsi": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vol_short"):
        FeatureConfig(vol_short=60, vol_long=10)


def test_non_positive_close_is_treated_as_missing() -> None:
    bars = random_bars(12)
    bars.loc[6, "close"] = -1.0
    f = compute_features(bars, SMALL)
    assert math.isnan(f["ret_1"].iloc[6]) and math.isnan(f["ret_1"].iloc[7])
    assert f["minutes_since_gap"].iloc[6] == 0.0 and f["minutes_since_gap"].iloc[7] == 1.0
    assert math.isnan(make_labels(bars, 1).iloc[5])
