"""The drawdown halt over the shared file's 9 days of BTC-USD consensus bars, with no-skill forecasts.

Run: ``python -m bench.safety_days [--path FILE] [--seeds 5]``.

The bars are the three venues' consensus bars made by the project's own data plane
(:mod:`bench.shared_bars`). :class:`~tickcast.monitoring.safety.SafetyState` with the configured
``safety`` section and ``model.fee_bp`` gets every bar close with a forecast for the next bar,
as a client polling each bar produces:

* ``noise``: a median drawn afresh each bar, normal with standard deviation ``size``;
* ``flip``: a median of magnitude ``size`` whose sign holds for ~10 bars (geometric runs,
  mean 10) and then flips;

at ``size`` 0.3 bp (the scale of a no-skill model's median: issue 14's figures) and 3 bp
(beyond the deadband's 2 bp cost: a no-skill model that does trade). Neither knows anything
about the future. The interval (only used by the wide-interval multiplier) is +-1.645 EWMA
volatilities of the past returns (half-life 30 bars). Each case runs with the deadband (the
configured default) and without it (``safety.deadband: false``, every forecast's sign traded:
the behaviour issue 14 measured).

Per case and seed: ``first_halt_hours`` (after the first bar; null: never), ``share_halted``
(bars), ``halts``, ``resumes``, ``managed_trades`` (bars whose advised position changed),
``shadow_fees_bp`` (fees the shadow account -- the one the halt follows, which trades through a
halt -- paid, in bp of equity) and ``final_equity`` of the managed account.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.shared_bars import SHARED_FILE, consensus_bars
from tickcast.config import SafetyConfig, load_settings
from tickcast.monitoring.pnl import BP
from tickcast.monitoring.safety import SafetyState

SIZES_BP: tuple[float, ...] = (0.3, 3.0)
KINDS: tuple[str, ...] = ("noise", "flip")


def forecasts(kind: str, size_bp: float, n: int, seed: int) -> np.ndarray:
    """No-skill median forecasts (log returns) for ``n`` bars."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.normal(0.0, size_bp * BP, n)
    if kind == "flip":
        runs = rng.geometric(0.1, n)
        signs = np.repeat(np.resize([1.0, -1.0], n), runs)[:n]
        return size_bp * BP * signs * rng.choice([-1.0, 1.0])
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def interval_bp(close: np.ndarray, halflife: float = 30.0) -> np.ndarray:
    """Width (bp) of a +-1.645-sigma interval from the EWMA volatility of past returns."""
    r = pd.Series(np.diff(np.log(close), prepend=np.nan))
    sd = r.ewm(halflife=halflife, min_periods=30).std().to_numpy()
    sd = np.where(np.isfinite(sd), sd, np.nanstd(r.to_numpy()[:500]))
    return 2 * 1.6448536269514722 * sd / BP


def run_case(cfg: SafetyConfig, fee_bp: float, close: np.ndarray, ts: np.ndarray,
             median: np.ndarray, width: np.ndarray) -> dict[str, Any]:
    """Feed every bar; return the figures of one case."""
    state = SafetyState(cfg, fee_bp)
    halted = np.zeros(close.size, dtype=bool)
    positions = np.zeros(close.size)
    halts, resumes, first = 0, 0, None
    for i in range(close.size):
        st = state.update(float(close[i]), float(median[i]), float(width[i]), ts=int(ts[i]))
        halted[i] = st.halted
        positions[i] = st.position
        for ev in st.events:
            if ev["type"] == "halt":
                halts += 1
                if first is None:
                    first = (int(ts[i]) - int(ts[0])) / 3.6e12
            elif ev["type"] == "resume":
                resumes += 1
    return {"first_halt_hours": None if first is None else round(first, 1),
            "share_halted": round(float(halted.mean()), 4), "halts": halts, "resumes": resumes,
            "managed_trades": int(np.count_nonzero(np.diff(positions, prepend=0.0))),
            "shadow_fees_bp": round(state.shadow.fees / BP, 1),
            "final_equity": round(state.managed.equity, 4)}


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "numpy": np.__version__, "cpu_count": os.cpu_count()}


def run(path: Path = SHARED_FILE, seeds: int = 5) -> dict[str, Any]:
    """Every case over every seed; returns the result dictionary."""
    t0 = time.perf_counter()
    settings = load_settings()
    bars = consensus_bars(path, settings=settings)
    close = bars["close"].to_numpy(dtype=np.float64)
    ts = bars["ts"].to_numpy(dtype=np.int64)
    width = interval_bp(close)
    cases: dict[str, Any] = {}
    for kind in KINDS:
        for size in SIZES_BP:
            for deadband in (True, False):
                cfg = settings.safety.model_copy(update={"deadband": deadband})
                name = f"{kind}_{size:g}bp_{'deadband' if deadband else 'no_deadband'}"
                per_seed = [run_case(cfg, settings.model.fee_bp, close, ts,
                                     forecasts(kind, size, close.size, seed), width)
                            for seed in range(seeds)]
                cases[name] = {"kind": kind, "size_bp": size, "deadband": deadband,
                               "seed_0": per_seed[0],
                               "share_halted_range": [min(s["share_halted"] for s in per_seed),
                                                      max(s["share_halted"] for s in per_seed)],
                               "seeds_with_a_halt": sum(s["halts"] > 0 for s in per_seed),
                               "resumes_total": sum(s["resumes"] for s in per_seed)}
    return {"bars": int(close.size), "days": round((ts[-1] - ts[0]) / 8.64e13, 2),
            "first_bar": str(pd.Timestamp(int(ts[0]), tz="UTC")), "seeds": seeds,
            "fee_bp": settings.model.fee_bp, "half_spread_bp": settings.safety.half_spread_bp,
            "max_drawdown": settings.safety.max_drawdown,
            "halt_resume_drawdown": settings.safety.halt_resume_drawdown,
            "halt_recovery_bars": settings.safety.halt_recovery_bars,
            "cases": cases, "seconds": round(time.perf_counter() - t0, 1), "machine": _machine()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a table then the JSON result as the last line."""
    ap = argparse.ArgumentParser(prog="python -m bench.safety_days", description=__doc__.split("\n")[0])
    ap.add_argument("--path", type=Path, default=SHARED_FILE, help="the shared multi-venue file")
    ap.add_argument("--seeds", type=int, default=5, help="forecast seeds per case")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if not args.path.exists():
        ap.error(f"no such file: {args.path}")
    res = run(args.path, args.seeds)
    print(f"{res['bars']:,} consensus bars ({res['days']} days from {res['first_bar']}), fee "
          f"{res['fee_bp']} bp + half spread {res['half_spread_bp']} bp; seed 0, then over "
          f"{res['seeds']} seeds")
    for name, c in res["cases"].items():
        s = c["seed_0"]
        first = "never" if s["first_halt_hours"] is None else f"{s['first_halt_hours']} h"
        print(f"  {name:28s} first halt {first:>8s}, halted {s['share_halted']:7.2%}, resumes "
              f"{s['resumes']}, trades {s['managed_trades']:5d}, shadow fees {s['shadow_fees_bp']:7.1f} bp | seeds "
              f"with a halt {c['seeds_with_a_halt']}/{res['seeds']}, halted "
              f"{c['share_halted_range'][0]:.0%}-{c['share_halted_range'][1]:.0%}")
    print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
