"""Bars for model-plane tests: synthetic with a known signal, and consensus-like real BTC bars.

Synthetic bars follow an AR(1) of one-minute log returns, ``r_t = phi * r_{t-1} + s_t * e_t``,
with a slowly switching volatility ``s_t`` and Student-t noise. The feature ``ret_1`` at bar t is
``r_t`` and the label is ``r_{t+1}``, so a model that learns ``phi`` beats the random walk (zero
forecast) by construction; with ``phi = 0`` nothing is predictable.

Real bars: the shared multi-venue file's BTC/USD minutes, per-minute median across venues (what
the data plane's consensus approximates until ``tickcast ingest --source replay`` fills a store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from tickcast.storage.bar_store import BarStore

NS_PER_MIN = 60_000_000_000
START_NS = int(pd.Timestamp("2024-01-01T00:00:00Z").value)


def make_synthetic_bars(n: int, seed: int = 0, phi: float = 0.35,
                        start_ns: int = START_NS) -> pd.DataFrame:
    """``n`` one-minute consensus bars (bar schema) with AR(1) returns."""
    rng = np.random.default_rng(seed)
    regime = np.repeat(rng.choice([5e-4, 1e-3, 2e-3], size=n // 240 + 1), 240)[:n]
    eps = rng.standard_t(5, size=n) / np.sqrt(5 / 3)
    r = np.zeros(n)
    for t in range(1, n):
        r[t] = phi * r[t - 1] + regime[t] * eps[t]
    close = 30_000.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate(([close[0]], close[:-1]))
    wiggle = np.abs(rng.normal(0, 2e-4, n))
    high = np.maximum(open_, close) * (1 + wiggle)
    low = np.minimum(open_, close) * (1 - wiggle)
    volume = rng.lognormal(0.0, 0.5, n)
    return pd.DataFrame({
        "ts": start_ns + np.arange(n, dtype=np.int64) * NS_PER_MIN,
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "vwap": (high + low + close) / 3.0, "ticks": rng.integers(5, 50, n).astype(np.int64),
        "providers": np.full(n, 3, dtype=np.int64), "confidence": rng.uniform(0.1, 1.0, n),
        "imputed": [""] * n,
    })


def consensus_like_bars(path: Path, symbol: str = "BTC/USD") -> pd.DataFrame:
    """Per-minute cross-venue median bars of ``symbol`` from the shared file (bar schema)."""
    raw = pd.read_csv(path, usecols=["timestamp_utc", "venue", "symbol", "open", "high", "low",
                                     "close", "volume", "trades"])
    raw = raw[raw["symbol"] == symbol].copy()
    raw["ts"] = pd.to_datetime(raw["timestamp_utc"], utc=True).dt.as_unit("ns").astype("int64")
    raw["pv"] = (raw["high"] + raw["low"] + raw["close"]) / 3.0 * raw["volume"]
    g = raw.groupby("ts")
    bars = pd.DataFrame({
        "open": g["open"].median(), "high": g["high"].median(), "low": g["low"].median(),
        "close": g["close"].median(), "volume": g["volume"].sum(), "pv": g["pv"].sum(),
        "ticks": g["trades"].sum().astype("int64"),
        "providers": g["venue"].nunique().astype("int64"),
        "spread": (g["close"].max() - g["close"].min()),
    })
    vol = bars["volume"]
    bars["vwap"] = np.where(vol > 0, bars["pv"] / vol.where(vol > 0, 1.0), bars["close"])
    bars["confidence"] = bars["spread"] / 2.0 / bars["close"] * 1e4
    bars["imputed"] = ""
    return bars.reset_index()[["ts", "open", "high", "low", "close", "volume", "vwap", "ticks",
                               "providers", "confidence", "imputed"]]


@pytest.fixture(scope="session")
def synthetic_bars() -> Callable[..., pd.DataFrame]:
    """The synthetic bar factory (:func:`make_synthetic_bars`)."""
    return make_synthetic_bars


@pytest.fixture(scope="session")
def real_bars() -> Callable[[Path], pd.DataFrame]:
    """The consensus-like real bar builder (:func:`consensus_like_bars`)."""
    return consensus_like_bars


@pytest.fixture(scope="session")
def write_bars() -> Callable[[Path, str, pd.DataFrame], int]:
    """Write consensus bars of an asset into ``<data_dir>/bars``."""

    def _write(data_dir: Path, asset: str, bars: pd.DataFrame) -> int:
        return BarStore(Path(data_dir) / "bars", fsync=False).upsert(asset, "consensus", bars)

    return _write
