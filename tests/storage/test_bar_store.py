"""BarStore, GapAuditStore and LateTickStore on a real filesystem."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tickcast.errors import InvalidInput, TickStatus
from tickcast.storage import bar_store as bs
from tickcast.storage.bar_store import BAR_COLUMNS, NS_PER_DAY, BarStore, GapAuditStore, LateTickStore
from tickcast.ticks import NS_PER_MIN, TickBatch

DAY0 = 19417 * NS_PER_DAY  # 2023-03-01T00:00Z


def make_bars(minutes: np.ndarray | list[int], price: float = 100.0, start: int = DAY0) -> pd.DataFrame:
    m = np.asarray(minutes, dtype=np.int64)
    close = price + np.arange(len(m), dtype=np.float64)
    return pd.DataFrame({
        "ts": start + m * NS_PER_MIN,
        "open": close - 0.5, "high": close + 1.0, "low": close - 1.0, "close": close,
        "volume": np.full(len(m), 2.0), "vwap": close - 0.1,
        "ticks": np.full(len(m), 7, dtype=np.int64), "providers": np.full(len(m), 3, dtype=np.int64),
        "confidence": np.full(len(m), 1.5), "imputed": [""] * len(m),
    })


@pytest.fixture
def store(tmp_path: Path) -> BarStore:
    return BarStore(tmp_path / "bars", fsync=False)


def test_upsert_read_roundtrip_keeps_schema(store: BarStore) -> None:
    bars = make_bars(range(5))
    assert store.upsert("BTC-USD", "consensus", bars) == 5
    out = store.read("BTC-USD")
    assert list(out.columns) == list(BAR_COLUMNS)
    assert out["ts"].dtype == np.int64 and out["ticks"].dtype == np.int64
    assert out["close"].dtype == np.float64 and pd.api.types.is_string_dtype(out["imputed"])
    pd.testing.assert_frame_equal(out.astype({"imputed": object}), bars.astype({"imputed": object}),
                                  check_dtype=False)
    assert out["ts"].is_monotonic_increasing


def test_replay_is_idempotent_and_new_rows_win(store: BarStore, tmp_path: Path) -> None:
    bars = make_bars(range(10))
    assert store.upsert("BTC-USD", "consensus", bars) == 10
    path = tmp_path / "bars" / "BTC-USD" / "consensus" / "2023-03-01.parquet"
    mtime = path.stat().st_mtime_ns
    # Replaying the same bars changes nothing and does not even rewrite the file.
    assert store.upsert("BTC-USD", "consensus", bars) == 0
    assert path.stat().st_mtime_ns == mtime
    # An amended bar replaces the stored one; its neighbours are untouched.
    amended = bars.iloc[[3]].copy()
    amended["close"] = 999.0
    amended["imputed"] = "ffill"
    assert store.upsert("BTC-USD", "consensus", amended) == 1
    out = store.read("BTC-USD")
    assert len(out) == 10
    assert out.loc[3, "close"] == 999.0 and out.loc[3, "imputed"] == "ffill"
    assert out.loc[4, "close"] == bars.loc[4, "close"]


def test_duplicate_ts_within_one_frame_keeps_last(store: BarStore) -> None:
    bars = pd.concat([make_bars([0, 1]), make_bars([1], price=500.0)], ignore_index=True)
    assert store.upsert("BTC-USD", "consensus", bars) == 2
    assert store.read("BTC-USD")["close"].tolist() == [100.0, 500.0]


def test_partitions_by_day_and_filters_half_open_range(store: BarStore, tmp_path: Path) -> None:
    minutes = np.arange(0, 3 * 1440, 30)  # three days, every 30 minutes
    store.upsert("BTC-USD", "consensus", make_bars(minutes))
    files = sorted(p.name for p in (tmp_path / "bars" / "BTC-USD" / "consensus").iterdir())
    assert files == ["2023-03-01.parquet", "2023-03-02.parquet", "2023-03-03.parquet"]
    lo, hi = DAY0 + 1410 * NS_PER_MIN, DAY0 + 1500 * NS_PER_MIN
    got = store.read("BTC-USD", start_ns=lo, end_ns=hi)["ts"].to_numpy()
    expected = DAY0 + minutes[(minutes >= 1410) & (minutes < 1500)] * NS_PER_MIN
    np.testing.assert_array_equal(got, expected)  # 1410, 1440, 1470: start in, end out
    assert len(store.read("BTC-USD", end_ns=DAY0)) == 0
    assert len(store.read("BTC-USD", start_ns=DAY0 + 5 * NS_PER_DAY)) == 0
    assert store.last_ts("BTC-USD") == DAY0 + int(minutes[-1]) * NS_PER_MIN


def test_empty_read_has_schema_and_listing(store: BarStore) -> None:
    empty = store.read("ETH-USD")
    assert empty.empty and list(empty.columns) == list(BAR_COLUMNS)
    assert empty["ts"].dtype == np.int64
    assert store.assets() == [] and store.sources("ETH-USD") == []
    assert store.last_ts("ETH-USD") is None
    store.upsert("ETH-USD", "consensus", make_bars([0]))
    store.upsert("BTC-USD", "kraken", make_bars([0]))
    assert store.assets() == ["BTC-USD", "ETH-USD"]
    assert store.sources("BTC-USD") == ["kraken"] and store.providers("ETH-USD") == []


def test_provider_sources_carry_provider_column(store: BarStore) -> None:
    frame = pd.concat([make_bars([0, 1]).assign(provider="kraken"),
                       make_bars([0, 2], price=200.0).assign(provider="coinbase")], ignore_index=True)
    assert store.upsert_providers("BTC-USD", frame) == 4
    assert store.providers("BTC-USD") == ["coinbase", "kraken"]
    kraken = store.read("BTC-USD", "kraken")
    assert kraken["provider"].tolist() == ["kraken", "kraken"]
    assert store.read("BTC-USD", "coinbase")["close"].tolist() == [200.0, 201.0]
    with pytest.raises(InvalidInput) as err:
        store.upsert("BTC-USD", "kraken", frame)
    assert err.value.field == "provider"
    with pytest.raises(InvalidInput):
        store.upsert("BTC-USD", "consensus", make_bars([0]).assign(provider="kraken"))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda df: df.drop(columns=["vwap"]), "vwap"),
        (lambda df: df.assign(ts=df["ts"].astype(np.float64)), "ts"),
        (lambda df: df.assign(close=df["close"].astype(str)), "close"),
        (lambda df: df.assign(ticks=df["ticks"] + 0.5), "ticks"),
        (lambda df: df.assign(imputed=[None] * len(df)), "imputed"),
        (lambda df: df.assign(ts=-df["ts"]), "ts"),
    ],
)
def test_bad_frames_are_rejected_naming_the_column(store: BarStore, mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as err:
        store.upsert("BTC-USD", "consensus", mutate(make_bars([0, 1])))
    assert err.value.field == field and field in err.value.message
    assert store.assets() == []


def test_compatible_dtypes_are_coerced(store: BarStore) -> None:
    bars = make_bars([0, 1]).astype({"ts": np.uint64, "volume": np.int32, "ticks": np.float64, "providers": np.int16})
    assert store.upsert("BTC-USD", "consensus", bars) == 2
    assert store.read("BTC-USD")["ticks"].dtype == np.int64


@pytest.mark.parametrize("asset, source", [("../x", "consensus"), ("BTC-USD", "a/b"), ("", "consensus"), ("BTC-USD", ".hidden")])
def test_names_cannot_escape_the_root(store: BarStore, asset: str, source: str) -> None:
    with pytest.raises(InvalidInput):
        store.upsert(asset, source, make_bars([0]))


def test_bad_read_bounds(store: BarStore) -> None:
    with pytest.raises(InvalidInput) as err:
        store.read("BTC-USD", start_ns=1.5)  # type: ignore[arg-type]
    assert err.value.field == "start_ns"


def test_cache_notices_a_file_replaced_by_another_writer(store: BarStore, tmp_path: Path) -> None:
    store.upsert("BTC-USD", "consensus", make_bars([0, 1]))
    other = BarStore(tmp_path / "bars", fsync=False)
    other.upsert("BTC-USD", "consensus", make_bars([2], price=300.0))
    # The first store's cached day is stale: it must re-read instead of dropping minute 2.
    store.upsert("BTC-USD", "consensus", make_bars([3], price=400.0))
    assert store.read("BTC-USD")["close"].tolist() == [100.0, 101.0, 300.0, 400.0]


def test_small_upserts_use_the_day_cache(store: BarStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.upsert("BTC-USD", "consensus", make_bars(range(100)))
    reads = []
    real = bs.pq.read_table
    monkeypatch.setattr(bs.pq, "read_table", lambda *a, **k: reads.append(a) or real(*a, **k))
    for minute in range(100, 110):
        store.upsert("BTC-USD", "consensus", make_bars([minute], price=float(minute)))
    assert reads == []
    assert len(store.read("BTC-USD")) == 110


def test_failed_write_leaves_previous_file_intact(store: BarStore, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store.upsert("BTC-USD", "consensus", make_bars(range(3)))

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(bs.os, "replace", crash)
    with pytest.raises(OSError):
        store.upsert("BTC-USD", "consensus", make_bars(range(3, 6)))
    monkeypatch.undo()
    directory = tmp_path / "bars" / "BTC-USD" / "consensus"
    assert [p.name for p in directory.iterdir()] == ["2023-03-01.parquet"]  # temp file removed
    assert BarStore(tmp_path / "bars").read("BTC-USD")["ts"].tolist() == make_bars(range(3))["ts"].tolist()


def test_sigkill_mid_writes_never_tears_a_file(tmp_path: Path) -> None:
    """A writer killed at a random moment leaves every day file readable and complete."""
    root = tmp_path / "bars"
    script = textwrap.dedent(f"""
        import numpy as np, pandas as pd
        from tickcast.storage.bar_store import BarStore
        store = BarStore({str(root)!r}, fsync=True)
        for i in range(100000):
            n = i + 1
            c = float(i) + np.arange(n)
            store.upsert("BTC-USD", "consensus", pd.DataFrame({{
                "ts": {DAY0} + np.arange(n, dtype=np.int64) * {NS_PER_MIN}, "open": c, "high": c,
                "low": c, "close": c, "volume": 1.0, "vwap": c, "ticks": 1, "providers": 1,
                "confidence": 0.0, "imputed": ""}}))
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(40):  # let it commit a few dozen writes, then kill it mid-stream
        line = proc.stdout.readline()
        assert line, "writer died before it was killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = int(line)
    out = BarStore(root).read("BTC-USD")
    # Each write rewrote minutes 0..i with price i: the file is one whole write, not a mix.
    i = len(out) - 1
    assert i >= committed
    np.testing.assert_array_equal(out["close"].to_numpy(), float(i) + np.arange(i + 1))
    for path in (root / "BTC-USD" / "consensus").glob("*.parquet"):
        pq.read_table(path)


