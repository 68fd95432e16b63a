"""Consensus-like BTC/USD bars built from the shared multi-venue file (in the test, with pandas).

The per-minute consensus is the cross-venue median of open/high/low/close, the summed volume,
the volume-weighted vwap of the venues' typical prices, the venue count and the half-range of
the venues' closes in bp as confidence. A few artificial gaps and imputed bars are added so the
gap handling is exercised on real prices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NS_PER_MIN = 60_000_000_000


def consensus_like_bars(path: Path, symbol: str = "BTC/USD") -> pd.DataFrame:
    raw = pd.read_csv(path, usecols=["timestamp_utc", "venue", "symbol", "open", "high", "low",
                                     "close", "volume", "trades"])
    raw = raw[raw["symbol"] == symbol].copy()
    raw["ts"] = pd.to_datetime(raw["timestamp_utc"], utc=True).dt.as_unit("ns").astype("int64")
    raw["typical"] = (raw["high"] + raw["low"] + raw["close"]) / 3.0
    raw["pv"] = raw["typical"] * raw["volume"]
    g = raw.groupby("ts")
    bars = pd.DataFrame({
        "open": g["open"].median(),
        "high": g["high"].median(),
        "low": g["low"].median(),
        "close": g["close"].median(),
        "volume": g["volume"].sum(),
        "pv": g["pv"].sum(),
        "ticks": g["trades"].sum().astype("int64"),
        "providers": g["venue"].nunique().astype("int64"),
        "cmax": g["close"].max(),
        "cmin": g["close"].min(),
    })
    bars["vwap"] = np.where(bars["volume"] > 0, bars["pv"] / bars["volume"].where(bars["volume"] > 0, 1.0),
                            bars["close"])
    bars["confidence"] = (bars["cmax"] - bars["cmin"]) / 2.0 / bars["close"] * 1e4
    bars = bars.reset_index()[["ts", "open", "high", "low", "close", "volume", "vwap", "ticks",
                               "providers", "confidence"]]
    bars["imputed"] = ""
    return bars


def with_gaps_and_imputed(bars: pd.DataFrame) -> pd.DataFrame:
    """Drop a 1-, a 4- and a 150-minute stretch (longer than any lookback); mark ffill and
    interpolated bars as imputed with values as a gap policy would write them."""
    out = bars.copy()
    n = len(out)
    drop = np.zeros(n, dtype=bool)
    for start, length in ((300, 1), (900, 4), (2000, 150), (n - 500, 2)):
        drop[start:start + length] = True
    for i in (1200, 1201, 3000, 5000):
        out.loc[i, ["open", "high", "low", "close", "vwap"]] = out.loc[i - 1, "close"]
        out.loc[i, ["volume", "confidence"]] = 0.0
        out.loc[i, "imputed"] = "ffill"
    out.loc[4000, "imputed"] = "interpolate"
    return out[~drop].reset_index(drop=True)


@pytest.fixture(scope="session")
def btc_bars(shared_data_file: Path) -> pd.DataFrame:
    """Consensus-like BTC/USD bars for the whole file, with artificial gaps and imputed bars."""
    return with_gaps_and_imputed(consensus_like_bars(shared_data_file))
