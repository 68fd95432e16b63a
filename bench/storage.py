"""The bar store under this project's workload, beside SQLite on the same workload.

``python -m bench.storage [--path FILE] [--dir DIR] [--live-minutes N] [--late N] [--writers W]
[--writer-minutes N]``

The bars are real: the shared file's BTC/USD from three venues, run through
:class:`~tickcast.market.pipeline.AssetPipeline` (as ``tickcast ingest`` does), which gives
one asset's consensus bars and its three providers' bars for 9 days (4 sources, ~51,000 bars).
Every measurement is durable, as the actors write: :class:`BarStore` with ``fsync=True`` (file
and directory flushed, then an atomic rename), SQLite (Python's ``sqlite3``) in WAL mode with
``synchronous=FULL`` (every commit flushed), one table keyed ``(asset, source, ts)``
``WITHOUT ROWID``, rows upserted with ``INSERT OR REPLACE``.

* ``live``: the actor's steady state, one asset for ``--live-minutes`` minutes of a day: each
  minute upserts its consensus bar and its three provider bars (one step; BarStore: four
  upserts; SQLite: one transaction of four rows). Steps per second, latency p50 / p99 / max.
  BarStore rewrites the day file at each upsert, so its cost grows through the day; the
  latencies of the day's last hour are reported apart. ``live_no_fsync``: the same loop with
  ``fsync=False`` (atomic, not durable), which tells the flushes from the rewriting.
* ``backfill``: the 9 days written in chunks of 60 bars per source (a replay's batches).
* ``scan_9_days``: read one asset's 9 days of consensus bars into a DataFrame (what training
  does), median of 15 reads.
* ``late``: ``--late`` single late bars upserted into random past minutes of the 9 days, half
  amending a stored bar and half filling a minute that had none. Latency per upsert.
* ``writers``: ``--writers`` processes, each the live loop (``--writer-minutes``) of its own
  asset, at once: total
  steps per second (BarStore: a directory per asset; SQLite: one database file, its writers
  serialized by its lock; a busy writer waits up to 30 s).
* ``size``: bytes on disk after the backfill.

Prints one JSON line, with the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.shared_data import machine, shared_file
from tickcast.config import load_settings
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.replay import iter_replay_batches, read_bar_file
from tickcast.storage.bar_store import BAR_COLUMNS, CONSENSUS, NS_PER_DAY, BarStore
from tickcast.ticks import NS_PER_MIN

ASSET = "BTC-USD"
COLUMNS: tuple[str, ...] = tuple(BAR_COLUMNS)


# ---------------------------------------------------------------------------------- the bars
def real_bars(path: Path) -> dict[str, pd.DataFrame]:
    """Source -> bar frame: the consensus and the three venues of the shared BTC/USD."""
    settings = load_settings(env={}).with_overrides(assets=[ASSET])
    pipe = AssetPipeline(ASSET, settings)
    replay = read_bar_file(path, (ASSET,))
    cons, prov = [], []
    for batch in iter_replay_batches(replay, ASSET, settings.ingest.batch_max_ticks):
        res = pipe.process(batch)
        cons.append(res.consensus_bars)
        prov.append(res.provider_bars)
    res = pipe.flush()
    cons.append(res.consensus_bars)
    prov.append(res.provider_bars)
    out = {CONSENSUS: pd.concat(cons).drop_duplicates("ts", keep="last").sort_values("ts")}
    p = pd.concat(prov)
    for name in sorted(p["provider"].unique()):
        out[str(name)] = (p.loc[p["provider"] == name].drop_duplicates("ts", keep="last")
                          .sort_values("ts").drop(columns="provider"))
    return {k: v.reset_index(drop=True)[list(COLUMNS)] for k, v in out.items()}


def _stats_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.quantile(a, 0.99)), 3),
            "max_ms": round(float(a.max()), 3), "n": len(a)}


def _minutes_of_day(bars: dict[str, pd.DataFrame], minutes: int) -> list[dict[str, pd.DataFrame]]:
    """The first ``minutes`` minutes of the first full day, as steps: source -> that minute's bar."""
    day0 = int(bars[CONSENSUS]["ts"].min()) // NS_PER_DAY * NS_PER_DAY
    steps = []
    for k in range(minutes):
        t = day0 + k * NS_PER_MIN
        step = {s: f.loc[f["ts"] == t] for s, f in bars.items()}
        steps.append({s: f for s, f in step.items() if len(f)})
    return steps


