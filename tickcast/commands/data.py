"""Data-plane commands: ``tickcast ingest``, ``tickcast bars``, ``tickcast gaps``.

``ingest`` prints progress on stderr and one JSON object as the last line of stdout; ``bars`` and
``gaps`` print CSV with a fixed header (the contracts of the data plane). User mistakes (an
unknown asset, a missing file, a bad ``--speed``) raise :class:`~tickcast.errors.TickcastError`,
which the CLI turns into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.config import Settings
from tickcast.errors import InvalidInput, NotFound, UnknownAsset

BARS_HEADER: tuple[str, ...] = (
    "timestamp_utc", "open", "high", "low", "close", "volume", "vwap", "ticks", "providers",
    "confidence", "imputed",
)
GAPS_HEADER: tuple[str, ...] = ("start_utc", "end_utc", "missing_minutes", "method", "filled")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ingest``, ``bars`` and ``gaps`` to the ``tickcast`` command."""
    p = subparsers.add_parser(
        "ingest", help="feed ticks (file replay or simulator) through the per-asset actors",
        description="Feed ticks through Redis Streams and the per-asset Ray actors into the "
                    "bar store. Last stdout line: JSON counters.")
    add_common(p)
    p.add_argument("--source", choices=("replay", "sim"), required=True,
                   help="replay: a 1-minute multi-venue bar file; sim: the market simulator")
    p.add_argument("--path", help="bar file to replay (CSV or CSV.gz)")
    p.add_argument("--assets", help="comma-separated assets, e.g. BTC-USD,ETH-USD "
                                    "(default: the configured assets)")
    p.add_argument("--speed", default="max",
                   help="'max' (as fast as possible) or a multiple of event time, e.g. 600")
    p.add_argument("--minutes", type=float, default=60.0, help="simulated minutes (sim)")
    p.add_argument("--seed", type=int, default=7, help="simulator seed (sim)")
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser("bars", help="print stored 1-minute bars as CSV")
    add_common(p)
    p.add_argument("--asset", required=True)
    p.add_argument("--provider", help="a provider's own bars instead of the consensus")
    p.set_defaults(func=cmd_bars)

    p = subparsers.add_parser("gaps", help="print the gap audit of an asset as CSV")
    add_common(p)
    p.add_argument("--asset", required=True)
    p.set_defaults(func=cmd_gaps)


# -- argument checks ------------------------------------------------------------------------------

def parse_speed(text: str) -> float | None:
    """``"max"`` -> None (no pacing); a positive number -> event-time multiple.

    >>> parse_speed("max"), parse_speed("60")
    (None, 60.0)
    """
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"--speed must be 'max' or a positive number, got {text!r}",
                           field="speed") from None
    if not np.isfinite(value) or value <= 0:
        raise InvalidInput(f"--speed must be 'max' or a positive number, got {text!r}",
                           field="speed")
    return value


def parse_assets(text: str | None, settings: Settings) -> tuple[str, ...]:
    """Comma-separated assets, each one configured (``assets`` in the config).

    Raises
    ------
    UnknownAsset
        An asset is not configured (named, with the configured ones).
    """
    if text is None:
        return settings.assets
    assets = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    if not assets:
        raise InvalidInput("--assets names no asset", field="assets")
    for asset in assets:
        if asset not in settings.assets:
            raise UnknownAsset(
                f"unknown asset {asset!r}; configured assets: {', '.join(settings.assets)} "
                f"(add more with --set 'assets=[...]')", field="assets")
    return assets


def _known_asset(asset: str, settings: Settings, stored: tuple[str, ...]) -> None:
    if asset not in settings.assets and asset not in stored:
        raise UnknownAsset(f"unknown asset {asset!r}; configured: {', '.join(settings.assets)}; "
                           f"stored: {', '.join(stored) or 'none'}", field="asset")


# -- commands -------------------------------------------------------------------------------------

