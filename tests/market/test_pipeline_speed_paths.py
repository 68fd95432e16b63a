"""The small-batch fast paths of the pipeline emit exactly what a full evaluation would.

A batch that closes no minute, changes no closed bar and moves the watermark past no bar end
skips the consensus evaluation; results without bars share one empty frame schema; unpaced
simulator deliveries are joined into larger stream entries. None of this may change a bar, a
status or a count.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bench.core import make_ticks
from tickcast.config import Settings, load_settings
from tickcast.errors import InvalidInput, TickStatus
from tickcast.ingest import coalesce_batches
from tickcast.market.bars import empty_bar_frame
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.simulator import MarketSimulator, score_detection
from tickcast.ticks import NS_PER_MIN, TickBatch


def sim_batches(seconds_per_batch: float, minutes: float, seed: int,
                asset: str = "BTC-USD") -> tuple[Settings, list[TickBatch], MarketSimulator]:
    """One asset's simulator deliveries, with every anomaly kind at a raised rate."""
    settings = load_settings(overrides=[f"simulator.batch_s={seconds_per_batch}",
                                        "simulator.anomaly_rate=0.03"])
    sim = MarketSimulator.from_settings(settings, seed, (asset,))
    return settings, list(sim.run(minutes)), sim


def assert_nothing_closed_is_owed(pipe: AssetPipeline, newest_ns: int) -> None:
    """Flushing a copy re-emits no closed bar: every bar whose minute ended at or before the
    newest accepted tick was emitted already, with the values a full evaluation gives now."""
    flushed = pickle.loads(pickle.dumps(pipe)).flush()
    end = flushed.consensus_bars["ts"].to_numpy() + NS_PER_MIN
    assert not (end <= newest_ns).any(), flushed.consensus_bars.loc[end <= newest_ns]
    end_p = flushed.provider_bars["ts"].to_numpy() + NS_PER_MIN
    assert not (end_p <= newest_ns).any()


@pytest.mark.parametrize("seconds_per_batch, split, minutes", [(5.0, None, 25), (1.0, None, 10),
                                                               (5.0, 3, 6)])
def test_small_batches_leave_no_closed_bar_unemitted(seconds_per_batch: float, split: int | None,
                                                     minutes: int) -> None:
    # Arrange: out-of-order, late, frozen and duplicate ticks delivered in small batches.
    settings, batches, _ = sim_batches(seconds_per_batch, minutes, seed=5)
    if split is not None:
        batches = [b.take(np.arange(s, min(s + split, len(b))))
                   for b in batches for s in range(0, len(b), split)]
    pipe = AssetPipeline("BTC-USD", settings)
    newest = np.iinfo(np.int64).min
    quiet = amended = 0
    # Act / Assert after every batch
    for batch in batches:
        res = pipe.process(batch)
        ok = batch.status == TickStatus.OK
        if ok.any():
            newest = max(newest, int(batch.ts_event[ok].max()))
        quiet += len(res.consensus_bars) == 0
        amended += res.counts.amended
        assert_nothing_closed_is_owed(pipe, newest)
    assert quiet > 0.8 * len(batches) and amended > 0  # the fast path and amendments both ran
    assert pipe.totals.bars == minutes - 1  # the last minute is still open


def test_bench_batches_of_every_size_give_the_same_bars() -> None:
    ticks = make_ticks(12_000, providers=4, seed=2, anomaly_rate=0.01)

    def final_bars(size: int) -> tuple[pd.DataFrame, dict[str, object]]:
        pipe = AssetPipeline("BTC-USD", Settings())
        frames = [pipe.process(ticks.take(np.arange(s, min(s + size, len(ticks))))).consensus_bars
                  for s in range(0, len(ticks), size)]
        frames.append(pipe.flush().consensus_bars)
        bars = pd.concat(frames, ignore_index=True).drop_duplicates("ts", keep="last")
        counts = pipe.totals.to_dict()
        counts.pop("amended")  # re-emissions depend on where batches end
        return bars.sort_values("ts").reset_index(drop=True), counts

    whole, whole_counts = final_bars(len(ticks))
    for size in (100, 37):
        bars, counts = final_bars(size)
        assert counts == whole_counts
        pd.testing.assert_frame_equal(bars, whole, check_exact=False, rtol=1e-12)


