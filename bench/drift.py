"""Benchmark of the drift detectors: throughput, detection delay and false alarms.

Run: ``python -m bench.drift [--seed 7] [--batch 500] [--detector page_hinkley|cusum]``.

Scenario (seeded): a reference sample of 2,000 rows x 5 features, N(0, 1); a live stream of
100,000 stationary events drawn from the same law, then a +1-sigma mean shift of ONE feature
(feature 0) -- the hardest case, as no other feature helps. One detector watches all five
features, configured from ``configs/default.yaml`` (``drift.*``) and standardized by the
reference mean and std.

* ``false_alarms``: alarms during the 100,000 stationary events (the first
  ``drift.detector_warmup`` of them estimate autocorrelation and cannot alarm);
* ``delay_events``: events after the shift up to and including the first alarm
  (the first shifted event is event 1);
* ``events_per_s``: events per second through ``detector.update`` in batches of ``--batch``
  events (a per-asset actor's call), best of three passes over the stationary stream;
  ``events_per_s_by_batch`` for 1 (one call per event), 100, 500 and 1,000;
* ``seeds``: delay and false alarms over 20 more seeds (distribution, not one lucky draw);
* ``window_monitor``: the full :class:`~tickcast.monitoring.drift.DriftMonitor` (window KS, PSI,
  W1 refreshed every ``drift.eval_every`` events, plus the detector) on the same five features,
  and, for comparison, KS recomputed with scipy on the whole window at every event.

The last line is one JSON object. Timings are wall-clock on a shared machine.
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

from tickcast.config import DriftConfig, load_settings
from tickcast.monitoring.detectors import cusum_arl, make_detector
from tickcast.monitoring.drift import DriftMonitor, Reference

N_FEATURES = 5
N_REFERENCE = 2_000
N_STATIONARY = 100_000
N_SHIFTED = 2_000
SHIFT_SIGMA = 1.0


def _stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(N_REFERENCE, N_FEATURES))
    live = rng.normal(size=(N_STATIONARY + N_SHIFTED, N_FEATURES))
    live[N_STATIONARY:, 0] += SHIFT_SIGMA * reference[:, 0].std()
    return reference, live


def _detector(cfg: DriftConfig, reference: np.ndarray) -> Any:
    return make_detector(cfg.detector, reference.mean(axis=0), reference.std(axis=0),
                         ph_delta=cfg.ph_delta, ph_threshold=cfg.ph_threshold,
                         ph_min_events=cfg.ph_min_events, cusum_k=cfg.cusum_k, cusum_h=cfg.cusum_h,
                         warmup=cfg.detector_warmup, max_inflation=cfg.detector_max_inflation)


def _detect(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray,
            batch: int) -> tuple[int, int | None, list[float]]:
    """(false alarms before the shift, delay of the first alarm after it, inflation)."""
    det = _detector(cfg, reference)
    indices: list[int] = []
    for i in range(0, live.shape[0], batch):
        if batch == 1:
            indices.extend(a.index for a in det.update(live[i]))
        else:
            indices.extend(a.index for a in det.update(live[i: i + batch]))
    false_alarms = sum(1 for i in indices if i < N_STATIONARY)
    after = [i for i in indices if i >= N_STATIONARY]
    delay = (after[0] - N_STATIONARY + 1) if after else None
    return false_alarms, delay, [round(float(v), 3) for v in det.inflation]


def _throughput(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray, batch: int,
                events: int, repeats: int = 3) -> float:
    best = float("inf")
    data = live[:events]
    for _ in range(repeats):
        det = _detector(cfg, reference)
        t0 = time.perf_counter()
        if batch == 1:
            for row in data:
                det.update(row)
        else:
            for i in range(0, events, batch):
                det.update(data[i: i + batch])
        best = min(best, time.perf_counter() - t0)
    return events / best


def _monitor_throughput(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray, batch: int,
                        events: int) -> float:
    ref = Reference.from_array(reference, [f"f{i}" for i in range(N_FEATURES)], cfg.psi_bins)
    mon = DriftMonitor(cfg, ref)
    mon.update_features(live[: cfg.window])  # a full window, as in steady state
    data = live[cfg.window: cfg.window + events]
    t0 = time.perf_counter()
    if batch == 1:
        for row in data:
            mon.update_features(row)
    else:
        for i in range(0, events, batch):
            mon.update_features(data[i: i + batch])
    return events / (time.perf_counter() - t0)


def _naive_ks_throughput(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray,
                         events: int) -> float:
    from scipy.stats import ks_2samp

    w = cfg.window
    t0 = time.perf_counter()
    for t in range(w, w + events):
        window = live[t - w: t]
        for j in range(N_FEATURES):
            ks_2samp(reference[:, j], window[:, j])
    return events / (time.perf_counter() - t0)


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
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "processor": cpu}


def run(seed: int = 7, batch: int = 500, detector: str | None = None,
        seeds: int = 20) -> dict[str, Any]:
    """Run the benchmark and return its result dictionary."""
    cfg = load_settings().drift
    if detector is not None:
        cfg = cfg.model_copy(update={"detector": detector})
    reference, live = _stream(seed)
    false_alarms, delay, inflation = _detect(cfg, reference, live, batch)
    # Batching must not change what is detected: replay one event per call and compare.
    fa_single, delay_single, _ = _detect(cfg, reference, live[: N_STATIONARY + 500], 1)

    by_batch = {str(b): round(_throughput(cfg, reference, live, b, 20_000 if b == 1 else N_STATIONARY))
                for b in (1, 100, 500, 1000)}
    eps = by_batch.get(str(batch)) or round(_throughput(cfg, reference, live, batch, N_STATIONARY))

    delays: list[int] = []
    fa_total = 0
    missed = 0
    for s in range(seed + 1, seed + 1 + seeds):
        ref_s, live_s = _stream(s)
        fa, d, _ = _detect(cfg, ref_s, live_s, batch)
        fa_total += fa
        if d is None:
            missed += 1
        else:
            delays.append(d)
    d_arr = np.array(delays, dtype=float)

    k, h = (cfg.ph_delta, cfg.ph_threshold) if cfg.detector == "page_hinkley" else (cfg.cusum_k, cfg.cusum_h)
    mon = {
        "events_per_s_batch_500": round(_monitor_throughput(cfg, reference, live, 500, 50_000)),
        "events_per_s_single": round(_monitor_throughput(cfg, reference, live, 1, 5_000)),
        "naive_ks_per_event_events_per_s": round(_naive_ks_throughput(cfg, reference, live, 300), 1),
        "window": cfg.window, "eval_every": cfg.eval_every, "reference_rows": N_REFERENCE,
    }
    return {
        "detector": cfg.detector, "allowance": k, "threshold": h, "features": N_FEATURES,
        "seed": seed, "batch": batch, "shift_sigma": SHIFT_SIGMA, "shifted_features": 1,
        "events_per_s": eps,
        "events_per_s_single": by_batch["1"],
        "events_per_s_by_batch": by_batch,
        "delay_events": delay,
        "false_alarms": false_alarms,
        "stationary_events": N_STATIONARY,
        "warmup_events": cfg.detector_warmup,
        "inflation": inflation,
        "same_alarms_one_event_per_call": (fa_single, delay_single) == (false_alarms, delay),
        "predicted": {"arl0_per_side": cusum_arl(k, h), "delay": round(cusum_arl(k, h, SHIFT_SIGMA), 1)},
        "seeds": {"n": seeds, "false_alarms_total": fa_total, "missed": missed,
                  "delay_median": float(np.median(d_arr)) if delays else None,
                  "delay_p90": float(np.quantile(d_arr, 0.9)) if delays else None,
                  "delay_max": int(d_arr.max()) if delays else None},
        "window_monitor": mon,
        "machine": _machine(),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a summary then the JSON result as the last line."""
    ap = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch", type=int, default=500, help="events per detector call")
    ap.add_argument("--detector", choices=("page_hinkley", "cusum"), default=None,
                    help="default: drift.detector from the config")
    ap.add_argument("--seeds", type=int, default=20, help="extra seeds for the delay distribution")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    res = run(seed=args.seed, batch=args.batch, detector=args.detector, seeds=args.seeds)
    print(f"detector {res['detector']} (allowance {res['allowance']}, threshold {res['threshold']}) "
          f"on {N_FEATURES} features, 1-sigma shift of one feature after {N_STATIONARY:,} events")
    print(f"  throughput: {res['events_per_s']:,} events/s in batches of {res['batch']}; "
          f"{res['events_per_s_single']:,} events/s one event per call")
    print(f"  delay {res['delay_events']} events, false alarms {res['false_alarms']} "
          f"(predicted delay {res['predicted']['delay']}, ARL0 per side {res['predicted']['arl0_per_side']:.3g})")
    s = res["seeds"]
    print(f"  over {s['n']} more seeds: delay median {s['delay_median']}, p90 {s['delay_p90']}, "
          f"max {s['delay_max']}; false alarms {s['false_alarms_total']}; missed {s['missed']}")
    m = res["window_monitor"]
    print(f"  full monitor (window KS/PSI/W1 + detector): {m['events_per_s_batch_500']:,} events/s in "
          f"batches of 500, {m['events_per_s_single']:,} one per call; KS recomputed per event: "
          f"{m['naive_ks_per_event_events_per_s']} events/s")
    print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
