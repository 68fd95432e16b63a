"""Reliability-weighted against unweighted consensus, on the shared multi-venue data.

``python -m bench.consensus [--path FILE]`` replays 1-minute bars of the shared file as ticks
(four per bar, as ``tickcast ingest --source replay`` does) through :class:`AssetPipeline` twice,
once with ``consensus.weighting=reliability`` and once with ``equal``, and compares each
consensus close with a reference close, in bp. Scenarios:

* ``btc_usd``: BTC/USD on binanceus, coinbase and kraken. Reference: the median of the three
  venues' own closes, in the minutes all three quote.
* ``btc_all_quotes``: every BTC series of the file as a provider of one asset: BTC/USD,
  BTC/USDT and BTC/USDC on their venues (nine series). The venues really disagree here: each
  stablecoin's basis against the dollar drifts by a few bp a day and their books move apart
  (p99 distance to the USD median up to 10-12 bp). Reference: the median close of the three
  BTC/USD venues, in minutes where they all quote, i.e. the dollar price the asset names.
* ``usdt_usd``: USDT/USD on coinbase and kraken, a stablecoin from two venues. Reference: the
  mean of the two venues' closes where both quote.
* ``usdc_usdt_spike``: USDC/USDT on binanceus alone, the series with a real one-minute print
  10% away from the peg (0.8997); reported: minutes whose consensus close is off the peg by
  more than 1%.
* ``btc_usd_degraded``: ``btc_usd`` plus a fault injected on one venue (not real data on that
  venue: named so). From day 3 on, kraken's feed degrades: a share ``--bad-share`` of its ticks
  are garbage prints (x5, caught and named as outliers, which lowers its reliability), and its
  other ticks carry an error drifting up to ``--drift-bp`` (inside the outlier band, so they are
  accepted). Reference: the median of the two healthy venues' closes. Run once with all three
  venues and once with coinbase and kraken only, where one bad venue pulls an unweighted
  two-venue median halfway.

Prints one JSON line: per scenario and weighting the error against the reference (median, p99,
max bp, minutes), the distance between the two weightings, the lowest reliability each
provider reached, and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.shared_data import machine, shared_file
from tickcast.config import Settings, load_settings
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.replay import ReplayFile, expand_bars_to_ticks, read_bar_file
from tickcast.ticks import NS_PER_MIN

BATCH_TICKS = 20_000
WEIGHTINGS: tuple[str, ...] = ("reliability", "equal")
DAY_NS = 1440 * NS_PER_MIN


def _series(bars: pd.DataFrame, symbol_asset: str, venues: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Bars of one file asset, optionally of some venues only."""
    sel = bars.loc[bars["asset"] == symbol_asset]
    if venues is not None:
        sel = sel.loc[sel["venue"].isin(venues)]
    return sel


def _as_providers(frames: list[pd.DataFrame], asset: str, label_symbol: bool) -> pd.DataFrame:
    """Stack bar frames as providers of ``asset`` (provider = venue, or venue:symbol)."""
    out = []
    for f in frames:
        g = f.copy()
        if label_symbol:
            g["venue"] = g["venue"] + ":" + g["asset"]
        g["asset"] = asset
        out.append(g)
    return pd.concat(out, ignore_index=True).sort_values(["ts", "venue"], kind="stable")


