"""Online features: incremental == offline, amendments, late inserts, pickling, bad input."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest

from tickcast.config import FeatureConfig
from tickcast.errors import InvalidInput
from tickcast.features.definitions import compute_features, schema_hash, seeded_ema
from tickcast.features.online import OnlineFeatures, SeededEMA

MIN = 60_000_000_000
SMALL = FeatureConfig(return_lags=(1, 2, 4), vol_short=3, vol_long=6, momentum=4, rsi=3,
                      macd=(2, 4, 2), volume_z=4, gap_age_cap=7, amend_depth=3)


def random_bars(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    bars = pd.DataFrame({
        "ts": (28_000_000 + np.arange(n, dtype=np.int64)) * MIN,
        "close": close, "volume": rng.gamma(2.0, 3.0, n),
        "vwap": close * (1 + rng.normal(0, 1e-4, n)),
        "providers": rng.integers(1, 4, n), "confidence": rng.uniform(0, 5, n),
        "imputed": [""] * n,
    })
    bars.loc[rng.choice(n, 3, replace=False), "imputed"] = "ffill"
    gap = rng.choice(np.arange(5, n - 5), 4, replace=False)
    return bars.drop(index=gap).reset_index(drop=True)


def assert_rows_equal(online: np.ndarray, offline: np.ndarray) -> None:
    assert online.shape == offline.shape
    np.testing.assert_array_equal(np.isnan(online), np.isnan(offline))
    np.testing.assert_allclose(np.nan_to_num(online), np.nan_to_num(offline), rtol=0, atol=1e-9)


def test_seeded_ema_twin_is_bit_identical() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=500)
    x[rng.choice(500, 20, replace=False)] = np.nan
    e = SeededEMA(7, 2 / 8)
    online = np.array([e.update(v) for v in x])
    offline = seeded_ema(x, 7, 2 / 8)
    np.testing.assert_array_equal(online, offline)  # NaN positions and values, exactly


def test_online_equals_offline_with_gaps_and_imputed() -> None:
    bars = random_bars(200)
    of = OnlineFeatures(SMALL)
    rows = of.update_frame(bars)
    assert_rows_equal(rows, compute_features(bars, SMALL).to_numpy())
    assert of.last_ts == bars["ts"].iloc[-1]
    assert of.schema_hash == schema_hash(SMALL) and of.names[0] == "ret_1"


def test_last_close_follows_the_newest_bar_and_its_amendments() -> None:
    bars = random_bars(50, seed=4)
    of = OnlineFeatures(SMALL)
    assert of.last_close is None  # nothing seen yet
    of.update_frame(bars)
    assert of.last_close == bars["close"].iloc[-1]
    newest = dict(bars.iloc[-1].to_dict(), close=bars["close"].iloc[-1] * 1.01)
    of.update(newest)  # the newest bar amended
    assert of.last_close == newest["close"]
    older = dict(bars.iloc[-3].to_dict(), close=bars["close"].iloc[-3] * 0.99)
    of.update(older)  # an earlier bar amended: the newest bar's close stays
    assert of.last_close == newest["close"]


def test_amendment_and_late_insert_replay_from_snapshot() -> None:
    truth = random_bars(120, seed=3)
    of = OnlineFeatures(SMALL)
    seen: dict[int, np.ndarray] = {}
    recs = truth.to_dict("records")
    rng = np.random.default_rng(5)
    held_back = recs[40]  # delivered late, after the next two bars
    amended_at = []
    for i, rec in enumerate(recs):
        if i == 40:
            continue
        if i in (30, 70, 71, 100):
            # First emission with a provisional close, then the amended bar (same ts).
            first = dict(rec, close=rec["close"] * (1 + rng.normal(0, 5e-3)), volume=1.0)
            seen[rec["ts"]] = of.update(first)
        seen[rec["ts"]] = of.update(rec)
        if i in (30, 70, 71, 100):
            amended_at.append(rec["ts"])
        if i == 42:
            newest = of.last_ts
            row = of.update(held_back)
            # Features of bars after the inserted one changed; only the newest is returned.
            for ts in list(seen):
                if held_back["ts"] <= ts < newest:
                    del seen[ts]
            seen[newest] = row
            assert of.last_ts == newest
    offline = compute_features(truth, SMALL)
    got = np.array([seen[t] for t in offline.index if t in seen])
    want = offline.loc[[t for t in offline.index if t in seen]].to_numpy()
    assert len(got) == len(truth) - 2
    assert_rows_equal(got, want)
    assert of.replays == 5
    # Re-sending an amended bar that was the newest recomputes exactly that row.
    again = of.update(recs[-1])
    assert_rows_equal(again[None, :], offline.iloc[[-1]].to_numpy())


def test_amendment_older_than_depth_is_rejected_and_state_kept() -> None:
    bars = random_bars(30, seed=4)
    of = OnlineFeatures(SMALL)
    of.update_frame(bars)
    before = of.last_row
    old = bars.iloc[-6].to_dict()
    with pytest.raises(InvalidInput) as exc:
        of.update(old)
    assert exc.value.field == "ts"
    np.testing.assert_array_equal(of.last_row, before)


def test_pickle_round_trip_continues_identically() -> None:
    bars = random_bars(150, seed=6)
    a = OnlineFeatures(SMALL)
    a.update_frame(bars.iloc[:90])
    b = pickle.loads(pickle.dumps(a))
    rest = bars.iloc[90:]
    ra = a.update_frame(rest)
    rb = b.update_frame(rest)
    np.testing.assert_array_equal(ra, rb)
    # And the clone still handles an amendment of a bar from before the pickle point.
    last = rest.iloc[-1].to_dict()
    np.testing.assert_array_equal(a.update(last), b.update(last))


def test_long_gap_equals_fresh_start() -> None:
    bars = random_bars(80, seed=7)
    later = bars.copy()
    later["ts"] = later["ts"] + 10_000 * MIN
    of = OnlineFeatures(SMALL)
    of.update_frame(bars)
    rows = of.update_frame(later)
    fresh = OnlineFeatures(SMALL).update_frame(later)
    np.testing.assert_array_equal(rows, fresh)


@pytest.mark.parametrize("bar, field", [
    ({"close": 1.0}, "ts"),
    ({"ts": 0}, "close"),
    ({"ts": 0, "close": "abc"}, "close"),
    ({"ts": 5, "close": 1.0}, "ts"),
    ({"ts": True, "close": 1.0}, "ts"),
    ({"ts": "2023-03-01", "close": 1.0}, "ts"),
    ({"ts": 0.5, "close": 1.0}, "ts"),
    ({"ts": 0, "close": 1.0, "volume": [1]}, "volume"),
])
def test_malformed_bar_is_rejected_naming_the_field(bar, field) -> None:
    of = OnlineFeatures(SMALL)
    with pytest.raises(InvalidInput) as exc:
        of.update(bar)
    assert exc.value.field == field
    assert of.last_ts is None


def test_optional_fields_default_to_missing() -> None:
    of = OnlineFeatures(SMALL)
    row = of.update({"ts": 0, "close": 100.0})
    d = dict(zip(of.names, row))
    assert math.isnan(d["vwap_dev"]) and math.isnan(d["volume_z"]) and math.isnan(d["providers"])
    assert d["minutes_since_gap"] == 1.0
    row = of.update({"ts": MIN, "close": 101.0, "imputed": None})
    assert dict(zip(of.names, row))["ret_1"] == pytest.approx(math.log(101 / 100), rel=1e-12)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="freq_ns"):
        OnlineFeatures(SMALL, freq_ns=0)
    with pytest.raises(ValueError, match="alpha"):
        SeededEMA(3, 1.5)
