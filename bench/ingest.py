"""Ingest throughput: the per-asset core alone, and end to end through Redis and the actors.

``python -m bench.ingest`` prints, as its last line, one JSON object with

* ``core_ticks_per_s``: :func:`bench.core.measure_core` -- ``AssetPipeline.process`` on
  batches of generated multi-provider ticks, one core, no I/O;
* ``e2e_ticks_per_s``: the median of ``--runs`` (3) runs, each in a fresh data dir with its
  own Redis and Ray, replaying at maximum speed for two assets (``BTC-USD`` from three venues,
  ``BTC-USDT`` from three venues): ticks expanded from the bars -> one Redis Stream entry per
  batch (pipelined XADDs through the breaker/WAL guard) -> the two per-asset Ray actors
  (decode, validate, dedup, consensus, bars, features, gap policy) -> consensus and provider
  bars upserted to the Parquet bar store, checkpoints written and the streams trimmed. The
  clock runs from the first XADD until both actors have consumed their last entry and flushed;
  Ray start-up, actor creation and reading the file are excluded. While an actor is behind its
  stream it defers online-feature updates (bars first); the time they take to catch up
  afterwards is reported apart (``e2e_settle_s``) together with
  ``e2e_with_features_ticks_per_s``. Every run's figures are listed in ``e2e_runs``.

  The shared file holds nine days (274,000 ticks of these two assets, about 0.4 s of work), too
  little to time a pipeline of actors, Redis and disk: a run would measure its start and end.
  So the replayed file is the shared file's two symbols laid end to end ``--copies`` times
  (default 30: 270 days, 8.2 million ticks), each copy moved nine days later than the one
  before and its prices scaled so that it opens where the previous copy closed (the same
  factor for every venue of a symbol, so the venues keep their real disagreement). Real
  minutes, real venue structure, one continuous series; a run covers at least 10 s of work on
  this machine, and ``e2e_min_seconds`` says how long the shortest run was;
* ``machine``: platform, CPU count, Python and library versions.

Options: ``--path FILE`` (default: the shared file), ``--copies N``, ``--runs N``,
``--core-ticks N``, ``--skip-core``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_FILE = ROOT.parent / "shared" / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"
E2E_ASSETS: tuple[str, ...] = ("BTC-USD", "BTC-USDT")


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import pandas as pd
    import pyarrow as pa
    import ray
    import redis

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "ray": ray.__version__,
        "redis_py": redis.__version__,
    }


E2E_SYMBOLS: tuple[str, ...] = ("BTC/USD", "BTC/USDT")
REFERENCE_VENUE = "binanceus"  # writes a bar every minute: its first open and last close are the span's


def extended_file(src: Path, copies: int, out_dir: Path,
                  symbols: tuple[str, ...] = E2E_SYMBOLS) -> tuple[Path, dict[str, Any]]:
    """``src``'s rows of ``symbols`` laid end to end ``copies`` times, as a new bar file.

    Copy ``k`` is moved ``k`` spans later (the span: whole days from the first bar's day to
    the day after the last bar's) and its prices (open, high, low, close) are multiplied, per
    symbol, by ``(last close / first open) ** k`` of the reference venue, so that each copy
    opens where the previous one closed. Volumes and trade counts are unchanged.

    Returns
    -------
    (path, info)
        The written CSV and what it holds (rows, copies, days, price factors).
    """
    import pandas as pd

    df = pd.read_csv(src)
    df = df[df["symbol"].isin(symbols)].reset_index(drop=True)
    ts = pd.to_datetime(df["timestamp_utc"], utc=True)
    day = pd.Timedelta(days=1)
    span = (ts.max().floor("D") + day) - ts.min().floor("D")
    factors: dict[str, float] = {}
    for sym in symbols:
        ref = df[(df["symbol"] == sym) & (df["venue"] == REFERENCE_VENUE)]
        order = ts[ref.index].argsort().to_numpy()
        factors[sym] = float(ref["close"].to_numpy()[order][-1] / ref["open"].to_numpy()[order][0])
    prices = ["open", "high", "low", "close"]
    parts = []
    for k in range(copies):
        part = df.copy()
        shifted = (ts + k * span).dt.tz_localize(None).to_numpy(dtype="datetime64[s]")
        part["timestamp_utc"] = np.char.add(np.datetime_as_string(shifted, unit="s"), "Z")
        scale = part["symbol"].map({s: f ** k for s, f in factors.items()}).to_numpy()
        part[prices] = part[prices].to_numpy() * scale[:, None]
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    path = out_dir / f"extended_{copies}x.csv"
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # pyarrow's writer: pandas' took minutes for two million rows. No field holds a comma.
    pacsv.write_csv(pa.Table.from_pandas(out, preserve_index=False), path,
                    pacsv.WriteOptions(quoting_style="none"))
    return path, {"rows": len(out), "copies": copies, "days": copies * span.days,
                  "symbols": list(symbols), "price_factor_per_copy": factors}


def measure_e2e(path: Path, assets: tuple[str, ...] = E2E_ASSETS,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """Replay ``path`` for ``assets`` at maximum speed through Redis and the actors.

    Runs in a fresh data dir with its own embedded Redis and a private local Ray instance.
    Checks that the bars the report counts are in the bar store before returning.

    Returns
    -------
    dict
        ``e2e_ticks_per_s``, ticks, entries, seconds, bars stored, and the ingest report.
    """
    from tickcast.config import load_settings
    from tickcast.ingest import IngestPlan, run_ingest
    from tickcast.storage.bar_store import BarStore

    with tempfile.TemporaryDirectory(prefix="tickcast-bench-") as tmp:
        settings = load_settings(overrides=[
            f"data_dir={tmp}", f"assets=[{','.join(assets)}]", "ingest.ray_address=local",
            "redis.url=null", *(overrides or []),
        ])
        report = run_ingest(settings, IngestPlan("replay", assets, path=path, speed=None),
                            progress=sys.stderr)
        store = BarStore(Path(tmp) / "bars")
        stored = {a: len(store.read(a)) for a in assets}
    if sum(stored.values()) < report["bars"]:
        raise RuntimeError(f"report counts {report['bars']} bars but the store holds {stored}")
    ticks = sum(int(c["ticks_in"]) for c in report["per_asset"].values())
    return {
        "e2e_ticks_per_s": report["ticks_per_s"],
        "e2e_ticks": ticks,
        "e2e_seconds": report["elapsed_s"],
        # The same run until the online features had caught up too (they trail the bars
        # while an actor is behind its stream, see AssetActor).
        "e2e_with_features_ticks_per_s": round(
            ticks / (report["elapsed_s"] + report["settle_s"]), 1),
        "e2e_settle_s": report["settle_s"],
        "e2e_assets": list(assets),
        "e2e_bars_stored": stored,
        "e2e_batch_max_ticks": settings.ingest.batch_max_ticks,
        "e2e_report": {k: report[k] for k in ("ticks_in", "ticks_accepted", "rejected",
                                               "duplicates", "outliers", "late", "bars", "gaps", "imputed")},
    }


def median_of_runs(path: Path, runs: int, overrides: list[str] | None = None) -> dict[str, Any]:
    """:func:`measure_e2e` ``runs`` times; the median run's figures, and every run's."""
    results = []
    for i in range(runs):
        r = measure_e2e(path, overrides=overrides)
        print(f"[bench.ingest] e2e run {i + 1}/{runs}: {r['e2e_ticks_per_s']:,.0f} ticks/s over "
              f"{r['e2e_seconds']:.1f} s ({r['e2e_ticks']:,} ticks)", file=sys.stderr, flush=True)
        results.append(r)
    order = sorted(range(runs), key=lambda i: results[i]["e2e_ticks_per_s"])
    median = dict(results[order[runs // 2]])
    if runs % 2 == 0:  # an even count: the mean of the two middle runs' rates
        lo, hi = results[order[runs // 2 - 1]], results[order[runs // 2]]
        for k in ("e2e_ticks_per_s", "e2e_with_features_ticks_per_s"):
            median[k] = round((lo[k] + hi[k]) / 2, 1)
    median["e2e_runs"] = [{k: r[k] for k in ("e2e_ticks_per_s", "e2e_with_features_ticks_per_s",
                                             "e2e_seconds", "e2e_settle_s")} for r in results]
    median["e2e_min_seconds"] = min(r["e2e_seconds"] for r in results)
    median["e2e_statistic"] = f"median of {runs} runs"
    return median


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=SHARED_FILE, help="bar file to replay")
    ap.add_argument("--copies", type=int, default=30,
                    help="the file's two symbols laid end to end this many times (1: as it is)")
    ap.add_argument("--runs", type=int, default=3, help="end-to-end runs (the median is reported)")
    ap.add_argument("--core-ticks", type=int, default=2_000_000)
    ap.add_argument("--skip-core", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for the end-to-end run (repeatable)")
    args = ap.parse_args(argv)
    if not args.path.is_file():
        print(f"error: bar file not found: {args.path}", file=sys.stderr)
        return 2
    if args.copies < 1 or args.runs < 1:
        print("error: --copies and --runs must be >= 1", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    if not args.skip_core:
        from bench.core import measure_core

        core = measure_core(n_ticks=args.core_ticks)
        out["core_ticks_per_s"] = core["core_ticks_per_s"]
        out["core_p50_batch_ticks_per_s"] = core["p50_batch_ticks_per_s"]
    with tempfile.TemporaryDirectory(prefix="tickcast-bench-file-") as tmp:
        path, info = (args.path, {"copies": 1}) if args.copies == 1 else \
            extended_file(args.path, args.copies, Path(tmp))
        out.update(median_of_runs(path, args.runs, overrides=args.set))
    out["e2e_file"] = info
    out["machine"] = machine()
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