def run_pipeline(bars: pd.DataFrame, asset: str, weighting: str,
                 corrupt: Any = None) -> tuple[pd.DataFrame, dict[str, float], float]:
    """Replay ``bars`` (providers of ``asset``) as ticks; last version of every consensus bar,
    the lowest reliability each provider reached, and the seconds the pipeline took."""
    settings: Settings = load_settings(env={}).with_overrides(
        assets=[asset], **{"consensus.weighting": weighting})
    ticks = expand_bars_to_ticks(bars, asset)
    if corrupt is not None:
        corrupt(ticks)
    pipe = AssetPipeline(asset, settings)
    frames, low = [], {}
    t0 = time.perf_counter()
    for start in range(0, len(ticks), BATCH_TICKS):
        res = pipe.process(ticks.take(np.arange(start, min(start + BATCH_TICKS, len(ticks)))))
        frames.append(res.consensus_bars)
        for name, r in pipe.book.reliability.items():
            low[name] = min(low.get(name, 1.0), r)
        tick_rel = pipe.book.last_tick_reliability
        if len(tick_rel):
            names = np.asarray(ticks.providers)[ticks.provider[start:start + BATCH_TICKS]]
            for name in set(names.tolist()):
                vals = tick_rel[names == name]
                vals = vals[np.isfinite(vals)]
                if len(vals):
                    low[name] = min(low[name], float(vals.min()))
    frames.append(pipe.flush().consensus_bars)
    seconds = time.perf_counter() - t0
    cons = pd.concat([f for f in frames if len(f)], ignore_index=True)
    cons = cons.drop_duplicates("ts", keep="last").set_index("ts").sort_index()
    return cons, {k: round(v, 4) for k, v in sorted(low.items())}, seconds


def _errors(close: pd.Series, ref: pd.Series) -> dict[str, float]:
    both = close.index.intersection(ref.index)
    err = np.abs(close.loc[both].to_numpy() / ref.loc[both].to_numpy() - 1.0) * 1e4
    if not len(err):
        return {"minutes": 0}
    return {"minutes": len(err), "median_bp": round(float(np.median(err)), 4),
            "p99_bp": round(float(np.quantile(err, 0.99)), 4), "max_bp": round(float(err.max()), 4),
            "mean_bp": round(float(err.mean()), 4)}


def _median_ref(frames: list[pd.DataFrame], require_all: bool = True) -> pd.Series:
    closes = pd.concat([f.set_index("ts")["close"].rename(i) for i, f in enumerate(frames)], axis=1)
    if require_all:
        closes = closes.dropna()
    return closes.median(axis=1)


def compare(bars: pd.DataFrame, asset: str, ref: pd.Series | None,
            corrupt: Any = None) -> dict[str, Any]:
    """Both weightings on one provider set: errors against ``ref`` and against each other."""
    out: dict[str, Any] = {}
    closes: dict[str, pd.Series] = {}
    for w in WEIGHTINGS:
        cons, low, seconds = run_pipeline(bars, asset, w, corrupt)
        closes[w] = cons["close"]
        out[w] = {"bars": len(cons), "seconds": round(seconds, 2)}
        if ref is not None:
            out[w]["vs_reference"] = _errors(cons["close"], ref)
        out["lowest_reliability"] = low
    both = closes["reliability"].index.intersection(closes["equal"].index)
    diff = np.abs(closes["reliability"].loc[both] / closes["equal"].loc[both] - 1.0).to_numpy() * 1e4
    out["weighted_vs_equal"] = {
        "minutes": len(both), "minutes_different": int((diff > 0).sum()),
        "max_bp": round(float(diff.max()), 4) if len(diff) else 0.0,
        "p99_bp": round(float(np.quantile(diff, 0.99)), 4) if len(diff) else 0.0,
    }
    out["_closes"] = closes
    return out


