"""MICE gap filling: imputation from other providers' series, with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tickcast.config import GapConfig
from tickcast.errors import InvalidInput
from tickcast.market.gaps import GapPolicy
from tickcast.market.mice import mice_impute
from tickcast.ticks import NS_PER_MIN

M = NS_PER_MIN
T0 = 1_677_628_800_000_000_000  # 2023-03-01T00:00Z


def bars(minutes: np.ndarray, closes: np.ndarray, confidence: float = 0.5) -> pd.DataFrame:
    m = np.asarray(minutes, dtype=np.int64)
    c = np.asarray(closes, dtype=np.float64)
    return pd.DataFrame({
        "ts": T0 + m * M, "open": c, "high": c * 1.0001, "low": c * 0.9999, "close": c,
        "volume": np.full(len(m), 2.0), "vwap": c, "ticks": np.full(len(m), 4, dtype=np.int64),
        "providers": np.ones(len(m), dtype=np.int64), "confidence": np.full(len(m), confidence),
        "imputed": [""] * len(m),
    })


def market(minutes: int = 600, seed: int = 0, vol_bp: float = 8.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A random-walk mid and three venues quoting it with a basis and 1 bp of noise."""
    rng = np.random.default_rng(seed)
    mid = 20_000.0 * np.exp(np.cumsum(vol_bp * 1e-4 * rng.standard_normal(minutes)))
    venues = {name: mid * (1 + basis * 1e-4) * np.exp(1e-4 * rng.standard_normal(minutes))
              for name, basis in (("target", 0.0), ("a", 3.0), ("b", -2.0))}
    return mid, venues


def err_bp(x: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(x) / truth - 1.0) * 1e4


POLICY = GapPolicy(GapConfig())
LINEAR = GapPolicy(GapConfig(interp_max_minutes=1000, mice_max_minutes=0, provider_recovery=False))


def test_mice_fills_a_long_gap_from_the_other_venues_far_better_than_a_line() -> None:
    # Arrange: the target venue misses minutes 300-359 (60 min); two venues quote throughout.
    _, v = market()
    minutes = np.arange(600)
    keep = (minutes < 300) | (minutes >= 360)
    series = bars(minutes[keep], v["target"][keep])
    alts = {"a": bars(minutes, v["a"]), "b": bars(minutes, v["b"])}
    truth = v["target"][300:360]
    # Act
    filled, audit = POLICY.fill(series, M, alts)
    line, _ = LINEAR.fill(series, M, alts)
    # Assert
    gap = filled.iloc[300:360]
    assert (gap["imputed"] == "mice").all() and audit["method"].tolist() == ["mice"]
    assert audit[["missing_minutes", "filled"]].values.tolist() == [[60.0, True]]
    mice_err, line_err = err_bp(gap["close"], truth), err_bp(line.iloc[300:360]["close"], truth)
    assert np.median(mice_err) < 2.0 and np.median(line_err) > 5 * np.median(mice_err)
    # Flat bars, no volume nor ticks; providers = venues quoting; confidence >= the edges'.
    for col in ("open", "high", "low", "vwap"):
        np.testing.assert_array_equal(gap[col], gap["close"])
    assert (gap["volume"] == 0).all() and (gap["ticks"] == 0).all() and (gap["providers"] == 2).all()
    assert (gap["confidence"] >= 0.5).all()


def test_predictors_with_holes_of_their_own_still_fill_the_gap() -> None:
    # a quotes the first half of the gap only, b the second half only: chained equations use
    # whichever quotes at each minute.
    _, v = market(seed=1)
    minutes = np.arange(600)
    keep = (minutes < 300) | (minutes >= 340)
    a_keep = ~((minutes >= 320) & (minutes < 340))
    b_keep = ~((minutes >= 300) & (minutes < 320))
    series = bars(minutes[keep], v["target"][keep])
    alts = {"a": bars(minutes[a_keep], v["a"][a_keep]), "b": bars(minutes[b_keep], v["b"][b_keep])}
    filled, audit = POLICY.fill(series, M, alts)
    gap = filled.iloc[300:340]
    assert audit["method"].tolist() == ["mice"]
    assert (gap["imputed"] == "mice").all() and (gap["providers"] == 1).all()
    assert np.median(err_bp(gap["close"], v["target"][300:340])) < 2.5


