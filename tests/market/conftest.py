"""Synthetic tick builders with known truth for the market-core tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from tickcast.config import Settings
from tickcast.ticks import NS_PER_S, TickBatch

T0 = 1_700_000_040 * NS_PER_S  # a minute boundary (2023-11-14 22:14 UTC)

_SHARED_NAME = Path("shared") / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"
_ROOT = Path(__file__).resolve().parents[2]
# Beside the repository (the usual layout), or one level further up (a git worktree kept in a
# folder of worktrees next to the repository).
SHARED_CANDIDATES: tuple[Path, ...] = (_ROOT.parent / _SHARED_NAME, _ROOT.parent.parent / _SHARED_NAME)


@pytest.fixture(scope="session")
def shared_data_file() -> Path:
    """The real multi-venue BTC file, read in place (never copied into the repository)."""
    for path in SHARED_CANDIDATES:
        if path.exists():
            return path
    pytest.skip(f"shared data not found at {SHARED_CANDIDATES[0]}")


def ticks(names: list[str], secs: list[float] | np.ndarray, prices: list[float] | np.ndarray,
          **cols: object) -> TickBatch:
    """A batch with event times ``T0 + secs``."""
    ts = T0 + np.round(np.asarray(secs, dtype=np.float64) * NS_PER_S).astype(np.int64)
    return TickBatch.from_columns(cols.pop("asset", "BTC-USD"), names, ts_event=ts, price=prices, **cols)


def market(
    providers: tuple[str, ...] = ("a", "b", "c"),
    seconds: float = 600.0,
    every_s: float = 2.0,
    path: Callable[[np.ndarray], np.ndarray] | None = None,
    noise_bp: float = 1.0,
    seed: int = 0,
) -> TickBatch:
    """Each provider quotes ``path(t)`` (t in seconds from T0) with noise every ``every_s``
    seconds, phases staggered; ticks in event-time order with per-provider sequence numbers."""
    rng = np.random.default_rng(seed)
    path = path or (lambda t: np.full(len(t), 100.0))
    per = int(seconds / every_s)
    names, secs, seq = [], [], []
    for i, p in enumerate(providers):
        s = np.arange(per) * every_s + every_s * i / len(providers)
        names += [p] * per
        secs.append(s)
        seq.append(np.arange(per))
    t = np.concatenate(secs)
    order = np.argsort(t, kind="stable")
    t = t[order]
    price = path(t) * (1.0 + noise_bp * 1e-4 * rng.standard_normal(len(t)))
    return ticks(list(np.asarray(names)[order]), t, price, seq=np.concatenate(seq)[order],
                 size=np.round(rng.uniform(0.1, 2.0, len(t)), 3))


def split(batch: TickBatch, size: int) -> list[TickBatch]:
    """Consecutive batches of at most ``size`` ticks."""
    return [batch.take(np.arange(s, min(s + size, len(batch)))) for s in range(0, len(batch), size)]


@pytest.fixture
def synth() -> SimpleNamespace:
    """Builders: ``ticks``, ``market``, ``split``, the epoch ``T0``, default ``settings``."""
    return SimpleNamespace(ticks=ticks, market=market, split=split, T0=T0, settings=Settings())