def test_results_without_bars_have_the_schema_and_are_independent_frames() -> None:
    settings, batches, _ = sim_batches(5.0, 3, seed=1)
    pipe = AssetPipeline("BTC-USD", settings)
    quiet = [r for r in (pipe.process(b) for b in batches) if len(r.consensus_bars) == 0]
    a, b = quiet[0], quiet[1]
    pd.testing.assert_frame_equal(a.consensus_bars, empty_bar_frame())
    pd.testing.assert_frame_equal(a.provider_bars, empty_bar_frame(True))
    a.consensus_bars["extra"] = 1.0  # a caller changing its frame changes nobody else's
    a.provider_bars.loc[0] = [0, *[1.0] * 6, 1, 1, 0.0, "", "x"]
    assert len(b.provider_bars) == 0 and len(empty_bar_frame(True)) == 0
    assert "extra" not in b.consensus_bars.columns and "extra" not in empty_bar_frame().columns
    other = pipe.process(TickBatch.empty("ETH-USD"))
    assert list(other.consensus_bars.columns) == list(empty_bar_frame().columns)


def test_coalesced_deliveries_keep_every_status_and_bar() -> None:
    # Arrange: the same deliveries one by one and joined as the unpaced ingest driver joins them.
    settings, batches, sim = sim_batches(5.0, 30, seed=7)

    def run(parts: list[TickBatch]) -> tuple[np.ndarray, pd.DataFrame, dict[str, object]]:
        pipe = AssetPipeline("BTC-USD", settings)
        statuses, frames = [], []
        for part in parts:
            part = part.take(np.arange(len(part)))
            frames.append(pipe.process(part).consensus_bars)
            statuses.append(part.status)
        frames.append(pipe.flush().consensus_bars)
        bars = pd.concat(frames, ignore_index=True).drop_duplicates("ts", keep="last")
        return np.concatenate(statuses), bars.sort_values("ts").reset_index(drop=True), pipe.totals.to_dict()

    joined = list(coalesce_batches(iter(batches), settings.ingest.batch_max_ticks // 4))
    # Act
    one, one_bars, one_counts = run(batches)
    big, big_bars, big_counts = run(joined)
    # Assert
    assert len(joined) < len(batches) / 50
    np.testing.assert_array_equal(one, big)  # tick by tick, in delivery order
    labels = sim.tick_keys("BTC-USD")["label"].to_numpy()
    assert score_detection(labels, one) == score_detection(labels, big)
    one_counts.pop("amended"), big_counts.pop("amended")  # late ticks now arrive with their bar
    assert one_counts == big_counts
    pd.testing.assert_frame_equal(one_bars, big_bars, check_exact=False, rtol=1e-12)


def test_coalesce_batches_keeps_order_per_asset_and_the_cap() -> None:
    t0 = 1_700_000_040 * 10**9
    parts = [TickBatch.from_columns(asset, ["p"] * k, ts_event=t0 + np.arange(k) + 10 * i,
                                    price=np.full(k, 1.0), seq=np.arange(k) + 10 * i)
             for i, (asset, k) in enumerate([("A", 3), ("B", 2), ("A", 3), ("A", 9), ("B", 4),
                                             ("A", 1)])]
    out = list(coalesce_batches(parts, 6))
    assert [(b.asset, len(b)) for b in out] == [("A", 6), ("A", 9), ("A", 1), ("B", 6)]
    for asset in ("A", "B"):
        seqs = np.concatenate([b.seq for b in out if b.asset == asset])
        np.testing.assert_array_equal(seqs, np.concatenate([p.seq for p in parts if p.asset == asset]))
    with pytest.raises(InvalidInput) as err:
        list(coalesce_batches(parts, 0))
    assert err.value.field == "max_ticks"


def test_pipeline_pickled_between_quiet_batches_continues_identically(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=900, every_s=1.0)
    parts = synth.split(batch, 25)
    pipe = AssetPipeline("BTC-USD", synth.settings)
    for p in parts[:100]:
        pipe.process(p)
    restored = pickle.loads(pickle.dumps(pipe))
    for p in parts[100:]:
        x = pipe.process(p.take(np.arange(len(p))))
        y = restored.process(p.take(np.arange(len(p))))
        pd.testing.assert_frame_equal(x.consensus_bars, y.consensus_bars)
        pd.testing.assert_frame_equal(x.provider_bars, y.provider_bars)
        assert x.counts == y.counts
