"""Acceptance on the real multi-venue BTC/USD file (2023-03-01..09, 1-minute bars).

Replaying one venue must rebuild its bars exactly; with three venues the consensus must sit on
the cross-venue median close and the outlier filter must leave real prices alone.
Run with ``-s`` to see the achieved figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tickcast.config import Settings
from tickcast.market.pipeline import AssetPipeline, IngestCounts
from tickcast.sources.replay import ReplayFile, iter_replay_batches, read_bar_file

ASSET = "BTC-USD"
VENUES = ("binanceus", "coinbase", "kraken")


@pytest.fixture(scope="module")
def btc_bars(shared_data_file: Path) -> pd.DataFrame:
    replay = read_bar_file(shared_data_file, (ASSET,))
    return replay.bars


def _replay(bars: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, IngestCounts]:
    """Replay through one pipeline; return the last emitted version of every bar."""
    pipe = AssetPipeline(ASSET, settings)
    cons, prov = [], []
    for batch in iter_replay_batches(ReplayFile(bars=bars), ASSET, settings.ingest.batch_max_ticks):
        res = pipe.process(batch)
        cons.append(res.consensus_bars)
        prov.append(res.provider_bars)
    res = pipe.flush()
    cons.append(res.consensus_bars)
    prov.append(res.provider_bars)
    c = pd.concat(cons, ignore_index=True).drop_duplicates("ts", keep="last").sort_values("ts")
    p = pd.concat(prov, ignore_index=True).drop_duplicates(["ts", "provider"], keep="last")
    return c.reset_index(drop=True), p.sort_values(["provider", "ts"]).reset_index(drop=True), pipe.totals


@pytest.mark.parametrize("venue", ["kraken", "binanceus"])
def test_one_venue_replay_rebuilds_its_bars_exactly(btc_bars: pd.DataFrame, venue: str) -> None:
    # Arrange
    src = btc_bars[btc_bars.venue == venue].sort_values("ts").reset_index(drop=True)
    # Act
    cons, prov, totals = _replay(src, Settings())
    # Assert: every minute back, OHLCV identical bit for bit.
    print(f"\n{venue}: {len(src)} bars in, {len(cons)} consensus bars out, counts {totals.to_dict()}")
    assert totals.ticks_accepted == 4 * len(src)
    assert cons.ts.tolist() == src.ts.tolist()
    for col in ("open", "high", "low", "close", "volume"):
        assert np.array_equal(cons[col].to_numpy(), src[col].to_numpy()), col
    # ... and the consensus bars are the provider's bars.
    assert (prov.provider == venue).all()
    same = ["ts", "open", "high", "low", "close", "volume", "vwap", "ticks", "providers", "confidence"]
    pd.testing.assert_frame_equal(cons[same], prov[same])


def test_three_venue_consensus_tracks_the_cross_venue_median(btc_bars: pd.DataFrame) -> None:
    # Arrange
    bars = btc_bars[btc_bars.venue.isin(VENUES)]
    closes = bars.pivot_table(index="ts", columns="venue", values="close", aggfunc="first")
    all_three = closes.dropna()
    median = all_three.median(axis=1)
    # Act
    cons, _, totals = _replay(bars, Settings())
    # Assert
    ours = cons.set_index("ts").close.reindex(all_three.index)
    dev_bp = ((ours - median).abs() / median * 1e4).to_numpy()
    within = float(np.mean(dev_bp <= 1.0))
    outliers = sum(totals.outliers.values())
    outlier_share = outliers / (totals.ticks_accepted + outliers)
    print(f"\nminutes quoted by all three venues: {len(all_three)}; consensus close within 1 bp of "
          f"the cross-venue median in {within:.4%} (max {np.nanmax(dev_bp):.2f} bp, missing "
          f"{int(np.isnan(dev_bp).sum())}); outliers {outliers} = {outlier_share:.4%} of accepted "
          f"ticks; frozen {totals.frozen}; counts {totals.to_dict()}")
    assert within >= 0.99
    assert outlier_share <= 0.01