def test_minutes_nobody_quotes_are_left_to_the_next_rules() -> None:
    # Gap 300-359; both venues are silent at 320-324 (5 min, bounded by MICE bars: interpolated)
    # and at 340-359 (20 min, bounded by MICE bars and the series: too long to interpolate,
    # no provider quotes: excluded).
    _, v = market(seed=2)
    minutes = np.arange(600)
    keep = (minutes < 300) | (minutes >= 360)
    silent = ((minutes >= 320) & (minutes < 325)) | ((minutes >= 340) & (minutes < 360))
    series = bars(minutes[keep], v["target"][keep])
    alts = {"a": bars(minutes[~silent], v["a"][~silent]), "b": bars(minutes[~silent], v["b"][~silent])}
    _, audit = POLICY.fill(series, M, alts)
    rows = [((s - T0) // M, (e - T0) // M, meth) for s, e, meth in audit[["start", "end", "method"]].itertuples(index=False)]
    assert rows == [(300, 319, "mice"), (320, 324, "interpolate"), (325, 339, "mice"), (340, 359, "excluded")]


def test_without_enough_shared_history_the_other_rules_apply() -> None:
    # Only the bars bounding the gap are given (as a caller without context would): MICE has
    # no evidence to fit on, so the gap goes to provider recovery as before.
    _, v = market(seed=3)
    minutes = np.arange(600)
    series = bars(np.array([299, 360]), v["target"][[299, 360]])
    alts = {"a": bars(minutes[299:361], v["a"][299:361])}
    _, audit = POLICY.fill(series, M, alts)
    assert audit["method"].tolist() == ["provider:a"]
    # A short gap with context goes to MICE; without alternates it is interpolated.
    keep = (minutes < 300) | (minutes >= 305)
    _, audit2 = POLICY.fill(bars(minutes[keep], v["target"][keep]), M, {"a": bars(minutes, v["a"])})
    _, audit3 = POLICY.fill(bars(minutes[keep], v["target"][keep]), M)
    assert audit2["method"].tolist() == ["mice"] and audit3["method"].tolist() == ["interpolate"]


def test_the_policy_decides_which_lengths_use_mice() -> None:
    _, v = market(seed=4)
    minutes = np.arange(600)
    keep = ~(((minutes >= 100) & (minutes < 105)) | ((minutes >= 300) & (minutes < 340)))
    series = bars(minutes[keep], v["target"][keep])
    alts = {"a": bars(minutes, v["a"])}
    policy = GapPolicy(GapConfig(mice_min_minutes=11, mice_max_minutes=30))
    _, audit = policy.fill(series, M, alts)
    assert audit["method"].tolist() == ["interpolate", "provider:a"]  # 5 min: line; 40 min: provider
    policy = GapPolicy(GapConfig(mice_min_minutes=3, mice_max_minutes=60))
    _, audit = policy.fill(series, M, alts)
    assert audit["method"].tolist() == ["mice", "mice"]
    assert GapPolicy(GapConfig(mice_max_minutes=0)).context_ns == 0
    assert policy.context_ns == 240 * M


def test_same_seed_same_bars_and_the_imputations_spread_shows_in_the_confidence() -> None:
    _, v = market(seed=5)
    minutes = np.arange(600)
    keep = (minutes < 300) | (minutes >= 400)
    series = bars(minutes[keep], v["target"][keep], confidence=0.0)
    alts = {"a": bars(minutes, v["a"]), "b": bars(minutes, v["b"])}
    one, _ = POLICY.fill(series, M, alts)
    two, _ = POLICY.fill(series, M, alts)
    other, _ = GapPolicy(GapConfig(mice_seed=9)).fill(series, M, alts)
    pd.testing.assert_frame_equal(one, two)
    gap = slice(300, 400)
    assert not np.array_equal(one.iloc[gap]["close"], other.iloc[gap]["close"])
    # Confidence = the imputations' standard deviation (the edges' is 0 here): about the
    # venues' 1 bp noise, and the truth lies within a few of it.
    conf = one.iloc[gap]["confidence"].to_numpy()
    assert 0.1 < np.median(conf) < 3.0
    z = err_bp(one.iloc[gap]["close"], v["target"][gap]) / conf
    assert np.median(z) < 3.0


def test_mice_impute_checks_its_input() -> None:
    y = np.array([1.0, np.nan, 3.0])
    x = np.ones((3, 1))
    with pytest.raises(InvalidInput) as exc:
        mice_impute(y, np.ones((2, 1)), np.array([1]))
    assert exc.value.field == "predictors"
    with pytest.raises(InvalidInput) as exc:
        mice_impute(np.array([-1.0, np.nan, 3.0]), x, np.array([1]))
    assert exc.value.field == "target"
    with pytest.raises(InvalidInput) as exc:
        mice_impute(y, x, np.array([0]))
    assert exc.value.field == "rows"
    with pytest.raises(InvalidInput) as exc:
        mice_impute(y, x, np.array([5]))
    assert exc.value.field == "rows"
    assert mice_impute(y, np.full((3, 1), np.nan), np.array([1])) is None  # no predictor
    assert mice_impute(y, x, np.array([1]), min_rows=30) is None  # too little evidence


def test_mice_range_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="mice_max_minutes"):
        GapConfig(mice_min_minutes=20, mice_max_minutes=10)
    GapConfig(mice_min_minutes=20, mice_max_minutes=0)  # 0 = off


def test_on_real_venues_mice_beats_a_line_on_hour_long_gaps(shared_data_file) -> None:
    # Coinbase BTC/USD with 60-minute holes cut where it has every bar (truth known); binanceus
    # and kraken are the predictors. Known truth, real prices.
    from bench.gaps import gap_starts, venue_bars
    from tickcast.sources.replay import read_bar_file

    bars_all = read_bar_file(shared_data_file, ("BTC-USD",)).bars
    frames = {v: venue_bars(bars_all, v) for v in ("binanceus", "coinbase", "kraken")}
    own = frames["coinbase"]
    first = int(own.index.min())
    present = np.zeros(int(own.index.max()) - first + 1, dtype=bool)
    present[own.index.to_numpy() - first] = True
    mice_err, line_err = [], []
    for start in gap_starts(present, 60, 4, np.random.default_rng(3), 250) + first:
        lo, hi = start - 245, start + 60 + 245
        window = own.loc[(own.index >= lo) & (own.index < hi)]
        gap = (window.index >= start) & (window.index < start + 60)
        series = window.loc[~gap].reset_index(drop=True)
        alts = {v: f.loc[(f.index >= lo) & (f.index < hi)].reset_index(drop=True)
                for v, f in frames.items() if v != "coinbase"}
        truth = window.loc[gap, "close"].to_numpy()
        for policy, out in ((POLICY, mice_err), (LINEAR, line_err)):
            filled, _ = policy.fill(series, M, alts)
            got = filled.set_index(filled["ts"] // M).loc[window.index[gap]]
            out.append(err_bp(got["close"], truth))
    assert np.median(np.concatenate(mice_err)) < 2.0
    assert np.median(np.concatenate(mice_err)) < np.median(np.concatenate(line_err)) / 2