def test_bar_store_pickles_without_cache(store: BarStore) -> None:
    store.upsert("BTC-USD", "consensus", make_bars([0]))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.root == store.root and copy.fsync == store.fsync
    copy.upsert("BTC-USD", "consensus", make_bars([1], price=5.0))
    assert copy.read("BTC-USD")["close"].tolist() == [100.0, 5.0]


def test_read_nine_days_is_one_pass_per_file(store: BarStore) -> None:
    minutes = np.arange(9 * 1440)
    assert store.upsert("BTC-USD", "consensus", make_bars(minutes)) == len(minutes)
    out = store.read("BTC-USD", start_ns=DAY0 + NS_PER_DAY, end_ns=DAY0 + 8 * NS_PER_DAY)
    assert len(out) == 7 * 1440 and out["ts"].is_monotonic_increasing
    assert (np.diff(out["ts"].to_numpy()) == NS_PER_MIN).all()


# ---- gap audit ------------------------------------------------------------------------------


def audit_frame(starts: list[int], method: str = "ffill") -> pd.DataFrame:
    return pd.DataFrame({"start": np.asarray(starts, dtype=np.int64) * NS_PER_MIN,
                         "end": (np.asarray(starts, dtype=np.int64) + 1) * NS_PER_MIN,
                         "missing_minutes": 2.0, "method": method, "filled": method != "excluded"})