def degrade(venue: str, start_ns: int, bad_share: float, drift_bp: float, seed: int) -> Any:
    """A fault on one venue's ticks from ``start_ns``: garbage x5 prints and a drifting error."""
    def apply(ticks: Any) -> None:
        rng = np.random.default_rng(seed)
        code = ticks.providers.index(venue)
        rows = np.flatnonzero((ticks.provider == code) & (ticks.ts_event >= start_ns))
        if not len(rows):
            return
        # The error ramps up over a day and then holds, with the sign of a slow swing.
        age = (ticks.ts_event[rows] - start_ns) / DAY_NS
        error = drift_bp * np.clip(age, 0.0, 1.0) * np.sign(np.sin(2 * np.pi * age / 2.0) + 1e-9)
        ticks.price[rows] *= 1.0 + error * 1e-4
        garbage = rows[rng.random(len(rows)) < bad_share]
        ticks.price[garbage] *= 5.0
    return apply


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=shared_file(), help="the shared bar file")
    ap.add_argument("--bad-share", type=float, default=0.2, help="garbage share of the degraded venue")
    ap.add_argument("--drift-bp", type=float, default=30.0, help="drifting error of the degraded venue")
    args = ap.parse_args(argv)
    if not args.path.is_file():
        print(f"error: bar file not found: {args.path}", file=sys.stderr)
        return 2
    replay: ReplayFile = read_bar_file(args.path)
    bars = replay.bars
    usd_venues = ("binanceus", "coinbase", "kraken")
    btc_usd = [_series(bars, "BTC-USD", (v,)) for v in usd_venues]
    out: dict[str, Any] = {}

    usd_ref = _median_ref(btc_usd)
    res = compare(_as_providers(btc_usd, "BTC-USD", False), "BTC-USD", usd_ref)
    res.pop("_closes")
    out["btc_usd"] = res

    every_btc = [_series(bars, a, (v,)) for a in ("BTC-USD", "BTC-USDT", "BTC-USDC")
                 for v in sorted(bars.loc[bars["asset"] == a, "venue"].unique())]
    res = compare(_as_providers(every_btc, "BTC-USD", True), "BTC-USD", usd_ref)
    closes = res.pop("_closes")
    by_day: dict[str, dict[str, float]] = {}
    for w in WEIGHTINGS:
        both = closes[w].index.intersection(usd_ref.index)
        err = pd.Series(np.abs(closes[w].loc[both].to_numpy() / usd_ref.loc[both].to_numpy() - 1) * 1e4,
                        index=pd.to_datetime(both, unit="ns").strftime("%Y-%m-%d"))
        for day, e in err.groupby(level=0):
            by_day.setdefault(day, {})[f"{w}_mean_bp"] = round(float(e.mean()), 4)
    out["btc_all_quotes"] = {"providers": len(every_btc), **res, "by_day": by_day}

    usdt = [_series(bars, "USDT-USD", (v,)) for v in ("coinbase", "kraken")]
    usdt_ref = pd.concat([f.set_index("ts")["close"] for f in usdt], axis=1).dropna().mean(axis=1)
    res = compare(_as_providers(usdt, "USDT-USD", False), "USDT-USD", usdt_ref)
    res.pop("_closes")
    out["usdt_usd"] = res

    spike = _series(bars, "USDC-USDT")
    res = compare(_as_providers([spike], "USDC-USDT", False), "USDC-USDT", None)
    closes = res.pop("_closes")
    raw_off = int((np.abs(spike["close"].to_numpy() - 1.0) > 0.01).sum())
    out["usdc_usdt_spike"] = {
        **res, "raw_minutes_off_peg_1pct": raw_off,
        **{f"{w}_minutes_off_peg_1pct": int((np.abs(closes[w] - 1.0) > 0.01).sum()) for w in WEIGHTINGS},
    }

    start = int(bars["ts"].min()) + 2 * DAY_NS
    fault = degrade("kraken", start, args.bad_share, args.drift_bp, seed=7)
    healthy = [_series(bars, "BTC-USD", (v,)) for v in ("binanceus", "coinbase")]
    for name, venues in (("three_venues", usd_venues), ("two_venues", ("coinbase", "kraken"))):
        provs = [_series(bars, "BTC-USD", (v,)) for v in venues]
        # The healthy venues' median in every minute one of them quotes (a minute with one
        # healthy venue is where the degraded one weighs most).
        ref = _median_ref([f for f in healthy if f["venue"].iloc[0] in venues] or healthy,
                          require_all=False)
        ref = ref.loc[ref.index >= start]
        res = compare(_as_providers(provs, "BTC-USD", False), "BTC-USD", ref, corrupt=fault)
        res.pop("_closes")
        out.setdefault("btc_usd_degraded", {"fault": {"venue": "kraken", "from_ns": start,
                                                      "garbage_share": args.bad_share,
                                                      "drift_bp": args.drift_bp}})[name] = res
    out["machine"] = machine()
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
