"""find_gaps and GapPolicy on constructed series with known gaps, and on the real BTC file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tickcast.config import GapConfig
from tickcast.errors import InvalidInput
from tickcast.market.gaps import Gap, GapPolicy, find_gaps
from tickcast.storage.bar_store import BAR_COLUMNS
from tickcast.ticks import NS_PER_MIN, NS_PER_S

M = NS_PER_MIN
T0 = 1_677_628_800_000_000_000  # 2023-03-01T00:00Z


def bars(minutes: list[int] | np.ndarray, closes: list[float] | np.ndarray | None = None,
         freq: int = M, confidence: float = 2.0) -> pd.DataFrame:
    m = np.asarray(minutes, dtype=np.int64)
    c = np.asarray(closes if closes is not None else 100.0 + m, dtype=np.float64)
    return pd.DataFrame({
        "ts": T0 + m * freq, "open": c - 0.25, "high": c + 0.5, "low": c - 0.5, "close": c,
        "volume": np.full(len(m), 3.0), "vwap": c + 0.1, "ticks": np.full(len(m), 9, dtype=np.int64),
        "providers": np.full(len(m), 3, dtype=np.int64), "confidence": np.full(len(m), confidence),
        "imputed": [""] * len(m),
    })


def minutes_of(frame: pd.DataFrame) -> list[int]:
    return ((frame["ts"].to_numpy() - T0) // M).tolist()


def audit_rows(audit: pd.DataFrame) -> list[tuple[int, int, float, str, bool]]:
    return [((s - T0) // M, (e - T0) // M, mm, meth, bool(f)) for s, e, mm, meth, f in
            audit[["start", "end", "missing_minutes", "method", "filled"]].itertuples(index=False)]


POLICY = GapPolicy(GapConfig(ffill_max_minutes=2, interp_max_minutes=10, provider_recovery=True))


# ---- find_gaps -------------------------------------------------------------------------------


def test_find_gaps_internal_leading_trailing() -> None:
    ts = T0 + np.array([5, 3, 4, 4, 9, 10, 14]) * M  # unsorted, with a duplicate
    assert find_gaps(ts, M) == [Gap(T0 + 6 * M, T0 + 8 * M, 3, M), Gap(T0 + 11 * M, T0 + 13 * M, 3, M)]
    gaps = find_gaps(ts, M, start_ns=T0, end_ns=T0 + 20 * M)
    assert [(g.start_ns - T0) // M for g in gaps] == [0, 6, 11, 15]
    assert [g.missing for g in gaps] == [3, 3, 3, 5]  # minutes 0-2, 6-8, 11-13, 15-19
    assert gaps[-1].end_ns == T0 + 19 * M and gaps[-1].minutes == 5.0


def test_find_gaps_edge_cases() -> None:
    assert find_gaps(np.array([], dtype=np.int64), M) == []
    assert find_gaps(np.array([], dtype=np.int64), M, T0, T0 + 3 * M) == [Gap(T0, T0 + 2 * M, 3, M)]
    assert find_gaps(np.arange(10) * M + T0, M) == []
    # Bars outside the range are ignored; the range end is exclusive.
    assert find_gaps(T0 + np.array([-5, 0, 1, 2, 50]) * M, M, T0, T0 + 3 * M) == []


@pytest.mark.parametrize("freq", [10 * NS_PER_S, M, 5 * M, 60 * M])
def test_find_gaps_any_frequency(freq: int) -> None:
    k = np.array([0, 1, 2, 6, 7, 20])
    gaps = find_gaps(T0 + k * freq, freq)
    assert [(g.start_ns - T0) // freq for g in gaps] == [3, 8]
    assert [g.missing for g in gaps] == [3, 12]
    assert gaps[0].minutes == 3 * freq / M


def test_find_gaps_off_grid_counts_grid_points_strictly_between() -> None:
    # 2.5 bar lengths apart: slots at +1 and +2 bar lengths are missing.
    gaps = find_gaps(np.array([T0, T0 + 5 * M // 2]), M)
    assert gaps == [Gap(T0 + M, T0 + 2 * M, 2, M)]


@pytest.mark.parametrize("kwargs, field", [
    ({"ts_ns": np.array([1.5, 2.5]), "freq_ns": M}, "ts_ns"),
    ({"ts_ns": np.array([1, 2]), "freq_ns": 0}, "freq_ns"),
    ({"ts_ns": np.array([1, 2]), "freq_ns": 60.0}, "freq_ns"),
    ({"ts_ns": np.array([1, 2]), "freq_ns": M, "start_ns": "x"}, "start_ns"),
])
def test_find_gaps_rejects_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        find_gaps(**kwargs)
    assert err.value.field == field


# ---- GapPolicy: one rule at a time ------------------------------------------------------------


def test_short_gap_is_forward_filled_flat_at_previous_close() -> None:
    filled, audit = POLICY.fill(bars([0, 1, 4, 5], [100, 101, 104, 105], confidence=2.0).assign(
        confidence=[1.0, 2.0, 3.0, 4.0]), M)
    assert minutes_of(filled) == [0, 1, 2, 3, 4, 5]
    gap = filled.iloc[2:4]
    for col in ("open", "high", "low", "close", "vwap"):
        assert gap[col].tolist() == [101.0, 101.0]
    assert gap["volume"].tolist() == [0.0, 0.0] and gap["ticks"].tolist() == [0, 0]
    assert gap["providers"].tolist() == [0, 0] and gap["imputed"].tolist() == ["ffill", "ffill"]
    assert gap["confidence"].tolist() == [3.0, 3.0]  # the larger of the bounding bars' (2, 3)
    assert filled["imputed"].tolist()[:2] == ["", ""]
    assert audit_rows(audit) == [(2, 3, 2.0, "ffill", True)]
    assert list(filled.columns) == list(BAR_COLUMNS) and filled["ts"].dtype == np.int64


def test_medium_gap_is_interpolated_linearly() -> None:
    filled, audit = POLICY.fill(bars([0, 1, 7], [100.0, 100.0, 106.0]), M)
    gap = filled[filled["imputed"] == "interpolate"]
    assert minutes_of(gap) == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(gap["close"], [101.0, 102.0, 103.0, 104.0, 105.0])
    np.testing.assert_array_equal(gap["open"], gap["close"])
    np.testing.assert_array_equal(gap["high"], gap["close"])
    assert (gap["volume"] == 0).all()
    assert audit_rows(audit) == [(2, 6, 5.0, "interpolate", True)]


def test_boundaries_are_inclusive() -> None:
    policy = GapPolicy(GapConfig(ffill_max_minutes=2, interp_max_minutes=3))
    _, audit = policy.fill(bars([0, 3, 7, 12]), M)  # gaps of 2, 3 and 4 minutes
    assert [r[3] for r in audit_rows(audit)] == ["ffill", "interpolate", "excluded"]


def test_long_gap_without_alternate_is_excluded() -> None:
    filled, audit = POLICY.fill(bars([0, 1, 30]), M)
    assert minutes_of(filled) == [0, 1, 30]
    assert audit_rows(audit) == [(2, 29, 28.0, "excluded", False)]


def test_long_gap_recovered_from_provider_with_moving_basis() -> None:
    # Series closes 100 before and 121 after the gap; the provider trades 1% above the series
    # at the left edge and 1% below at the right edge: the basis moves log-linearly between.
    series = bars([0, 1, 22, 23], [100.0, 100.0, 121.0, 121.0])
    alt_minutes = np.arange(0, 24)
    alt_close = np.where(alt_minutes <= 1, 101.0, 0.0)
    alt_close[2:22] = 100.0 + alt_minutes[2:22]  # the provider's own path through the gap
    alt_close[22:] = 121.0 * 0.99
    alt = bars(alt_minutes, alt_close).assign(volume=5.0, ticks=4)
    filled, audit = POLICY.fill(series, M, {"kraken": alt})
    gap = filled[filled["imputed"] == "provider:kraken"]
    assert minutes_of(gap) == list(range(2, 22))
    lb, rb = np.log(100.0 / 101.0), np.log(121.0 / (121.0 * 0.99))
    frac = (alt_minutes[2:22] - 1) / (22 - 1)
    expected = alt_close[2:22] * np.exp(lb + (rb - lb) * frac)
    np.testing.assert_allclose(gap["close"], expected, rtol=1e-12)
    np.testing.assert_allclose(gap["high"], (alt_close[2:22] + 0.5) * np.exp(lb + (rb - lb) * frac), rtol=1e-12)
    assert (gap["volume"] == 5.0).all() and (gap["ticks"] == 4).all() and (gap["providers"] == 1).all()
    assert audit_rows(audit) == [(2, 21, 20.0, "provider:kraken", True)]


def test_partially_covered_gap_fills_what_the_provider_has_then_treats_holes_as_gaps() -> None:
    """40-minute gap (minutes 10-49). Provider A covers 10-19 and 30-44; provider B covers 22-29.

    A covers most (25 minutes) and fills them. The holes left: 20-29 (10 minutes, bounded by
    A's bars) -> interpolated, as a 10-minute gap would be; 45-49 (5 minutes) -> interpolated.
    B is never needed. Then the same with a hole too long to interpolate: B fills its part and
    the rest of that hole is excluded.
    """
    series = bars(list(range(0, 10)) + list(range(50, 60)))
    a_minutes = list(range(0, 20)) + list(range(30, 45)) + list(range(50, 60))
    b_minutes = list(range(0, 10)) + list(range(22, 30)) + list(range(50, 60))
    alts = {"B": bars(b_minutes), "A": bars(a_minutes)}
    filled, audit = POLICY.fill(series, M, alts)
    assert audit_rows(audit) == [
        (10, 19, 10.0, "provider:A", True),
        (20, 29, 10.0, "interpolate", True),
        (30, 44, 15.0, "provider:A", True),
        (45, 49, 5.0, "interpolate", True),
    ]
    assert minutes_of(filled) == list(range(60))
    # Interpolation of the hole runs between A's recovered bars at 19 and 30.
    hole = filled.set_index((filled["ts"] - T0) // M).loc[20:29, "close"]
    np.testing.assert_allclose(hole, 119.0 + (130.0 - 119.0) * np.arange(1, 11) / 11)

    # Now A covers only 10-14 and 35-49: the hole 15-34 (20 minutes) is too long to
    # interpolate; B covers 22-29 of it; what remains (15-21: 7 min, 30-34: 5 min) is bounded
    # by recovered bars and interpolated.
    a2 = bars(list(range(0, 15)) + list(range(35, 60)))
    filled2, audit2 = POLICY.fill(series, M, {"A": a2, "B": bars(b_minutes)})
    assert audit_rows(audit2) == [
        (10, 14, 5.0, "provider:A", True),
        (15, 21, 7.0, "interpolate", True),
        (22, 29, 8.0, "provider:B", True),
        (30, 34, 5.0, "interpolate", True),
        (35, 49, 15.0, "provider:A", True),
    ]

    # Without B the 20-minute hole is excluded: those minutes stay missing.
    filled3, audit3 = POLICY.fill(series, M, {"A": a2})
    assert audit_rows(audit3) == [
        (10, 14, 5.0, "provider:A", True),
        (15, 34, 20.0, "excluded", False),
        (35, 49, 15.0, "provider:A", True),
    ]
    assert not set(range(15, 35)) & set(minutes_of(filled3))


def test_alternate_without_a_common_minute_gives_no_basis() -> None:
    series = bars([0, 1, 40, 41])
    alt = bars(list(range(5, 30)))  # covers the gap but shares no minute with the series
    _, audit = POLICY.fill(series, M, {"x": alt})
    assert audit_rows(audit) == [(2, 39, 38.0, "excluded", False)]


def test_provider_recovery_can_be_disabled() -> None:
    policy = GapPolicy(GapConfig(provider_recovery=False))
    _, audit = policy.fill(bars([0, 1, 40]), M, {"x": bars(range(41))})
    assert audit_rows(audit) == [(2, 39, 38.0, "excluded", False)]


def test_range_bounds_fill_leading_and_trailing_gaps() -> None:
    series = bars([3, 4, 5, 6])
    alt = bars(range(0, 20), 100.0 * np.ones(20))
    filled, audit = POLICY.fill(series, M, {"x": alt}, start_ns=T0, end_ns=T0 + 20 * M)
    # Leading 0-2: nothing before it to ffill from, so the provider (basis from the right).
    # Trailing 7-19 (13 min): too long for ffill, no bar after it to interpolate to -> provider.
    assert audit_rows(audit) == [(0, 2, 3.0, "provider:x", True), (7, 19, 13.0, "provider:x", True)]
    lead = filled.iloc[:3]
    np.testing.assert_allclose(lead["close"], 100.0 * (103.0 / 100.0))  # basis at minute 3
    # A short trailing gap is forward filled; a range with no bar at all has nothing to fill from.
    _, audit2 = POLICY.fill(series, M, start_ns=T0 + 3 * M, end_ns=T0 + 9 * M)
    assert audit_rows(audit2) == [(7, 8, 2.0, "ffill", True)]
    filled3, audit3 = POLICY.fill(bars([]), M, start_ns=T0, end_ns=T0 + 5 * M)
    assert filled3.empty and audit_rows(audit3) == [(0, 4, 5.0, "excluded", False)]
    # Bars outside the range are dropped.
    filled4, _ = POLICY.fill(bars([0, 1, 2, 30]), M, start_ns=T0, end_ns=T0 + 3 * M)
    assert minutes_of(filled4) == [0, 1, 2]


def test_any_frequency_uses_durations_not_bar_counts() -> None:
    freq = 10 * NS_PER_S  # 10-second bars: ffill up to 12 bars, interpolate up to 60
    k = np.array([0, 1, 14, 15, 60, 61, 200])  # gaps of 12, 44 and 138 bars
    series = bars(k, 100.0 + k, freq=freq)
    filled, audit = POLICY.fill(series, freq)
    assert audit["method"].tolist() == ["ffill", "interpolate", "excluded"]
    assert audit["missing_minutes"].tolist() == [2.0, 44 / 6, 23.0]
    assert len(filled) == len(k) + 12 + 44


def test_rows_are_sorted_deduplicated_and_imputed_rows_count_as_present() -> None:
    series = pd.concat([bars([5, 0, 1]), bars([1], [500.0]), bars([2], [102.0]).assign(imputed="ffill")],
                       ignore_index=True)
    filled, audit = POLICY.fill(series, M)
    assert minutes_of(filled) == [0, 1, 2, 3, 4, 5]
    assert filled["close"].tolist()[:3] == [100.0, 500.0, 102.0]
    assert filled["imputed"].tolist() == ["", "", "ffill", "ffill", "ffill", ""]
    assert audit_rows(audit) == [(3, 4, 2.0, "ffill", True)]


def test_no_gap_and_empty_series() -> None:
    filled, audit = POLICY.fill(bars(range(10)), M)
    assert len(filled) == 10 and audit.empty
    assert list(audit.columns) == ["start", "end", "missing_minutes", "method", "filled"]
    filled, audit = POLICY.fill(bars([]), M)
    assert filled.empty and audit.empty


@pytest.mark.parametrize("frame, alternates, field", [
    (bars([0, 1]).assign(ts=T0 + np.array([0, M + 7])), None, "ts"),
    (bars([0, 1]).assign(close=[1.0, np.nan]), None, "close"),
    (bars([0, 1]).drop(columns=["volume"]), None, "volume"),
    (bars([0, 40]), {"x": "not a frame"}, "alternates.x"),
    (bars([0, 1]), {"x": bars([0]).drop(columns=["vwap"])}, "alternates.x.vwap"),  # checked even without a long gap
    (bars([0, 1]), [bars([0])], "alternates"),
])
def test_bad_input_is_rejected_naming_the_field(frame: pd.DataFrame, alternates: dict | None, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        POLICY.fill(frame, M, alternates)
    assert err.value.field == field


def test_huge_range_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        POLICY.fill(bars([0]), M, start_ns=0, end_ns=T0)
    assert err.value.field == "end_ns"


def test_policy_pickles() -> None:
    copy = pickle.loads(pickle.dumps(POLICY))
    assert copy.cfg == POLICY.cfg
    a, b = copy.fill(bars([0, 5]), M), POLICY.fill(bars([0, 5]), M)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


# ---- real data -----------------------------------------------------------------------------


def venue_bars(raw: pd.DataFrame, venue: str) -> pd.DataFrame:
    v = raw[(raw["venue"] == venue) & (raw["symbol"] == "BTC/USD")]
    ts = pd.to_datetime(v["timestamp_utc"], utc=True).dt.as_unit("ns").astype("int64").to_numpy()
    c = v["close"].to_numpy(dtype=np.float64)
    return pd.DataFrame({
        "ts": ts, "open": v["open"].to_numpy(np.float64), "high": v["high"].to_numpy(np.float64),
        "low": v["low"].to_numpy(np.float64), "close": c, "volume": v["volume"].to_numpy(np.float64),
        "vwap": c, "ticks": np.zeros(len(v), dtype=np.int64), "providers": np.ones(len(v), dtype=np.int64),
        "confidence": np.zeros(len(v)), "imputed": [""] * len(v),
    }).sort_values("ts", ignore_index=True)


def test_real_btc_gaps_are_all_accounted_for(shared_data_file: Path) -> None:
    raw = pd.read_csv(shared_data_file, usecols=["timestamp_utc", "venue", "symbol", "open", "high",
                                                 "low", "close", "volume"])
    raw = raw[raw["symbol"] == "BTC/USD"]
    coinbase, kraken, binance = (venue_bars(raw, v) for v in ("coinbase", "kraken", "binanceus"))
    start = int(binance["ts"].iloc[0])
    end = int(binance["ts"].iloc[-1]) + M
    expected_missing = (end - start) // M - len(coinbase)
    gaps = find_gaps(coinbase["ts"].to_numpy(), M, start, end)
    assert sum(g.missing for g in gaps) == expected_missing > 0

    filled, audit = POLICY.fill(coinbase, M, {"kraken": kraken, "binanceus": binance}, start_ns=start, end_ns=end)
    assert audit["missing_minutes"].sum() == expected_missing  # every missing minute audited once
    assert len(filled) == len(coinbase) + int(audit.loc[audit["filled"], "missing_minutes"].sum())
    assert (np.diff(filled["ts"].to_numpy()) > 0).all()

    # Recovery quality on real prices: cut a 3-hour hole out of Binance.US (which has every
    # minute) and recover it from Coinbase and Kraken; compare with what Binance.US printed.
    hole = (binance["ts"] >= start + 3000 * M) & (binance["ts"] < start + 3180 * M)
    recovered, audit_hole = POLICY.fill(binance[~hole], M, {"coinbase": coinbase, "kraken": kraken})
    assert audit_hole["filled"].all() and audit_hole["missing_minutes"].sum() == 180
    truth = binance[hole].set_index("ts")["close"]
    got = recovered.set_index("ts").loc[truth.index, "close"]
    err_bp = (np.abs(got / truth - 1.0) * 1e4).to_numpy()
    assert np.median(err_bp) < 5.0 and err_bp.max() < 50.0
