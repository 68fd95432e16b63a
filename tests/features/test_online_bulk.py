"""OnlineFeatures.update_many: the catch-up path equals bar-by-bar updates, bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from actors.asset_state import AssetState
from tickcast.config import FeatureConfig, Settings
from tickcast.errors import InvalidInput
from tickcast.features.definitions import compute_features
from tickcast.features.online import OnlineFeatures
from tickcast.sources.simulator import MarketSimulator

MIN = 60_000_000_000
SMALL = FeatureConfig(return_lags=(1, 2, 4), vol_short=3, vol_long=6, momentum=4, rsi=3,
                      macd=(2, 4, 2), volume_z=4, gap_age_cap=7, amend_depth=3)
CONFIGS = [pytest.param(SMALL, id="small"), pytest.param(FeatureConfig(), id="default")]


def messy_bars(n: int, seed: int) -> pd.DataFrame:
    """Bars in the bar schema with short and long gaps, imputed bars, unchanged, NaN and
    non-positive closes, zero, NaN and negative volumes."""
    rng = np.random.default_rng(seed)
    step = rng.choice([1, 1, 1, 1, 1, 2, 3, 9, 70], n)  # 70 > any lookback
    ts = (28_000_000 + np.cumsum(step)).astype(np.int64) * MIN
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    for k in np.flatnonzero(rng.random(n) < 0.15)[1:]:
        close[k] = close[k - 1]  # the price did not move: zero returns
    close[rng.random(n) < 0.02] = np.nan
    close[rng.random(n) < 0.01] = -1.0
    volume = rng.gamma(2.0, 3.0, n)
    volume[rng.random(n) < 0.05] = 0.0
    volume[rng.random(n) < 0.02] = np.nan
    volume[rng.random(n) < 0.01] = -2.0
    return pd.DataFrame({
        "ts": ts, "open": close, "high": close, "low": close, "close": close, "volume": volume,
        "vwap": close * (1 + rng.normal(0, 1e-4, n)), "ticks": rng.integers(1, 9, n),
        "providers": rng.integers(1, 4, n), "confidence": rng.uniform(0, 5, n),
        "imputed": pd.array(np.where(rng.random(n) < 0.05, "ffill", ""), dtype="str"),
    })


def with_resends(bars: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Interleave re-sent earlier bars (recent amendments and too-old ones) and off-grid rows."""
    rng = np.random.default_rng(seed)
    recs = bars.to_dict("records")
    rows = []
    for i, rec in enumerate(recs):
        rows.append(rec)
        u = rng.random()
        if u < 0.06 and i:
            old = recs[max(0, i - int(rng.integers(0, 8)))]
            rows.append(dict(old, close=old["close"] * 1.001 if old["close"] == old["close"] else 5.0))
        elif u < 0.07:
            rows.append(dict(rec, ts=rec["ts"] + 7))  # not on the minute grid
    out = pd.DataFrame(rows)
    out["imputed"] = out["imputed"].astype("str")
    return out


def loop(of: OnlineFeatures, frame: pd.DataFrame, errors: list[tuple[int, str]]) -> list[np.ndarray]:
    """The reference: update() row by row, refused rows recorded and skipped."""
    rows = []
    for i, rec in enumerate(frame.to_dict("records")):
        try:
            rows.append(of.update(rec))
        except InvalidInput as exc:
            errors.append((i, str(exc)))
    return rows


def bulk(of: OnlineFeatures, frame: pd.DataFrame, chunks: list[int],
         errors: list[tuple[int, str]]) -> np.ndarray:
    start, row = 0, np.empty(0)
    for size in chunks:
        part = frame.iloc[start:start + size]
        row = of.update_many(part, on_error=lambda i, e, s=start: errors.append((s + i, str(e))))
        start += size
    assert start >= len(frame)
    return row


