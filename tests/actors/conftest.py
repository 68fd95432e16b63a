"""Fixtures of the actor tests: a one-day slice of the shared file, settings on a private stream
namespace, and the bars of an undisturbed replay that the fault drills must reproduce.

Every test that runs the actors uses its own data dir and its own stream prefix on the
session's Redis, so runs never read each other's ticks; the market shards are replaced when
a test asks for them with other settings (see ``actors.market_shard.get_or_create_shards``).
"""

from __future__ import annotations

import gzip
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from tickcast.config import Settings, load_settings
from tickcast.storage.bar_store import BarStore

# One UTC day, two assets with three venues each: enough minutes for gaps, amendments and many
# stream entries, small enough for a replay of a few seconds.
SLICE_DAY = "2023-03-01"
FAULT_ASSETS: tuple[str, ...] = ("BTC-USD", "BTC-USDT")
FAULT_BATCH_TICKS = 300  # ~115 entries for the day: a fault lands mid-replay


@pytest.fixture(scope="session")
def day_slice(shared_data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared file's first day (all symbols), as a gzip CSV outside the repository."""
    out = tmp_path_factory.mktemp("slice") / f"bars_{SLICE_DAY}.csv.gz"
    with gzip.open(shared_data_file, "rt") as src, gzip.open(out, "wt") as dst:
        dst.write(next(src))
        for line in src:
            if line.startswith(SLICE_DAY):
                dst.write(line)
            elif line > SLICE_DAY + "T99":  # rows are in time order: the day is over
                break
    return out


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, redis_url: str) -> SettingsFactory:
    """Settings on a fresh data dir, the session Redis and a stream prefix of their own."""

    def make(*overrides: str, data_dir: Path | None = None) -> Settings:
        prefix = f"'test-{uuid.uuid4().hex[:8]}:ticks:'"
        return load_settings(overrides=[
            f"data_dir={data_dir or tmp_path}", f"redis.url={redis_url}",
            f"ingest.stream_prefix={prefix}", f"assets=[{','.join(FAULT_ASSETS)}]",
            f"ingest.batch_max_ticks={FAULT_BATCH_TICKS}", *overrides,
        ])

    return make


@dataclass
class StoredBars:
    """Everything the bar store holds for some assets: source -> frame, per asset."""

    frames: dict[str, dict[str, pd.DataFrame]]

    @classmethod
    def read(cls, data_dir: Path, assets: tuple[str, ...]) -> "StoredBars":
        store = BarStore(Path(data_dir) / "bars")
        return cls({a: {s: store.read(a, s) for s in store.sources(a)} for a in assets})

    def assert_equal(self, other: "StoredBars") -> None:
        """Same assets, same sources, identical bars (every column, every minute)."""
        assert self.frames.keys() == other.frames.keys()
        for asset, sources in self.frames.items():
            assert sources.keys() == other.frames[asset].keys(), asset
            for source, frame in sources.items():
                pd.testing.assert_frame_equal(frame, other.frames[asset][source],
                                              check_exact=True, obj=f"{asset}/{source}")

    def consensus_rows(self) -> int:
        return sum(len(s["consensus"]) for s in self.frames.values())


@pytest.fixture(scope="session")
def read_bars() -> Callable[[Path, tuple[str, ...]], StoredBars]:
    """``read_bars(data_dir, assets)``: every stored bar of those assets."""
    return StoredBars.read


@dataclass
class Baseline:
    """An undisturbed replay of the slice: what the drills must reproduce."""

    assets: tuple[str, ...]
    bars: StoredBars
    report: dict
    batch_max_ticks: int


@pytest.fixture(scope="session")
def baseline(day_slice: Path, redis_url: str, ray_session: None,
             tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """Bars and report of an undisturbed replay of the slice (the reference of the drills)."""
    from tickcast.ingest import IngestPlan, run_ingest

    data_dir = tmp_path_factory.mktemp("baseline")
    settings = load_settings(overrides=[
        f"data_dir={data_dir}", f"redis.url={redis_url}",
        f"ingest.stream_prefix='baseline-{uuid.uuid4().hex[:8]}:ticks:'",
        f"assets=[{','.join(FAULT_ASSETS)}]", f"ingest.batch_max_ticks={FAULT_BATCH_TICKS}",
    ])
    report = run_ingest(settings, IngestPlan("replay", FAULT_ASSETS, path=day_slice))
    bars = StoredBars.read(data_dir, FAULT_ASSETS)
    assert bars.consensus_rows() > 2000, "the slice should give a day of bars per asset"
    return Baseline(FAULT_ASSETS, bars, report, FAULT_BATCH_TICKS)
