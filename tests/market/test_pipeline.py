"""The per-asset pipeline: accounting, stage order, checkpointing by pickle."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bench.core import make_ticks, measure_core
from tickcast.errors import InvalidInput, TickStatus, UnknownAsset
from tickcast.market.pipeline import AssetPipeline, IngestCounts
from tickcast.ticks import NS_PER_S, TickBatch


def _total(counts: IngestCounts) -> int:
    return (counts.ticks_accepted + sum(counts.rejected.values()) + counts.duplicates
            + sum(counts.outliers.values()) + counts.late + counts.frozen)


def test_every_tick_is_accounted_for(synth: SimpleNamespace) -> None:
    # Arrange: generated ticks with NaNs, x5 prints and re-deliveries, plus injected cases.
    batch = make_ticks(30_000, providers=3, seed=1, anomaly_rate=0.01)
    batch.bid[5], batch.ask[5] = 2e5, 1e5  # crossed
    batch.size[6] = -1.0  # malformed
    pipe = AssetPipeline("BTC-USD", synth.settings)
    # Act
    results = [pipe.process(p) for p in synth.split(batch, 7_000)] + [pipe.flush()]
    # Assert
    for r in results:
        assert _total(r.counts) == r.counts.ticks_in
    total = pipe.totals
    assert total.ticks_in == 30_000
    assert total.rejected["crossed"] == 1 and total.rejected["malformed"] == 1
    assert 70 <= total.rejected["non_finite"] <= 130  # ~1/3 of 1 % of 30,000
    assert 70 <= total.duplicates <= 130
    assert 70 <= sum(total.outliers.values()) <= 130
    assert total.bars == sum(len(r.consensus_bars) for r in results) - total.amended


def test_stages_run_in_order_and_statuses_are_set_in_place(synth: SimpleNamespace) -> None:
    t = np.array([1, 2, 3, 4, 5, 6])
    batch = synth.ticks(["a", "a", "b", "b", "a", "b"], t, [100.0, 100.0, float("inf"), 100.1, 500.0, 100.2],
                        seq=[1, 1, 1, 2, 2, 3])
    res = AssetPipeline("BTC-USD", synth.settings).process(batch)
    assert [TickStatus(s).name for s in batch.status] == ["OK", "DUPLICATE", "NON_FINITE", "OK", "OUTLIER", "OK"]
    assert res.counts.to_dict() == {
        "ticks_in": 6, "ticks_accepted": 3, "rejected": {"non_finite": 1}, "duplicates": 1,
        "outliers": {"a": 1}, "late": 0, "frozen": 0, "bars": 0, "amended": 0,
    }


def test_late_and_amended_are_counted(synth: SimpleNamespace) -> None:
    pipe = AssetPipeline("BTC-USD", synth.settings)
    pipe.process(synth.ticks(["a", "a"], [10, 400], [100.0, 100.1], seq=[1, 2]))
    amend = pipe.process(synth.ticks(["a"], [350], [100.2], seq=[3]))  # minute 5, watermark 280 s
    late = pipe.process(synth.ticks(["a"], [30], [100.3], seq=[4]))
    assert amend.counts.amended == 0 and amend.counts.bars == 1  # minute 5 first emitted here
    again = pipe.process(synth.ticks(["a"], [355], [100.4], seq=[5]))
    assert again.counts.amended == 1 and again.consensus_bars.close.tolist() == [100.4]
    assert late.counts.late == 1 and len(late.late) == 1
    assert late.late.status.tolist() == [TickStatus.LATE]


def test_batch_of_another_asset_is_rejected_not_raised(synth: SimpleNamespace) -> None:
    batch = synth.ticks(["a", "b"], [1, 2], [3000.0, 3001.0], asset="ETH-USD")
    res = AssetPipeline("BTC-USD", synth.settings).process(batch)
    assert res.counts.rejected == {"unknown_asset": 2} and res.counts.ticks_accepted == 0
    assert len(res.consensus_bars) == 0


def test_empty_and_all_rejected_batches_pass_through(synth: SimpleNamespace) -> None:
    pipe = AssetPipeline("BTC-USD", synth.settings)
    bad = synth.ticks(["a", "b", "c"], [1, 2, 3], [float("nan"), -1.0, float("inf")])
    bad.provider[2] = 9  # outside the vocabulary
    empty = pipe.process(TickBatch.empty("BTC-USD"))
    res = pipe.process(bad)
    assert empty.counts.ticks_in == 0 and len(empty.consensus_bars) == 0
    assert res.counts.rejected == {"non_finite": 1, "non_positive": 1, "malformed": 1}
    assert pipe.flush().consensus_bars.empty


def test_unconfigured_asset_is_a_clear_error(synth: SimpleNamespace) -> None:
    with pytest.raises(UnknownAsset) as err:
        AssetPipeline("DOGE-USD", synth.settings)
    assert err.value.field == "asset" and "DOGE-USD" in err.value.message


def test_restored_pipeline_continues_identically(synth: SimpleNamespace) -> None:
    # Arrange: process part of a stream, checkpoint by pickle.
    batch = make_ticks(20_000, providers=4, seed=3, anomaly_rate=0.01)
    parts = synth.split(batch, 2_500)
    pipe = AssetPipeline("BTC-USD", synth.settings)
    for p in parts[:3]:
        pipe.process(p)
    restored = pickle.loads(pickle.dumps(pipe))
    # Act / Assert: both continue with the same input and produce the same output.
    for p in parts[3:]:
        x, y = p.take(np.arange(len(p))), p.take(np.arange(len(p)))
        rx, ry = pipe.process(x), restored.process(y)
        assert np.array_equal(x.status, y.status)
        assert rx.counts == ry.counts
        pd.testing.assert_frame_equal(rx.consensus_bars, ry.consensus_bars)
        pd.testing.assert_frame_equal(rx.provider_bars, ry.provider_bars)
    pd.testing.assert_frame_equal(pipe.flush().consensus_bars, restored.flush().consensus_bars)
    assert pipe.totals == restored.totals


def test_ingest_counts_merge_and_dict_round_trip() -> None:
    a = IngestCounts(ticks_in=10, ticks_accepted=7, rejected={"null": 1}, duplicates=1,
                     outliers={"x": 1}, bars=2)
    b = IngestCounts(ticks_in=5, ticks_accepted=4, rejected={"null": 1, "crossed": 1}, late=0, amended=1)
    merged = IngestCounts.from_dict(a.to_dict()).merge(b)
    assert merged.to_dict() == {
        "ticks_in": 15, "ticks_accepted": 11, "rejected": {"null": 2, "crossed": 1}, "duplicates": 1,
        "outliers": {"x": 1}, "late": 0, "frozen": 0, "bars": 2, "amended": 1,
    }
    assert IngestCounts.from_dict(merged.to_dict()) == merged
    with pytest.raises(InvalidInput) as err:
        IngestCounts.from_dict({"ticks_in": 1, "tick_in": 2})
    assert err.value.field == "tick_in"


def test_generated_bench_ticks_arrive_in_latency_order() -> None:
    batch = make_ticks(5_000, providers=4, seed=0)
    assert len(batch) == 5_000 and set(batch.providers) == {"p0", "p1", "p2", "p3"}
    assert np.all(np.diff(batch.ts_init) >= 0)
    assert (np.diff(batch.ts_event) < 0).any()  # latency reorders event times a little
    assert np.all(np.abs(batch.ts_init - batch.ts_event) < 3 * NS_PER_S)


def test_measure_core_reports_rate_and_machine() -> None:
    out = measure_core(n_ticks=20_000, providers=3, seed=1, batch_ticks=5_000)
    assert out["batches"] == 4 and out["core_ticks_per_s"] > 0
    assert out["counts"]["ticks_in"] == 20_000  # type: ignore[index]
    assert {"platform", "cpu_count"} <= set(out["machine"])  # type: ignore[arg-type]
