"""``make demo``: the system end to end on this machine, step by step.

Data plane (this module's first step, :func:`run_data_demo`): the market simulator feeds two
assets (four providers each, with injected anomalies) through Redis Streams into the per-asset
Ray actors for about a minute of wall time, simulated time running ~120x faster so that many
1-minute bars close. A line is printed for each consensus bar as it closes; then the stored
bars, the gap audit and the ingest report (with the detection scores of the injected anomalies).

:func:`demo_runtime` starts what the steps share -- an embedded Redis and a local Ray instance
on a fresh data dir -- and stops them at the end, so later steps (training, serving) run inside
the same ``with`` block.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import pandas as pd

from tickcast.config import Settings, load_settings

DEMO_MINUTES = 120.0  # simulated minutes
DEMO_WALL_S = 60.0  # wall time they take


@dataclass
class DataDemoResult:
    """What the data step produced (the next steps train and serve on it).

    Attributes
    ----------
    settings
        The demo's settings (fresh data dir, Redis URL).
    report
        The ingest report (``tickcast ingest`` JSON).
    bars
        Stored consensus bars per asset.
    gaps
        Gap audit per asset.
    """

    settings: Settings
    report: dict[str, Any]
    bars: dict[str, pd.DataFrame]
    gaps: dict[str, pd.DataFrame]


def _utc(ts_ns: int) -> str:
    return pd.Timestamp(int(ts_ns), unit="ns", tz="UTC").strftime("%Y-%m-%d %H:%M")


def bar_line(asset: str, bar: dict[str, Any]) -> str:
    """One live line for a closed consensus bar.

    >>> bar_line("BTC-USD", {"ts": 0, "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5,
    ...                      "ticks": 7, "providers": 3, "confidence": 1.25, "imputed": ""})
    'BTC-USD  1970-01-01 00:00  O 1.00  H 2.00  L 0.50  C 1.50  ticks 7  providers 3  conf 1.2bp'
    """
    imputed = f"  imputed:{bar['imputed']}" if bar.get("imputed") else ""
    return (f"{asset:<8} {_utc(bar['ts'])}  O {bar['open']:.2f}  H {bar['high']:.2f}  "
            f"L {bar['low']:.2f}  C {bar['close']:.2f}  ticks {int(bar['ticks'])}  "
            f"providers {int(bar['providers'])}  conf {bar['confidence']:.1f}bp{imputed}")


class LiveBars:
    """Prints each consensus bar once, as the actors close it (an ``on_poll`` ingest hook)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last_ts: dict[str, int] = {}
        self.printed = 0

    def poll(self, actors: dict[str, Any]) -> None:
        """Ask each actor for bars newer than the last one printed."""
        import ray

        calls = {a: h.recent_bars.remote(self.last_ts.get(a, -1)) for a, h in actors.items()}
        for asset, frame in zip(calls, ray.get(list(calls.values()))):
            for bar in frame.to_dict("records"):
                if int(bar["ts"]) > self.last_ts.get(asset, -1):
                    print(bar_line(asset, bar), file=self.out, flush=True)
                    self.last_ts[asset] = int(bar["ts"])
                    self.printed += 1


@contextlib.contextmanager
def demo_runtime(settings: Settings) -> Iterator[Settings]:
    """Embedded Redis and a local Ray for the whole demo; yields settings pointing at them."""
    from tickcast.ray_runtime import connect_ray, disconnect_ray
    from tickcast.redis_server import ensure_redis

    url, started = ensure_redis(settings.redis, settings.data_dir)
    settings = settings.with_overrides(**{"redis.url": url})
    conn = connect_ray(settings)
    try:
        yield settings
    finally:
        disconnect_ray(conn)
        if started is not None:
            started.stop()


