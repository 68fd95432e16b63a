"""Benchmark of trading calendars: table builds, per-bar queries, and what they add to ingestion.

Run: ``python -m bench.calendar [--assets 1000] [--bars 60]``.

* ``build_year_s``: building one UTC year of sessions, from nothing, for a library calendar
  (``CMEGlobex_FX``, pandas_market_calendars) and for weekly sessions (Chicago, overnight);
* ``per_bar_us``: the calendar queries ``AssetState`` makes for one asset and one bar (is the
  bar's slot expected; session time since the newest bar for the gap gauge), with ``--assets``
  assets sharing one calendar over ``--bars`` minute bars each, and the number of year tables
  that cost built (tables are shared: it must not grow with the assets);
* ``step_us``: ``AssetState.step`` over the same simulated ticks (two session days of one
  asset, two providers, one batch per minute) on a session calendar and on 24/7, best of
  ``--rounds`` alternating runs: what an asset that closes costs the ingest per step, end to
  end (no store writes).

The last line is one JSON object with the machine. Timings are wall-clock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from actors.asset_state import AssetState
from tickcast.config import WeeklySessions, load_settings
from tickcast.market.calendar import ExchangeCalendar, WeeklyCalendar, calendar_for
from tickcast.sources.simulator import MarketSimulator
from tickcast.ticks import NS_PER_MIN, TickBatch

MON = 1_704_067_200 * 10**9  # 2024-01-01T00:00:00Z
OVERNIGHT = WeeklySessions.model_validate({
    "timezone": "America/Chicago",
    "sessions": [{"days": ["sun", "mon", "tue", "wed", "thu"], "open": "17:00", "close": "16:00"}]})


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "processor": cpu,
            "load_avg_1m": os.getloadavg()[0]}


def _build_year() -> dict[str, float]:
    out = {}
    for name, make in (("CMEGlobex_FX", lambda: ExchangeCalendar("CMEGlobex_FX")),
                       ("weekly", lambda: WeeklyCalendar(OVERNIGHT))):
        cal = make()
        t0 = time.perf_counter()
        cal._year(2024)
        out[name] = round(time.perf_counter() - t0, 4)
    return out


def _per_bar(assets: int, bars: int) -> dict[str, Any]:
    cal = calendar_for("CMEGlobex_FX")
    cal.session_state(MON)  # tables of the year built once (measured above)
    shared = [calendar_for("CMEGlobex_FX") for _ in range(assets)]
    start = MON + 2 * 24 * 60 * NS_PER_MIN  # Wednesday: in session
    t0 = time.perf_counter()
    for k in range(bars):
        bar = start + k * NS_PER_MIN
        for c in shared:
            c.expected_bars(np.array([bar]), NS_PER_MIN)
            c.open_ns_between(bar - 2 * NS_PER_MIN, bar + NS_PER_MIN)
    elapsed = time.perf_counter() - t0
    return {"assets": assets, "bars": bars,
            "per_bar_us": round(elapsed / (assets * bars) * 1e6, 2),
            "year_tables_built": len(cal._years)}


def _ticks(settings: Any) -> list[TickBatch]:
    sim = MarketSimulator.from_settings(settings, seed=5, start_ns=MON)
    ticks = TickBatch.concat(list(sim.run(2 * 1440)))
    minute = ticks.ts_init // NS_PER_MIN
    edges = np.flatnonzero(np.diff(minute)) + 1
    return [ticks.take(idx) for idx in np.split(np.arange(len(ticks)), edges)]


def _steps(rounds: int) -> dict[str, Any]:
    overrides = ["assets=[ES-FUT]", "simulator.providers=[alpha, bravo]",
                 "simulator.ticks_per_provider_per_s=0.2", "simulator.anomaly_rate=0",
                 "simulator.start_prices={ES-FUT: 4800.0}",
                 "calendars.ES-FUT={timezone: America/Chicago, sessions: [{days: [sun, mon, tue, "
                 "wed, thu], open: '17:00', close: '16:00'}]}"]
    settings = load_settings(overrides=overrides)
    batches = _ticks(settings)  # the same session ticks for both runs
    plain = load_settings(overrides=overrides[:-1])
    best: dict[str, float] = {}
    gaps: dict[str, int] = {}
    for _ in range(rounds):
        for name, cfg in (("session_calendar", settings), ("24/7", plain)):
            state = AssetState("ES-FUT", cfg)
            t0 = time.perf_counter()
            for b in batches:
                state.step(b, lambda s, e: {})
            state.flush(lambda s, e: {})
            per = (time.perf_counter() - t0) / len(batches) * 1e6
            best[name] = round(min(best.get(name, per), per), 1)
            gaps[name] = state.gaps
    return {"steps": len(batches), "step_us_best": best, "gaps_audited": gaps}


def run(assets: int = 1000, bars: int = 60, rounds: int = 3) -> dict[str, Any]:
    """Every figure of the benchmark (see the module notes)."""
    return {"build_year_s": _build_year(), "queries": _per_bar(assets, bars),
            "ingest": _steps(rounds), "machine": _machine()}


def main() -> None:
    """Command line entry: one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=int, default=1000)
    parser.add_argument("--bars", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.assets, args.bars, args.rounds)))


if __name__ == "__main__":
    main()
