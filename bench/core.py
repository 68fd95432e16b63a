"""Throughput of the per-asset data plane (:class:`~tickcast.market.pipeline.AssetPipeline`).

Generates realistic multi-provider ticks in code (a GBM true price, per-provider bias and
noise, bid/ask, lognormal sizes, Poisson arrivals, network latency so that arrival order
differs slightly from event order, a few duplicates, NaNs and x5 prints), cuts them into
batches of ``batch_ticks`` in arrival order and times ``AssetPipeline.process`` on one core.

``python -m bench.core [--ticks N] [--providers P] [--seed S]`` prints one JSON line with
``core_ticks_per_s`` and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from tickcast.config import Settings
from tickcast.market.pipeline import AssetPipeline, IngestCounts
from tickcast.ticks import NS_PER_S, TickBatch

__all__ = ["make_ticks", "measure_core"]

_T0_NS = 1_700_000_000 * NS_PER_S
_SECONDS_PER_YEAR = 365.25 * 86_400


def make_ticks(
    n_ticks: int,
    providers: int = 4,
    seed: int = 0,
    asset: str = "BTC-USD",
    rate_per_provider_s: float = 5.0,
    annual_vol: float = 0.6,
    anomaly_rate: float = 0.002,
) -> TickBatch:
    """Multi-provider ticks of one asset in arrival order (see the module docstring).

    Parameters
    ----------
    n_ticks
        Ticks to generate.
    providers
        Number of providers (named ``p0``, ``p1``, ...).
    seed
        Seed of the generator; the same arguments give the same ticks.
    rate_per_provider_s
        Mean ticks per second per provider.
    annual_vol
        Volatility of the true price.
    anomaly_rate
        Share of ticks turned into a duplicate, a NaN price or a x5 print (a third each).

    Raises
    ------
    ValueError
        ``n_ticks`` < 1 or ``providers`` < 1.
    """
    if n_ticks < 1 or providers < 1:
        raise ValueError(f"n_ticks and providers must be >= 1, got {n_ticks}, {providers}")
    rng = np.random.default_rng(seed)
    names = [f"p{i}" for i in range(providers)]
    weights = rng.uniform(0.5, 1.5, providers)
    prov = rng.choice(providers, size=n_ticks, p=weights / weights.sum()).astype(np.int16)
    gaps_s = rng.exponential(1.0 / (rate_per_provider_s * providers), n_ticks)
    ts_event = _T0_NS + np.cumsum(gaps_s * NS_PER_S).astype(np.int64)
    sigma = annual_vol * np.sqrt(gaps_s / _SECONDS_PER_YEAR)
    true = 60_000.0 * np.exp(np.cumsum(sigma * rng.standard_normal(n_ticks)))
    bias = rng.normal(0.0, 0.5e-4, providers)
    price = np.round(true * (1.0 + bias[prov] + 1.5e-4 * rng.standard_normal(n_ticks)), 2)
    half = price * 1e-4 * rng.uniform(0.5, 1.5, n_ticks)
    bid, ask = np.round(price - half, 2), np.round(price + half, 2)
    size = np.round(np.exp(rng.normal(-3.0, 1.2, n_ticks)), 6)
    seq = np.zeros(n_ticks, dtype=np.int64)
    for p in range(providers):  # one pass per provider: numbering each provider's ticks
        sel = prov == p
        seq[sel] = np.arange(int(sel.sum()))
    ts_init = ts_event + rng.exponential(40e6, n_ticks).astype(np.int64)

    kind = rng.random(n_ticks)
    third = anomaly_rate / 3.0
    price[kind < third] = np.nan
    jump = (kind >= third) & (kind < 2 * third)
    price[jump] *= 5.0
    dup_src = np.flatnonzero((kind >= 2 * third) & (kind < anomaly_rate))
    # A duplicate is the same tick delivered again up to two seconds later.
    idx = np.concatenate([np.arange(n_ticks), dup_src])
    arrival = np.concatenate([ts_init, ts_init[dup_src] + rng.integers(0, 2 * NS_PER_S, len(dup_src))])
    order = np.argsort(arrival, kind="stable")[:n_ticks]
    idx = idx[order]
    return TickBatch(
        asset=asset, providers=tuple(names), provider=prov[idx], ts_event=ts_event[idx],
        ts_init=arrival[order], price=price[idx], size=size[idx], bid=bid[idx], ask=ask[idx],
        seq=seq[idx], status=np.zeros(n_ticks, dtype=np.uint8),
    )


def measure_core(n_ticks: int = 2_000_000, providers: int = 4, seed: int = 0,
                 batch_ticks: int = 20_000) -> dict[str, object]:
    """Time ``AssetPipeline.process`` over ``n_ticks`` generated ticks in batches.

    Returns
    -------
    dict
        ``core_ticks_per_s``: all ticks / CPU time of this process spent in ``process`` (the
        capacity of one core, insensitive to other processes competing for the machine);
        ``wall_ticks_per_s``: all ticks / wall-clock time of the same calls;
        ``p50_batch_ticks_per_s`` from the median batch wall time; batch statistics, the
        ingest counts and the machine (platform, cpu count, load average, versions).
    """
    ticks = make_ticks(n_ticks, providers, seed)
    batches = [ticks.take(np.arange(s, min(s + batch_ticks, n_ticks))) for s in range(0, n_ticks, batch_ticks)]
    pipe = AssetPipeline(ticks.asset, Settings())
    totals = IngestCounts()
    times: list[float] = []
    cpu_s = 0.0
    for b in batches:
        start, cpu = time.perf_counter(), time.process_time()
        res = pipe.process(b)
        cpu_s += time.process_time() - cpu
        times.append(time.perf_counter() - start)
        totals.merge(res.counts)
    start, cpu = time.perf_counter(), time.process_time()
    totals.merge(pipe.flush().counts)
    cpu_s += time.process_time() - cpu
    times.append(time.perf_counter() - start)
    total_s = float(np.sum(times))
    p50 = float(np.median(times[:-1]))
    return {
        "core_ticks_per_s": round(n_ticks / cpu_s),
        "wall_ticks_per_s": round(n_ticks / total_s),
        "p50_batch_ticks_per_s": round(batch_ticks / p50),
        "n_ticks": n_ticks,
        "providers": providers,
        "batch_ticks": batch_ticks,
        "batches": len(batches),
        "seconds": round(total_s, 4),
        "cpu_seconds": round(cpu_s, 4),
        "p50_batch_ms": round(p50 * 1e3, 3),
        "max_batch_ms": round(max(times) * 1e3, 3),
        "counts": totals.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry: print the measurement as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=2_000_000)
    ap.add_argument("--providers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=20_000)
    args = ap.parse_args(argv)
    print(json.dumps(measure_core(args.ticks, args.providers, args.seed, args.batch)))


if __name__ == "__main__":
    main()