def cmd_ingest(args: argparse.Namespace) -> int:
    """``tickcast ingest``: run the ingest driver and print its JSON report last."""
    from tickcast.ingest import IngestPlan, run_ingest

    settings = settings_from_args(args)
    assets = parse_assets(args.assets, settings)
    speed = parse_speed(args.speed)
    if args.source == "replay":
        if not args.path:
            raise InvalidInput("--source replay needs --path FILE", field="path")
        path = Path(args.path)
        if not path.is_file():
            raise NotFound(f"bar file not found: {path}", field="path")
        plan = IngestPlan(source="replay", assets=assets, path=path, speed=speed)
    else:
        if not np.isfinite(args.minutes) or args.minutes <= 0:
            raise InvalidInput(f"--minutes must be positive, got {args.minutes}", field="minutes")
        plan = IngestPlan(source="sim", assets=assets, speed=speed, minutes=args.minutes,
                          seed=args.seed)
    report = run_ingest(settings, plan, progress=sys.stderr)
    print_json_line(report)
    return 0


def _utc(ts_ns: np.ndarray) -> list[str]:
    return pd.to_datetime(np.asarray(ts_ns, dtype=np.int64), unit="ns", utc=True) \
        .strftime("%Y-%m-%dT%H:%M:%SZ").tolist()


def write_bars_csv(bars: pd.DataFrame, out: TextIO) -> None:
    """Bars in the ``tickcast bars`` CSV format (header :data:`BARS_HEADER`)."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(BARS_HEADER)
    if bars.empty:
        return
    times = _utc(bars["ts"].to_numpy())
    cols = [bars[c].to_numpy() for c in ("open", "high", "low", "close", "volume", "vwap")]
    ticks = bars["ticks"].to_numpy(dtype=np.int64)
    providers = bars["providers"].to_numpy(dtype=np.int64)
    conf = bars["confidence"].to_numpy(dtype=np.float64)
    imputed = bars["imputed"].fillna("").astype(str).to_numpy()
    for i, t in enumerate(times):
        w.writerow([t, *(repr(float(c[i])) for c in cols), int(ticks[i]), int(providers[i]),
                    repr(float(conf[i])), imputed[i]])


def write_gaps_csv(audit: pd.DataFrame, out: TextIO) -> None:
    """A gap audit in the ``tickcast gaps`` CSV format (header :data:`GAPS_HEADER`)."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(GAPS_HEADER)
    if audit.empty:
        return
    starts, ends = _utc(audit["start"].to_numpy()), _utc(audit["end"].to_numpy())
    for i in range(len(audit)):
        row = audit.iloc[i]
        w.writerow([starts[i], ends[i], int(row["missing_minutes"]), str(row["method"]),
                    "true" if bool(row["filled"]) else "false"])


def cmd_bars(args: argparse.Namespace) -> int:
    """``tickcast bars``: consensus (or one provider's) bars of an asset as CSV."""
    from tickcast.storage.bar_store import BarStore

    settings = settings_from_args(args)
    store = BarStore(Path(settings.data_dir) / "bars")
    _known_asset(args.asset, settings, tuple(store.assets()))
    source = args.provider or "consensus"
    if args.provider is not None:
        sources = tuple(store.sources(args.asset))
        if args.provider not in sources:
            providers = [s for s in sources if s != "consensus"]
            raise NotFound(f"no bars of provider {args.provider!r} for {args.asset}; stored "
                           f"providers: {', '.join(providers) or 'none'}", field="provider")
    _emit(write_bars_csv, store.read(args.asset, source))
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    """``tickcast gaps``: the gap audit of an asset as CSV."""
    from tickcast.storage.bar_store import BarStore, GapAuditStore

    settings = settings_from_args(args)
    root = Path(settings.data_dir)
    _known_asset(args.asset, settings, tuple(BarStore(root / "bars").assets()))
    _emit(write_gaps_csv, GapAuditStore(root / "gaps").read(args.asset))
    return 0


def _emit(writer: Any, frame: pd.DataFrame) -> None:
    try:
        writer(frame, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `tickcast bars ... | head`: the reader left, not an error
        sys.stderr.close()