# --------------------------------------------------------------------------------- SQLite
class SqliteBars:
    """The same bars in one SQLite table, durable commits (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS bars (asset TEXT NOT NULL, source TEXT NOT NULL, "
            "ts INTEGER NOT NULL, open REAL, high REAL, low REAL, close REAL, volume REAL, "
            "vwap REAL, ticks INTEGER, providers INTEGER, confidence REAL, imputed TEXT, "
            "PRIMARY KEY (asset, source, ts)) WITHOUT ROWID")
        self._sql = (f"INSERT OR REPLACE INTO bars (asset, source, {', '.join(COLUMNS)}) "
                     f"VALUES (?, ?, {', '.join('?' * len(COLUMNS))})")

    @staticmethod
    def _rows(asset: str, source: str, frame: pd.DataFrame) -> list[tuple[Any, ...]]:
        cols = [frame[c].to_numpy() for c in COLUMNS]
        return [(asset, source, *(v.item() if hasattr(v, "item") else v for v in row)) for row in zip(*cols)]

    def upsert_many(self, asset: str, parts: dict[str, pd.DataFrame]) -> None:
        """One transaction: every source's rows."""
        self.con.execute("BEGIN IMMEDIATE")
        for source, frame in parts.items():
            self.con.executemany(self._sql, self._rows(asset, source, frame))
        self.con.execute("COMMIT")

    def read(self, asset: str, source: str) -> pd.DataFrame:
        cur = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM bars WHERE asset = ? AND source = ? "
                               "ORDER BY ts", (asset, source))
        rows = cur.fetchall()
        frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
        return frame.astype({c: BAR_COLUMNS[c] for c in COLUMNS if c != "imputed"})

    def close(self) -> None:
        self.con.close()


# ------------------------------------------------------------------------------ measurements
def measure_live(steps: list[dict[str, pd.DataFrame]], write: Callable[[dict[str, pd.DataFrame]], None]) -> dict[str, Any]:
    lat = []
    t0 = time.perf_counter()
    for step in steps:
        s = time.perf_counter()
        write(step)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    out = {"steps": len(steps), "steps_per_s": round(len(steps) / total, 1),
           "bars_per_s": round(sum(sum(len(f) for f in st.values()) for st in steps) / total, 1),
           **_stats_ms(lat)}
    if len(lat) >= 120:
        out["last_hour"] = _stats_ms(lat[-60:])
    return out


def measure_backfill(bars: dict[str, pd.DataFrame], write: Callable[[dict[str, pd.DataFrame]], None],
                     chunk: int = 60) -> dict[str, Any]:
    n = max(len(f) for f in bars.values())
    cons_ts = bars[CONSENSUS]["ts"].to_numpy()
    edges = cons_ts[::chunk].tolist() + [int(cons_ts[-1]) + 1]
    t0 = time.perf_counter()
    rows = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = {s: f.loc[(f["ts"] >= lo) & (f["ts"] < hi)] for s, f in bars.items()}
        rows += sum(len(p) for p in part.values())
        write(part)
    total = time.perf_counter() - t0
    return {"bars": rows, "seconds": round(total, 3), "bars_per_s": round(rows / total, 1),
            "chunk_bars_per_source": chunk, "max_bars_per_source": n}


def measure_scan(read: Callable[[], pd.DataFrame], repeats: int = 15) -> dict[str, Any]:
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame = read()
        times.append(time.perf_counter() - t0)
        rows = len(frame)
    return {"rows": rows, "median_ms": round(float(np.median(times)) * 1e3, 2),
            "min_ms": round(float(np.min(times)) * 1e3, 2), "repeats": repeats}


def late_bars(bars: dict[str, pd.DataFrame], n: int, seed: int) -> list[pd.DataFrame]:
    """``n`` single consensus bars: half amend a stored minute, half fill a minute without one."""
    rng = np.random.default_rng(seed)
    cons = bars[CONSENSUS]
    ts = cons["ts"].to_numpy()
    grid = np.arange(ts[0], ts[-1] + 1, NS_PER_MIN)
    holes = np.setdiff1d(grid, ts)
    out = []
    for k in range(n):
        if k % 2 == 0 or not len(holes):
            row = cons.iloc[[int(rng.integers(len(cons)))]].copy()
            row["close"] = row["close"] * (1 + 1e-5)  # an amendment changes the bar
        else:
            row = cons.iloc[[int(np.searchsorted(ts, holes[int(rng.integers(len(holes)))]) - 1)]].copy()
            row["ts"] = holes[int(rng.integers(len(holes)))]
        out.append(row.reset_index(drop=True))
    return out


def _writer_proc(kind: str, root: str, asset: str, steps: list[dict[str, pd.DataFrame]],
                 start: Any, out: Any) -> None:
    if kind == "barstore":
        store = BarStore(Path(root), fsync=True)

        def write(step: dict[str, pd.DataFrame]) -> None:
            for source, frame in step.items():
                store.upsert(asset, source, frame)
    else:
        db = SqliteBars(Path(root) / "bars.sqlite")

        def write(step: dict[str, pd.DataFrame]) -> None:
            db.upsert_many(asset, step)
    start.wait()
    t0 = time.perf_counter()
    for step in steps:
        write(step)
    out.put(time.perf_counter() - t0)