def canonical(obj: object) -> object:
    """Bit-level canonical form of a state: floats and arrays as bytes, objects by their
    pickled state (``__getstate__`` / ``__dict__``), containers as tuples."""
    if isinstance(obj, np.ndarray):
        return ("array", str(obj.dtype), obj.shape, obj.tobytes())
    if isinstance(obj, (float, np.floating)):
        return ("float", np.float64(obj).tobytes())
    if isinstance(obj, (str, bytes, bool, int, type(None))):
        return obj
    if isinstance(obj, dict):
        return tuple(sorted((k, canonical(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "deque":
        return tuple(canonical(v) for v in obj)  # type: ignore[union-attr]
    if hasattr(obj, "model_dump"):
        return canonical(obj.model_dump())  # type: ignore[attr-defined]
    state = obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj)
    return (type(obj).__name__, canonical(state if state is not None else vars(obj)))


def same_state(a: OnlineFeatures, b: OnlineFeatures) -> bool:
    """Bit-level equality of the whole state (buffers, recursions, snapshots, last row)."""
    return canonical(a) == canonical(b)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("chunking", ["whole", "random", "pairs"])
def test_bulk_state_and_row_equal_the_bar_by_bar_loop(cfg: FeatureConfig, chunking: str) -> None:
    # Arrange
    frame = with_resends(messy_bars(1500, seed=1), seed=2)
    rng = np.random.default_rng(3)
    chunks = {"whole": [len(frame)], "pairs": [2] * (len(frame) // 2 + 1),
              "random": rng.integers(1, 300, len(frame)).tolist()}[chunking]
    ref, fast = OnlineFeatures(cfg), OnlineFeatures(cfg)
    ref_errors: list[tuple[int, str]] = []
    fast_errors: list[tuple[int, str]] = []
    # Act
    rows = loop(ref, frame, ref_errors)
    last = bulk(fast, frame, chunks, fast_errors)
    # Assert
    assert same_state(ref, fast)
    assert last.tobytes() == rows[-1].tobytes() == fast.last_row.tobytes()
    assert fast_errors == ref_errors and len(ref_errors) > 10  # too-old amendments, off-grid ts
    assert fast.replays == ref.replays > 10 and fast.last_ts == ref.last_ts


@pytest.mark.parametrize("cfg", CONFIGS)
def test_incremental_updates_after_a_bulk_catch_up_are_identical(cfg: FeatureConfig) -> None:
    frame = messy_bars(1200, seed=4)
    ref, fast = OnlineFeatures(cfg), OnlineFeatures(cfg)
    loop(ref, frame.iloc[:1000], [])
    fast.update_many(frame.iloc[:1000])
    later = frame.iloc[1000:].to_dict("records")
    amend = dict(later[50], close=later[50]["close"] * 1.002)  # an amendment after catch-up
    for rec in later[:51] + [amend] + later[51:]:
        np.testing.assert_array_equal(ref.update(rec), fast.update(rec))
    assert same_state(ref, fast)


def test_bulk_catch_up_keeps_parity_with_the_offline_features() -> None:
    bars = messy_bars(2000, seed=5)
    offline = compute_features(bars, FeatureConfig()).to_numpy()
    of = OnlineFeatures(FeatureConfig())
    row = of.update_many(bars.iloc[:1500])
    rows = [row] + [of.update(rec) for rec in bars.iloc[1500:].to_dict("records")]
    online = np.vstack(rows)
    expected = offline[1499:]
    np.testing.assert_array_equal(np.isnan(online), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(online), np.nan_to_num(expected), rtol=0, atol=1e-9)


def test_without_handler_the_first_bad_row_raises_after_the_rows_before_it() -> None:
    frame = messy_bars(300, seed=6)
    bad = frame.copy()
    bad.loc[200, "ts"] += 5  # off the grid
    ref, fast = OnlineFeatures(SMALL), OnlineFeatures(SMALL)
    loop(ref, frame.iloc[:200], [])
    with pytest.raises(InvalidInput) as err:
        fast.update_many(bad)
    assert err.value.field == "ts" and "grid" in str(err.value)
    assert same_state(ref, fast)


def test_frames_outside_the_bar_schema_are_read_row_by_row_the_same_way() -> None:
    frame = with_resends(messy_bars(600, seed=7), seed=8)
    odd = frame.drop(columns=["volume", "vwap"]).astype({"close": object, "providers": object})
    odd.loc[10, "providers"] = None  # missing -> NaN, as update() reads it
    odd.loc[20, "close"] = "abc"  # refused, naming the field
    ref, fast = OnlineFeatures(SMALL), OnlineFeatures(SMALL)
    ref_errors: list[tuple[int, str]] = []
    fast_errors: list[tuple[int, str]] = []
    loop(ref, odd, ref_errors)
    bulk(fast, odd, [len(odd)], fast_errors)
    assert same_state(ref, fast)
    assert fast_errors == ref_errors and (20, "bar.close must be a number, got 'abc'") in fast_errors


def test_empty_frame_and_missing_ts_column() -> None:
    of = OnlineFeatures(SMALL)
    assert np.isnan(of.update_many(messy_bars(5, seed=9).iloc[:0])).all() and of.last_ts is None
    seen: list[tuple[int, str]] = []
    of.update_many(pd.DataFrame({"close": [1.0, 2.0]}), on_error=lambda i, e: seen.append((i, e.field)))
    assert seen == [(0, "ts"), (1, "ts")] and of.last_ts is None


def test_not_a_frame_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput) as err:
        OnlineFeatures(SMALL).update_many([{"ts": 0, "close": 1.0}])  # type: ignore[arg-type]
    assert err.value.field == "bars"


def test_pickled_after_bulk_continues_identically() -> None:
    frame = messy_bars(800, seed=10)
    of = OnlineFeatures(FeatureConfig())
    of.update_many(frame.iloc[:600])
    copy = pickle.loads(pickle.dumps(of))
    np.testing.assert_array_equal(of.update_many(frame.iloc[600:]), copy.update_many(frame.iloc[600:]))
    assert same_state(of, copy)


def test_asset_state_catch_up_equals_feeding_every_emitted_bar_in_order() -> None:
    # Arrange: an asset's consensus bars (with amendments) queued while it catches up.
    settings = Settings()
    sim = MarketSimulator.from_settings(settings, 11, ("BTC-USD",))
    state = AssetState("BTC-USD", settings)
    emitted = []
    for batch in sim.run(90):
        out = state.step(batch, lambda start, end: {})
        emitted.append(out.consensus.loc[out.consensus["imputed"] == ""])
    emitted.append(state.flush(lambda start, end: {}).consensus)
    queued = pd.concat(emitted, ignore_index=True)
    ref = OnlineFeatures(settings.features)
    rows = loop(ref, queued, [])
    # Act: the actor's catch-up, in chunks
    fed = [state.feed_features(7), state.feed_features(40), state.feed_features(None)]
    # Assert
    assert state.features_pending == 0 and state.feature_errors == 0
    assert same_state(state.features, ref)
    bar_ts, row = fed[-1]  # the newest bar's row only, as published
    assert bar_ts == ref.last_ts and row.tobytes() == rows[-1].tobytes()
    assert len(queued) > 90 and ref.replays > 0  # amended bars were re-fed