def run_data_demo(settings: Settings, *, minutes: float = DEMO_MINUTES, wall_s: float = DEMO_WALL_S,
                  seed: int = 7, out: TextIO = sys.stdout) -> DataDemoResult:
    """Simulator -> Redis -> per-asset actors -> bars, printed live; then bars and gap audit.

    Parameters
    ----------
    settings
        Configuration (the first two configured assets are simulated).
    minutes, wall_s
        Simulated minutes and the wall time they should take (sets the replay speed).
    seed
        Simulator seed.
    out
        Where to print.
    """
    from tickcast.commands.data import write_bars_csv, write_gaps_csv
    from tickcast.ingest import IngestHooks, IngestPlan, report_line, run_ingest
    from tickcast.storage.bar_store import BarStore, GapAuditStore

    assets = tuple(settings.assets[:2])
    speed = minutes * 60.0 / wall_s
    print(f"== data plane: simulator -> Redis Streams -> actors {', '.join(f'asset:{a}' for a in assets)}"
          f" -> bars ({minutes:.0f} simulated minutes at {speed:.0f}x)", file=out, flush=True)
    live = LiveBars(out)
    t0 = time.monotonic()
    report = run_ingest(settings, IngestPlan("sim", assets, speed=speed, minutes=minutes, seed=seed),
                        hooks=IngestHooks(on_poll=live.poll, poll_s=0.5))
    root = Path(settings.data_dir)
    store, audit_store = BarStore(root / "bars"), GapAuditStore(root / "gaps")
    bars = {a: store.read(a) for a in assets}
    gaps = {a: audit_store.read(a) for a in assets}
    for asset in assets:  # bars that closed after the last poll (the final flush)
        for bar in bars[asset].to_dict("records"):
            if int(bar["ts"]) > live.last_ts.get(asset, -1) and bar["imputed"] == "":
                print(bar_line(asset, bar), file=out)

    print(f"\n== stored bars ({root / 'bars'})", file=out)
    for asset in assets:
        frame = bars[asset]
        imputed = int((frame["imputed"] != "").sum())
        span = f"{_utc(frame['ts'].iloc[0])} .. {_utc(frame['ts'].iloc[-1])}" if len(frame) else "none"
        print(f"{asset}: {len(frame)} bars ({imputed} imputed), {span}; last five:", file=out)
        write_bars_csv(frame.tail(5), out)
    print("\n== gap audit", file=out)
    for asset in assets:
        print(f"{asset}: {len(gaps[asset])} gap(s)", file=out)
        write_gaps_csv(gaps[asset], out)
    print(f"\n== ingest: {report_line(report)} in {time.monotonic() - t0:.0f}s", file=out)
    detected = report.get("detected", {})
    scores = ", ".join(f"{k} {detected.get(k, 0)}/{n}" for k, n in report.get("injected", {}).items() if n)
    print(f"   anomalies detected/injected: {scores}; clean ticks rejected: "
          f"{100 * report.get('clean_rejected_fraction', 0.0):.3f}%", file=out, flush=True)
    return DataDemoResult(settings=settings, report=report, bars=bars, gaps=gaps)


def fresh_settings(base_dir: str | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings on a new ``<data_dir>/demo-<UTC time>`` directory (a clean run every time)."""
    settings = load_settings(overrides=overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    data_dir = Path(base_dir or settings.data_dir) / f"demo-{stamp}"
    data_dir.mkdir(parents=True, exist_ok=True)
    return settings.with_overrides(data_dir=str(data_dir.resolve()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo`` / ``python -m tickcast.demo``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="base directory (a fresh demo-<time> folder is made in it)")
    ap.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="simulated minutes")
    ap.add_argument("--wall-s", type=float, default=DEMO_WALL_S, help="wall time of the data step")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    settings = fresh_settings(args.data_dir, args.set)
    print(f"tickcast demo -- data dir {settings.data_dir}", flush=True)
    with demo_runtime(settings) as live:
        run_data_demo(live, minutes=args.minutes, wall_s=args.wall_s, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