def measure_writers(kind: str, root: Path, steps: list[dict[str, pd.DataFrame]], writers: int) -> dict[str, Any]:
    """``writers`` processes, one asset each, all writing their live loop at once."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    if kind == "sqlite":
        SqliteBars(root / "bars.sqlite").close()  # create the schema once
    procs = [ctx.Process(target=_writer_proc, args=(kind, str(root), f"A{i}-USD", steps, start, out))
             for i in range(writers)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    start.set()
    secs = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return {"writers": writers, "steps_each": len(steps), "total_steps_per_s": round(writers * len(steps) / wall, 1),
            "slowest_writer_s": round(max(secs), 2)}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(path: Path, workdir: Path, live_minutes: int, n_late: int, writers: int,
        writer_minutes: int) -> dict[str, Any]:
    """Every measurement, for both stores."""
    bars = real_bars(path)
    steps = _minutes_of_day(bars, live_minutes)
    writer_steps = steps[:writer_minutes]
    late = late_bars(bars, n_late, seed=5)
    out: dict[str, Any] = {"bars": {s: len(f) for s, f in bars.items()},
                           "days": int(np.ptp(bars[CONSENSUS]["ts"].to_numpy()) // NS_PER_DAY) + 1}

    # BarStore --------------------------------------------------------------------------
    root = workdir / "barstore"
    store = BarStore(root / "live", fsync=True)

    def bs_step(step: dict[str, pd.DataFrame], st: BarStore = store) -> None:
        for source, frame in step.items():
            st.upsert(ASSET, source, frame)

    res: dict[str, Any] = {"live": measure_live(steps, bs_step)}
    loose = BarStore(root / "loose", fsync=False)
    res["live_no_fsync"] = measure_live(steps, lambda step: bs_step(step, loose))
    bulk = BarStore(root / "bulk", fsync=True)
    res["backfill"] = measure_backfill(bars, lambda part: bs_step(part, bulk))
    res["size_bytes"] = _size(root / "bulk")
    res["scan_9_days"] = measure_scan(lambda: BarStore(root / "bulk").read(ASSET))
    lat = []
    for row in late:
        t0 = time.perf_counter()
        bulk.upsert(ASSET, CONSENSUS, row)
        lat.append(time.perf_counter() - t0)
    res["late"] = {**_stats_ms(lat), "per_s": round(len(lat) / sum(lat), 1)}
    check = bulk.read(ASSET).set_index("ts")
    res["late"]["verified"] = bool(all(check.loc[int(r["ts"].iloc[0]), "close"] == r["close"].iloc[0] for r in late[-20:]))
    if writers > 1:
        res["writers"] = measure_writers("barstore", root / "writers", writer_steps, writers)
    out["barstore"] = res

    # SQLite ----------------------------------------------------------------------------
    sroot = workdir / "sqlite"
    sroot.mkdir(parents=True, exist_ok=True)
    live_db = SqliteBars(sroot / "live.sqlite")
    res = {"live": measure_live(steps, lambda step: live_db.upsert_many(ASSET, step))}
    live_db.close()
    db = SqliteBars(sroot / "bulk.sqlite")
    res["backfill"] = measure_backfill(bars, lambda part: db.upsert_many(ASSET, part))
    db.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    res["size_bytes"] = _size(sroot / "bulk.sqlite")
    res["scan_9_days"] = measure_scan(lambda: db.read(ASSET, CONSENSUS))
    lat = []
    for row in late:
        t0 = time.perf_counter()
        db.upsert_many(ASSET, {CONSENSUS: row})
        lat.append(time.perf_counter() - t0)
    res["late"] = {**_stats_ms(lat), "per_s": round(len(lat) / sum(lat), 1)}
    check = db.read(ASSET, CONSENSUS).set_index("ts")
    res["late"]["verified"] = bool(all(check.loc[int(r["ts"].iloc[0]), "close"] == r["close"].iloc[0] for r in late[-20:]))
    db.close()
    if writers > 1:
        wroot = sroot / "writers"
        wroot.mkdir()
        res["writers"] = measure_writers("sqlite", wroot, writer_steps, writers)
    res["settings"] = {"journal_mode": "wal", "synchronous": "full", "sqlite": sqlite3.sqlite_version}
    out["sqlite"] = res
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=shared_file(), help="the shared bar file")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--live-minutes", type=int, default=1440, help="minutes of the live loop")
    ap.add_argument("--late", type=int, default=400, help="late bars upserted")
    ap.add_argument("--writers", type=int, default=4, help="concurrent writer processes (1: skip)")
    ap.add_argument("--writer-minutes", type=int, default=240, help="minutes each writer writes")
    args = ap.parse_args(argv)
    if not args.path.is_file():
        print(f"error: bar file not found: {args.path}", file=sys.stderr)
        return 2
    if min(args.live_minutes, args.late, args.writers, args.writer_minutes) < 1:
        print("error: --live-minutes, --late, --writers and --writer-minutes must be >= 1", file=sys.stderr)
        return 2
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tickcast-bench-storage-", dir=base))
    try:
        out = run(args.path, workdir, args.live_minutes, args.late, args.writers, args.writer_minutes)
        import pyarrow

        out["machine"] = machine(pyarrow=pyarrow.__version__, sqlite=sqlite3.sqlite_version,
                                 filesystem_dir=str(base), load_avg_1m_start=load_start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
