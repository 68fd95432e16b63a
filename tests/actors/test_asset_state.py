"""AssetState without Ray or Redis: bars, gap policy, deferred features, checkpoint round trip."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from actors.asset_state import AssetState, StepOutput
from tickcast.config import Settings, load_settings
from tickcast.features.online import OnlineFeatures
from tickcast.sources.replay import ReplayFile, iter_replay_batches, read_bar_file
from tickcast.storage.bar_store import BarStore
from tickcast.ticks import NS_PER_MIN, TickBatch

T0 = 1_677_628_800 * 10**9  # 2023-03-01T00:00:00Z


def _settings(tmp_path: Path, *overrides: str) -> Settings:
    return load_settings(overrides=[f"data_dir={tmp_path}", *overrides])


def _bar_file(path: Path, rows: list[tuple[int, str, float]]) -> Path:
    """A bar file in the shared format from (minute index, venue, close) rows."""
    lines = ["timestamp_utc,venue,symbol,open,high,low,close,volume,trades"]
    for minute, venue, close in rows:
        ts = pd.Timestamp(T0 + minute * NS_PER_MIN, unit="ns", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"{ts},{venue},BTC/USD,{close},{close + 2},{close - 2},{close + 1},1.5,3")
    path.write_text("\n".join(lines) + "\n")
    return path


class _Store:
    """Applies step outputs to a BarStore, as the actor does, and serves alternates from it."""

    def __init__(self, root: Path) -> None:
        self.bars = BarStore(root, fsync=False)
        self.audit: list[pd.DataFrame] = []

    def apply(self, out: StepOutput) -> None:
        if len(out.consensus):
            self.bars.upsert("BTC-USD", "consensus", out.consensus)
        if len(out.provider):
            self.bars.upsert_providers("BTC-USD", out.provider)
        if len(out.audit):
            self.audit.append(out.audit)

    def alternates(self, start: int, end: int) -> dict[str, pd.DataFrame]:
        return {p: self.bars.read("BTC-USD", p, start, end + 1) for p in self.bars.providers("BTC-USD")}


def _run(state: AssetState, batches: list[TickBatch], store: _Store) -> None:
    for b in batches:
        store.apply(state.step(b, store.alternates))
    store.apply(state.flush(store.alternates))


def _venue(replay: ReplayFile, venue: str) -> ReplayFile:
    bars = replay.bars.loc[replay.bars["venue"] == venue].reset_index(drop=True)
    return ReplayFile(bars=bars, rejected={}, rows_in=len(bars), path=replay.path)


def test_single_venue_replay_rebuilds_its_bars(tmp_path: Path, day_slice: Path) -> None:
    kraken = _venue(read_bar_file(day_slice, ("BTC-USD",)), "kraken")
    state = AssetState("BTC-USD", _settings(tmp_path))
    store = _Store(tmp_path / "bars")
    _run(state, list(iter_replay_batches(kraken, "BTC-USD", 500)), store)

    got = store.bars.read("BTC-USD", "kraken")
    np.testing.assert_array_equal(got["ts"].to_numpy(), kraken.bars["ts"].to_numpy())
    for col in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(got[col].to_numpy(), kraken.bars[col].to_numpy(), err_msg=col)
    # Volume too, bit for bit: the replay splits volume into multiples of ulp(v) (see replay.py).
    np.testing.assert_array_equal(got["volume"].to_numpy(), kraken.bars["volume"].to_numpy())
    cons = store.bars.read("BTC-USD")
    real = cons.loc[cons["imputed"] == ""]
    # One provider: the consensus bar is that provider's bar.
    np.testing.assert_array_equal(real["ts"].to_numpy(), kraken.bars["ts"].to_numpy())
    np.testing.assert_array_equal(real["close"].to_numpy(), kraken.bars["close"].to_numpy())
    # Kraken skips one minute that day: it is filled, flagged and audited, never silent.
    assert len(kraken.bars) == 1439
    assert state.gaps == 1 and state.imputed == 1
    assert list(cons.loc[cons["imputed"] != "", "imputed"]) == ["ffill"]
    assert state.counts.bars == 1439 and state.counts.ticks_in == 4 * 1439


def test_gaps_are_filled_by_duration_and_audited(tmp_path: Path) -> None:
    # Minutes 0-9 real; 10-11 missing (ffill); 12-19 real; 20-26 missing (interpolate);
    # 27-39 real; 40-69 missing (too long, no other provider: excluded); 70-79 real.
    present = [*range(0, 10), *range(12, 20), *range(27, 40), *range(70, 80)]
    path = _bar_file(tmp_path / "bars.csv", [(m, "kraken", 100.0 + m) for m in present])
    state = AssetState("BTC-USD", _settings(tmp_path))
    store = _Store(tmp_path / "bars")
    _run(state, list(iter_replay_batches(read_bar_file(path, ("BTC-USD",)), "BTC-USD", 40)), store)

    cons = store.bars.read("BTC-USD")
    methods = dict(zip(((cons["ts"] - T0) // NS_PER_MIN).tolist(), cons["imputed"]))
    assert [methods[m] for m in (10, 11)] == ["ffill", "ffill"]
    assert {methods[m] for m in range(20, 27)} == {"interpolate"}
    assert not any(m in methods for m in range(40, 70))
    audit = pd.concat(store.audit, ignore_index=True).sort_values("start")
    assert audit["method"].tolist() == ["ffill", "interpolate", "excluded"]
    assert audit["missing_minutes"].tolist() == [2.0, 7.0, 30.0]
    assert audit["filled"].tolist() == [True, True, False]
    assert ((audit["start"] - T0) // NS_PER_MIN).tolist() == [10, 20, 40]
    assert state.gaps == 3 and state.imputed == 9


def test_long_gap_recovered_from_another_provider(tmp_path: Path) -> None:
    # The series (Coinbase) misses minutes 30-59; Kraken has stored bars for all 80 minutes.
    rows = [(m, "coinbase", 100.0 + m) for m in range(80) if not 30 <= m < 60]
    rows += [(m, "kraken", 100.5 + m) for m in range(80)]
    replay = read_bar_file(_bar_file(tmp_path / "bars.csv", sorted(rows)), ("BTC-USD",))
    settings = _settings(tmp_path)
    alternate = _Store(tmp_path / "alt")
    _run(AssetState("BTC-USD", settings), list(iter_replay_batches(_venue(replay, "kraken"), "BTC-USD", 64)),
         alternate)

    state = AssetState("BTC-USD", settings)
    series = _Store(tmp_path / "series")
    for b in iter_replay_batches(_venue(replay, "coinbase"), "BTC-USD", 64):
        series.apply(state.step(b, alternate.alternates))
    series.apply(state.flush(alternate.alternates))

    audit = pd.concat(series.audit, ignore_index=True)
    assert audit["method"].tolist() == ["provider:kraken"]
    assert audit["missing_minutes"].tolist() == [30.0] and audit["filled"].tolist() == [True]
    cons = series.bars.read("BTC-USD")
    assert len(cons) == 80 and (cons["imputed"] == "provider:kraken").sum() == 30


def test_checkpoint_round_trip_continues_identically(tmp_path: Path, day_slice: Path) -> None:
    replay = read_bar_file(day_slice, ("BTC-USD",))
    batches = list(iter_replay_batches(replay, "BTC-USD", 700))
    half = len(batches) // 2

    def copy(bs: list[TickBatch]) -> list[TickBatch]:
        return [b.take(np.arange(len(b))) for b in bs]

    whole = AssetState("BTC-USD", _settings(tmp_path))
    store_a = _Store(tmp_path / "a")
    _run(whole, copy(batches), store_a)

    first = AssetState("BTC-USD", _settings(tmp_path))
    store_b = _Store(tmp_path / "b")
    for b in copy(batches[:half]):
        store_b.apply(first.step(b, store_b.alternates))
    first.last_id = "17-3"
    restored: AssetState = pickle.loads(pickle.dumps(first))
    assert restored.last_id == "17-3" and restored.counts == first.counts
    _run(restored, copy(batches[half:]), store_b)

    for source in store_a.bars.sources("BTC-USD"):
        pd.testing.assert_frame_equal(store_a.bars.read("BTC-USD", source),
                                      store_b.bars.read("BTC-USD", source), check_exact=True)
    assert restored.counts == whole.counts
    restored.feed_features()
    whole.feed_features()
    np.testing.assert_array_equal(restored.features.last_row, whole.features.last_row)


def test_deferred_features_equal_bar_by_bar_features(tmp_path: Path, day_slice: Path) -> None:
    settings = _settings(tmp_path)
    state = AssetState("BTC-USD", settings)
    store = _Store(tmp_path / "bars")
    replay = read_bar_file(day_slice, ("BTC-USD",))
    _run(state, list(iter_replay_batches(replay, "BTC-USD", 5000)), store)
    pending = state.features_pending
    assert pending == state.counts.bars + state.counts.amended

    reference = OnlineFeatures(settings.features)
    for rec in store.bars.read("BTC-USD").query("imputed == ''").to_dict("records"):
        reference.update(rec)
    chunks = 0
    while state.features_pending:
        newest = state.feed_features(97)  # odd chunks: boundaries must not matter
        chunks += 1
    assert chunks == -(-pending // 97)
    assert newest is not None and newest[0] == reference.last_ts
    np.testing.assert_array_equal(newest[1], reference.last_row)
    assert state.feed_features(10) is None  # nothing left


def test_status_is_json_ready(tmp_path: Path) -> None:
    import json

    state = AssetState("BTC-USD", _settings(tmp_path, "ingest.keep_tick_status=true"))
    batch = TickBatch.from_columns("BTC-USD", ["a", "b", "a"], ts_event=[T0, T0 + 1, T0 + 2],
                                   price=[100.0, float("nan"), 100.1], seq=[1, 1, 2])
    state.step(batch, lambda s, e: {})
    st = json.loads(json.dumps(state.status()))
    assert st["counts"]["ticks_in"] == 3 and st["counts"]["rejected"] == {"non_finite": 1}
    log = state.status_log.arrays() if state.status_log else {}
    assert log["provider"].tolist() == ["a", "b", "a"] and log["status"].tolist() == [0, 2, 0]