def test_gap_audit_upsert_by_start(tmp_path: Path) -> None:
    audits = GapAuditStore(tmp_path / "gaps", fsync=False)
    assert audits.read("BTC-USD").empty
    assert audits.upsert("BTC-USD", audit_frame([10, 20])) == 2
    assert audits.upsert("BTC-USD", audit_frame([10, 20])) == 0
    assert audits.upsert("BTC-USD", audit_frame([20], method="excluded")) == 1
    out = audits.read("BTC-USD")
    assert out["method"].tolist() == ["ffill", "excluded"] and out["filled"].tolist() == [True, False]
    with pytest.raises(InvalidInput) as err:
        audits.upsert("BTC-USD", audit_frame([1]).drop(columns=["filled"]))
    assert err.value.field == "filled"
    assert pickle.loads(pickle.dumps(audits)).read("BTC-USD").equals(out)


# ---- late ticks ------------------------------------------------------------------------------


def late_batch(ts_minutes: list[float], providers: list[str]) -> TickBatch:
    ts = (DAY0 + np.asarray(ts_minutes) * NS_PER_MIN).astype(np.int64)
    return TickBatch.from_columns("BTC-USD", providers, ts_event=ts, price=100.0 + np.arange(len(ts)),
                                  size=np.ones(len(ts)), seq=np.arange(len(ts)),
                                  status=np.full(len(ts), TickStatus.LATE))


def test_late_ticks_append_idempotent_and_read_back(tmp_path: Path) -> None:
    late = LateTickStore(tmp_path / "late", fsync=False)
    assert len(late.read("BTC-USD")) == 0
    batch = late_batch([5.0, 1.0, 1500.0], ["kraken", "coinbase", "kraken"])
    assert late.append(batch) == 3
    assert late.append(batch) == 0  # a replayed batch is not doubled
    assert late.append(late_batch([2.0], ["bybit"])) == 1
    out = late.read("BTC-USD")
    assert out.asset == "BTC-USD" and len(out) == 4
    assert out.ts_event.tolist() == sorted(out.ts_event.tolist())
    assert out.provider_names().tolist() == ["coinbase", "bybit", "kraken", "kraken"]
    assert (out.status == TickStatus.LATE).all()
    window = late.read("BTC-USD", start_ns=DAY0 + 2 * NS_PER_MIN, end_ns=DAY0 + NS_PER_DAY)
    assert window.provider_names().tolist() == ["bybit", "kraken"]
    with pytest.raises(InvalidInput):
        late.append("not a batch")  # type: ignore[arg-type]
    copy = pickle.loads(pickle.dumps(late))
    assert copy.append(late_batch([3.0], ["kraken"])) == 1 and len(late.read("BTC-USD")) == 5

