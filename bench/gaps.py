"""Gap methods measured on gaps cut out of real multi-venue data: median error by gap length.

``python -m bench.gaps [--path FILE] [--gaps-per-length N] [--lengths 3,5,10,30,60,180]``

On the shared file, each BTC/USD venue (binanceus, coinbase, kraken) is in turn the series to
fill and the two others are its predictors / alternates. For every gap length, ``N`` gaps are
cut at random minutes where the venue has a real bar at every minute of the gap and at both
edges (so the truth is known and the gap is bounded). Each gap is filled, from the venue's own
bars and the others' bars over ``gaps.mice_context_minutes`` (+5) on each side, by:

* ``linear``: linear interpolation of the close between the bars bounding the gap;
* ``mice``: multiple imputation by chained equations from the other venues' closes
  (:mod:`tickcast.market.mice`, scikit-learn's ``IterativeImputer``);
* ``provider``: one other venue's bars scaled by the basis at the edges (provider recovery);
* ``policy``: the configured :class:`GapPolicy` (``configs/default.yaml``), whatever it picks.

Reported per method and gap length: the error of every cut minute it filled, ``|close -
truth|`` in bp of the truth (median, p90, mean), the share of cut minutes it filled
(``coverage``; MICE leaves minutes where no other venue quotes, recovery those its venue does
not have), the number of gaps, and for the policy the methods it used. The venue's own
no-trade minutes inside the window are gaps too and are filled alike, but never scored.
Prints one JSON line, with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.shared_data import machine, shared_file
from tickcast.config import GapConfig, load_settings
from tickcast.market.gaps import GapPolicy
from tickcast.sources.replay import read_bar_file
from tickcast.ticks import NS_PER_MIN

VENUES: tuple[str, ...] = ("binanceus", "coinbase", "kraken")
LENGTHS: tuple[int, ...] = (3, 5, 10, 30, 60, 180)
BIG = 100_000  # minutes: "any length"


def method_configs(base: GapConfig) -> dict[str, GapConfig]:
    """One policy per method, so each fills every gap its own way (and the configured one)."""
    common = {k: v for k, v in base.model_dump().items() if k.startswith("mice_") and k not in
              ("mice_min_minutes", "mice_max_minutes")}
    return {
        "linear": GapConfig(ffill_max_minutes=0, interp_max_minutes=BIG, provider_recovery=False,
                            mice_max_minutes=0, **common),
        "mice": GapConfig(ffill_max_minutes=0, interp_max_minutes=0, provider_recovery=False,
                          mice_min_minutes=1, mice_max_minutes=BIG, **common),
        "provider": GapConfig(ffill_max_minutes=0, interp_max_minutes=0, provider_recovery=True,
                              mice_max_minutes=0, **common),
        "policy": base,
    }


def venue_bars(bars: pd.DataFrame, venue: str) -> pd.DataFrame:
    """One venue's BTC/USD bars in the bar schema, indexed by minute."""
    v = bars.loc[(bars["asset"] == "BTC-USD") & (bars["venue"] == venue)].sort_values("ts")
    n = len(v)
    frame = pd.DataFrame({
        "ts": v["ts"].to_numpy(np.int64), "open": v["open"].to_numpy(), "high": v["high"].to_numpy(),
        "low": v["low"].to_numpy(), "close": v["close"].to_numpy(), "volume": v["volume"].to_numpy(),
        "vwap": v["close"].to_numpy(), "ticks": np.full(n, 4, dtype=np.int64),
        "providers": np.ones(n, dtype=np.int64), "confidence": np.zeros(n), "imputed": [""] * n,
    })
    frame.index = (frame["ts"] // NS_PER_MIN).to_numpy()
    return frame


def gap_starts(present: np.ndarray, length: int, n: int, rng: np.random.Generator, margin: int) -> np.ndarray:
    """``n`` distinct gap starts where the minutes start-1 .. start+length are all present."""
    run = np.convolve(present.astype(np.int64), np.ones(length + 2, dtype=np.int64), "valid") == length + 2
    ok = np.flatnonzero(run) + 1  # start = first minute of the gap
    ok = ok[(ok >= margin) & (ok + length + margin < len(present))]
    if len(ok) == 0:
        return ok
    return np.sort(rng.choice(ok, size=min(n, len(ok)), replace=False))


def measure(path: Path, lengths: tuple[int, ...], per_length: int, seed: int) -> dict[str, Any]:
    """Cut, fill and score every gap; summaries by method and length."""
    base = load_settings(env={}).gaps
    configs = method_configs(base)
    policies = {k: GapPolicy(c) for k, c in configs.items()}
    ctx = base.mice_context_minutes + 5
    replay = read_bar_file(path, ("BTC-USD",))
    frames = {v: venue_bars(replay.bars, v) for v in VENUES}
    first = min(int(f.index.min()) for f in frames.values())
    last = max(int(f.index.max()) for f in frames.values())
    rng = np.random.default_rng(seed)
    errors: dict[tuple[str, int], list[np.ndarray]] = {}
    cut: dict[tuple[str, int], int] = {}
    used: dict[int, Counter[str]] = {L: Counter() for L in lengths}
    seconds: dict[str, float] = {k: 0.0 for k in configs}
    gaps_done: dict[int, int] = {L: 0 for L in lengths}
    for target in VENUES:
        own = frames[target]
        present = np.zeros(last - first + 1, dtype=bool)
        present[own.index.to_numpy() - first] = True
        others = {v: frames[v] for v in VENUES if v != target}
        for L in lengths:
            for start in gap_starts(present, L, per_length, rng, ctx) + first:
                lo, hi = start - ctx, start + L + ctx
                window = own.loc[(own.index >= lo) & (own.index < hi)]
                gap = (window.index >= start) & (window.index < start + L)
                truth = window.loc[gap, "close"]
                series = window.loc[~gap].reset_index(drop=True)
                alts = {v: f.loc[(f.index >= lo) & (f.index < hi)].reset_index(drop=True)
                        for v, f in others.items()}
                gaps_done[L] += 1
                for name, policy in policies.items():
                    t0 = time.perf_counter()
                    filled, _ = policy.fill(series, NS_PER_MIN, alts)
                    seconds[name] += time.perf_counter() - t0
                    f = filled.set_index(filled["ts"] // NS_PER_MIN)
                    got = f.reindex(truth.index)
                    ok = got["imputed"].notna() & (got["imputed"].astype(str) != "")
                    err = np.abs(got.loc[ok, "close"].to_numpy() / truth[ok].to_numpy() - 1.0) * 1e4
                    errors.setdefault((name, L), []).append(err)
                    cut[(name, L)] = cut.get((name, L), 0) + L
                    if name == "policy":
                        used[L].update(got.loc[ok, "imputed"].astype(str).map(
                            lambda m: "provider" if m.startswith("provider:") else m))
    table: dict[str, dict[str, Any]] = {}
    for (name, L), parts in sorted(errors.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        e = np.concatenate(parts) if parts else np.empty(0)
        row: dict[str, Any] = {
            "gaps": gaps_done[L], "minutes_cut": cut[(name, L)], "minutes_filled": len(e),
            "coverage": round(len(e) / cut[(name, L)], 4) if cut[(name, L)] else None,
            "median_bp": round(float(np.median(e)), 3) if len(e) else None,
            "p90_bp": round(float(np.quantile(e, 0.9)), 3) if len(e) else None,
            "mean_bp": round(float(e.mean()), 3) if len(e) else None,
        }
        if name == "policy":
            row["methods"] = dict(used[L])
        table.setdefault(name, {})[str(L)] = row
    total_gaps = sum(gaps_done.values())
    return {
        "by_method": table,
        "seconds_per_gap": {k: round(v / max(total_gaps, 1), 4) for k, v in seconds.items()},
        "targets": list(VENUES), "lengths_min": list(lengths), "gaps_per_length_per_venue": per_length,
        "context_minutes": base.mice_context_minutes, "mice_imputations": base.mice_imputations,
        "policy": base.model_dump(), "seed": seed,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=shared_file(), help="the shared bar file")
    ap.add_argument("--gaps-per-length", type=int, default=30, help="gaps per length and venue")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="gap lengths, minutes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.path.is_file():
        print(f"error: bar file not found: {args.path}", file=sys.stderr)
        return 2
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        print(f"error: --lengths must be integers separated by commas, got {args.lengths!r}", file=sys.stderr)
        return 2
    if args.gaps_per_length < 1 or not lengths or min(lengths) < 1:
        print("error: --gaps-per-length and every length must be >= 1", file=sys.stderr)
        return 2
    import sklearn

    out = measure(args.path, lengths, args.gaps_per_length, args.seed)
    out["machine"] = machine(sklearn=sklearn.__version__)
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
