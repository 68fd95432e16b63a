"""Ingest throughput: the per-asset core alone, and end to end through Redis and the actors.

``python -m bench.ingest`` prints, as its last line, one JSON object with

* ``core_ticks_per_s``: :func:`bench.core.measure_core` -- ``AssetPipeline.process`` on
  batches of generated multi-provider ticks, one core, no I/O;
* ``e2e_ticks_per_s``: the shared multi-venue file replayed at maximum speed for two assets
  (``BTC-USD`` from three venues, ``BTC-USDT`` from three venues): ticks expanded from the
  bars -> one Redis Stream entry per batch (pipelined XADDs through the breaker/WAL guard) ->
  the two per-asset Ray actors (decode, validate, dedup, consensus, bars, features, gap policy)
  -> consensus and provider bars upserted to the Parquet bar store, checkpoints written and the
  streams trimmed. The clock runs from the first XADD until both actors have consumed their
  last entry and flushed; Ray start-up, actor creation and reading the file are excluded.
  While an actor is behind its stream it defers online-feature updates (bars first); the time
  they take to catch up afterwards is reported apart (``e2e_settle_s``) together with
  ``e2e_with_features_ticks_per_s``;
* ``machine``: platform, CPU count, Python and library versions.

Options: ``--path FILE`` (default: the shared file), ``--core-ticks N``, ``--skip-core``.
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


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=SHARED_FILE, help="bar file to replay")
    ap.add_argument("--core-ticks", type=int, default=2_000_000)
    ap.add_argument("--skip-core", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for the end-to-end run (repeatable)")
    args = ap.parse_args(argv)
    if not args.path.is_file():
        print(f"error: bar file not found: {args.path}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    if not args.skip_core:
        from bench.core import measure_core

        core = measure_core(n_ticks=args.core_ticks)
        out["core_ticks_per_s"] = core["core_ticks_per_s"]
        out["core_p50_batch_ticks_per_s"] = core["p50_batch_ticks_per_s"]
    out.update(measure_e2e(args.path, overrides=args.set))
    out["machine"] = machine()
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
