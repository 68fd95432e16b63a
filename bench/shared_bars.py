"""Consensus bars of the shared multi-venue file, made by the project's own data plane.

The file's venues are replayed through :class:`~tickcast.market.pipeline.AssetPipeline` (the
same expansion into ticks as ``tickcast ingest --source replay``), so the bars are the ones the
live system stores: consensus across venues, outliers and frozen feeds removed, late amendments
applied (the last version of each bar is kept). Used by ``bench.drift`` and
``bench.safety_days``; the data is read in place and never copied.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tickcast.config import Settings
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.replay import ReplayFile, iter_replay_batches, read_bar_file

ROOT = Path(__file__).resolve().parent.parent
SHARED_FILE = ROOT.parent / "shared" / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"
VENUES: tuple[str, ...] = ("binanceus", "coinbase", "kraken")


def consensus_bars(path: str | Path = SHARED_FILE, asset: str = "BTC-USD",
                   venues: tuple[str, ...] = VENUES, settings: Settings | None = None) -> pd.DataFrame:
    """The asset's consensus bars (bar schema, ``ts`` ascending, one row per minute).

    Raises
    ------
    tickcast.errors.InvalidInput
        The file is missing or unreadable (the message names the path).
    """
    settings = settings or Settings()
    bars = read_bar_file(path, (asset,)).bars
    bars = bars[bars["venue"].isin(venues)]
    pipe = AssetPipeline(asset, settings)
    out = []
    for batch in iter_replay_batches(ReplayFile(bars=bars), asset, settings.ingest.batch_max_ticks):
        out.append(pipe.process(batch).consensus_bars)
    out.append(pipe.flush().consensus_bars)
    cons = pd.concat(out, ignore_index=True).drop_duplicates("ts", keep="last")
    return cons.sort_values("ts").reset_index(drop=True)
