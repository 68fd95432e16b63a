"""Provider and consensus bars in event time: emission, amendment, lateness, aggregation."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tickcast.config import BarConfig, ConsensusConfig
from tickcast.errors import InvalidInput, TickStatus
from tickcast.market.bars import BAR_COLUMNS, BarBuilder, BarUpdate
from tickcast.market.consensus import pyth_aggregate
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch


def _builder(**bars: float) -> BarBuilder:
    return BarBuilder("BTC-USD", BarConfig(**bars), ConsensusConfig())


def _latest(frames: list[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """Last emitted version of each bar."""
    df = pd.concat([f for f in frames if len(f)], ignore_index=True)
    return df.drop_duplicates(keys, keep="last").sort_values(keys).reset_index(drop=True)


def _run(builder: BarBuilder, batches: list[TickBatch]) -> tuple[pd.DataFrame, pd.DataFrame, list[BarUpdate]]:
    ups = [builder.update(b) for b in batches] + [builder.flush()]
    return (_latest([u.consensus for u in ups], ["ts"]),
            _latest([u.provider for u in ups], ["ts", "provider"]), ups)


def test_provider_bar_from_known_ticks_in_event_time_order(synth: SimpleNamespace) -> None:
    # Arrange: minute 0 ticks given out of order; minute 1 has one tick.
    b = synth.ticks(["k"] * 5, [30, 5, 50, 20, 61], [101.0, 100.0, 99.0, 103.0, 104.0],
                    size=[2.0, 1.0, 1.0, 1.0, 1.0])
    # Act
    cons, prov, _ = _run(_builder(), [b])
    # Assert
    first = prov.iloc[0]
    assert (first.ts, first.open, first.high, first.low, first.close) == (synth.T0, 100.0, 103.0, 99.0, 99.0)
    assert first.volume == 5.0 and first.ticks == 4 and first.provider == "k"
    assert math.isclose(first.vwap, (202 + 100 + 99 + 103) / 5.0)
    assert list(cons.columns) == list(BAR_COLUMNS)
    assert cons.ts.tolist() == [synth.T0, synth.T0 + NS_PER_MIN]
    assert (cons.imputed == "").all() and (prov.confidence == 0).all()


def test_bar_is_emitted_once_event_time_passes_its_end(synth: SimpleNamespace) -> None:
    bb = _builder()
    first = bb.update(synth.ticks(["k"] * 3, [1, 30, 59.9], [1.0, 2.0, 3.0]))
    second = bb.update(synth.ticks(["k"], [60], [4.0]))
    rest = bb.flush()

    assert len(first.consensus) == 0 and len(first.provider) == 0
    assert second.consensus.ts.tolist() == [synth.T0] and second.bars_new == 1
    assert rest.consensus.ts.tolist() == [synth.T0 + NS_PER_MIN]


def test_late_tick_within_lateness_amends_its_bar(synth: SimpleNamespace) -> None:
    # Arrange: minute 0 is emitted when a tick at 70 s arrives.
    bb = _builder(allowed_lateness_s=120)
    bb.update(synth.ticks(["k", "k", "k"], [5, 40, 70], [100.0, 101.0, 102.0]))
    # Act: a tick of minute 0 arrives late but within the allowed lateness.
    up = bb.update(synth.ticks(["k"], [50], [105.0], size=[3.0]))
    # Assert: re-emitted with the late tick (new high, volume), counted as amended.
    assert up.late.status.tolist() == []
    assert up.bars_amended == 1 and up.bars_new == 0
    row = up.consensus.iloc[0]
    assert (row.ts, row.high, row.close, row.volume, row.ticks) == (synth.T0, 105.0, 105.0, 5.0, 3)
    assert up.provider[["ts", "high", "provider"]].values.tolist() == [[synth.T0, 105.0, "k"]]


def test_tick_older_than_watermark_is_late_and_kept_aside(synth: SimpleNamespace) -> None:
    bb = _builder(allowed_lateness_s=120)
    bb.update(synth.ticks(["k", "k"], [5, 400], [100.0, 101.0]))
    late = synth.ticks(["k", "k"], [100, 300], [99.0, 98.0])

    up = bb.update(late)

    assert up.watermark_ns == synth.T0 + 280 * NS_PER_S
    assert late.status.tolist() == [TickStatus.LATE, TickStatus.OK]
    assert len(up.late) == 1 and up.late.price.tolist() == [99.0]
    assert up.late.status.tolist() == [TickStatus.LATE]
    # The tick at 300 s opens minute 5, already closed by the tick at 400 s: emitted now.
    assert up.consensus.ts.tolist() == [synth.T0 + 300 * NS_PER_S] and up.bars_new == 1


def test_lateness_is_judged_in_arrival_order_inside_a_batch(synth: SimpleNamespace) -> None:
    # A tick 5 minutes older arriving right after a newer one in the same batch is late.
    batch = synth.ticks(["k", "k", "k"], [10, 400, 20], [1.0, 2.0, 3.0])
    up = _builder(allowed_lateness_s=120).update(batch)
    assert batch.status.tolist() == [TickStatus.OK, TickStatus.OK, TickStatus.LATE]
    assert len(up.late) == 1


def test_consensus_bar_is_the_pyth_aggregate_of_provider_bars(synth: SimpleNamespace) -> None:
    # Arrange: three providers with quotes in minute 0 (half spreads 0.1, 0.2, 0.3).
    names = ["a", "b", "c"] * 3
    secs = [1, 2, 3, 20, 21, 22, 50, 51, 52]
    px = np.array([100.0, 100.4, 99.8, 101.0, 100.9, 100.7, 100.2, 100.6, 100.1])
    half = np.repeat([[0.1, 0.2, 0.3]], 3, axis=0).ravel()
    batch = synth.ticks(names, secs, px, bid=px - half, ask=px + half, size=np.ones(9))
    # Act
    cons, prov, _ = _run(_builder(), [batch])
    # Assert
    row = cons.iloc[0]
    pb = prov.set_index("provider")
    for field in ("open", "high", "low", "close"):
        expected, conf = pyth_aggregate(pb[field].to_numpy(), np.array([0.1, 0.2, 0.3]))
        assert math.isclose(row[field], expected, rel_tol=1e-12), field
    assert math.isclose(row.confidence, conf / row.close * 1e4, rel_tol=1e-9)
    assert row.high >= max(row.open, row.close) and row.low <= min(row.open, row.close)
    assert row.volume == 9.0 and row.ticks == 9 and row.providers == 3
    assert math.isclose(row.vwap, px.mean(), rel_tol=1e-12)


def test_fresh_provider_votes_flat_and_stale_provider_does_not(synth: SimpleNamespace) -> None:
    # Arrange: a=100, b=101 trade every 10 s for 8 minutes; c=98 trades only in minutes 0-1.
    t = np.arange(0, 480, 10.0)
    names = ["a"] * len(t) + ["b"] * len(t) + ["c"] * 12
    secs = np.concatenate([t, t + 1, np.arange(0, 120, 10.0) + 2])
    px = [100.0] * len(t) + [101.0] * len(t) + [98.0] * 12
    order = np.argsort(secs, kind="stable")
    batch = synth.ticks(list(np.array(names)[order]), secs[order], np.array(px)[order])
    # Act
    cons, _, _ = _run(_builder(), [batch])
    close = cons.set_index((cons.ts - synth.T0) // NS_PER_MIN).close
    providers = cons.set_index((cons.ts - synth.T0) // NS_PER_MIN).providers
    # Assert: c's last tick is at 112 s. Minute 2 ends 68 s later (fresh: flat vote at 98 ->
    # median of 100, 101, 98 = 100); minute 3 ends 128 s later (stale after 120 s: a, b only).
    assert close[0] == close[1] == close[2] == 100.0
    assert (close[3:] == 100.5).all()
    assert providers.tolist() == [3, 3, 2, 2, 2, 2, 2, 2]


def test_unreliable_provider_is_left_out(synth: SimpleNamespace) -> None:
    batch = synth.ticks(["a", "b", "a", "b"], [1, 2, 61, 62], [100.0, 103.0, 100.0, 103.0])
    reliability = np.array([1.0, 0.1, 1.0, 0.1])  # b below min_reliability (0.2)

    up = _builder().update(batch, reliability)

    assert up.consensus[["close", "providers"]].values.tolist() == [[100.0, 1.0]]
    assert sorted(up.provider.provider) == ["a", "b"]  # its own bars are still built


def test_frozen_provider_does_not_vote_flat(synth: SimpleNamespace) -> None:
    # c trades at 98 in minute 0, then only sends FROZEN ticks: no flat vote in minute 1.
    batch = synth.ticks(["a", "b", "c", "a", "b", "c", "a"], [1, 2, 3, 61, 62, 63, 121],
                        [100.0, 101.0, 98.0, 100.0, 101.0, 98.0, 100.0],
                        status=[0, 0, 0, 0, 0, TickStatus.FROZEN, 0])
    cons = _builder().update(batch).consensus
    assert cons.close.tolist() == [100.0, 100.5]


def test_single_provider_consensus_equals_its_bars_exactly(synth: SimpleNamespace) -> None:
    # Arrange: one provider with quotes, random prices and sizes, over many batches.
    rng = np.random.default_rng(4)
    n = 3000
    secs = np.sort(rng.uniform(0, 3600, n))
    px = 100 * np.exp(np.cumsum(1e-4 * rng.standard_normal(n)))
    half = rng.uniform(0.01, 0.05, n)
    batch = synth.ticks(["solo"] * n, secs, px, bid=px - half, ask=px + half, size=rng.uniform(0, 2, n))
    # Act
    cons, prov, _ = _run(_builder(), synth.split(batch, 333))
    # Assert: identical bars; only the confidence differs (the provider's mean half spread in
    # bp for the consensus, 0 by definition on provider bars).
    assert len(cons) == 60
    same = [c for c in BAR_COLUMNS if c != "confidence"]
    pd.testing.assert_frame_equal(cons[same], prov[same])
    minute = (batch.ts_event - synth.T0) // NS_PER_MIN
    mean_half = pd.Series(half).groupby(minute).mean().to_numpy()
    np.testing.assert_allclose(cons.confidence, mean_half / cons.close * 1e4, rtol=1e-6)


def test_batch_boundaries_do_not_change_the_bars(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c", "d"), seconds=1800, every_s=3.0)
    whole_c, whole_p, _ = _run(_builder(), [batch.take(np.arange(len(batch)))])
    parts_c, parts_p, ups = _run(_builder(), synth.split(batch, 97))
    pd.testing.assert_frame_equal(whole_c, parts_c)
    pd.testing.assert_frame_equal(whole_p, parts_p)
    assert sum(u.bars_new for u in ups) == len(parts_c) == 30


def test_zero_volume_bar_has_mean_price_as_vwap(synth: SimpleNamespace) -> None:
    batch = synth.ticks(["k"] * 4, [0, 20, 40, 59], [10.0, 12.0, 9.0, 11.0], size=[0.0] * 4)
    cons = _run(_builder(), [batch])[0]
    assert cons[["volume", "vwap"]].values.tolist() == [[0.0, 10.5]]


def test_memory_holds_only_the_lateness_window(synth: SimpleNamespace) -> None:
    bb = _builder(allowed_lateness_s=120)
    for part in synth.split(synth.market(("a", "b", "c"), seconds=3600), 500):
        bb.update(part)
    assert bb.open_bars <= 3 * 4  # minutes within lateness (2) + the open one, per provider


def test_flushed_bars_cannot_be_reopened(synth: SimpleNamespace) -> None:
    bb = _builder()
    bb.update(synth.ticks(["k"], [10], [1.0]))
    bb.flush()
    again = synth.ticks(["k"], [20], [2.0])
    up = bb.update(again)
    assert again.status.tolist() == [TickStatus.LATE] and len(up.late) == 1


def test_pickle_round_trip_continues_identically(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=1200)
    parts = synth.split(batch, 200)
    bb = _builder()
    for p in parts[:2]:
        bb.update(p)
    restored = pickle.loads(pickle.dumps(bb))
    for p in parts[2:]:
        x, y = bb.update(p.take(np.arange(len(p)))), restored.update(p.take(np.arange(len(p))))
        pd.testing.assert_frame_equal(x.consensus, y.consensus)
        pd.testing.assert_frame_equal(x.provider, y.provider)
    pd.testing.assert_frame_equal(bb.flush().consensus, restored.flush().consensus)


def test_batch_of_another_asset_is_refused(synth: SimpleNamespace) -> None:
    with pytest.raises(InvalidInput) as err:
        _builder().update(synth.ticks(["k"], [1], [1.0], asset="ETH-USD"))
    assert err.value.field == "asset"
