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
  W1, TVD and KL refreshed every ``drift.eval_every`` events -- ``evaluations`` counts them, one
  per ``eval_every`` events whatever the batch -- plus the detector) on the same five
  features, and, for comparison, KS recomputed with scipy on the whole window at every event;
* ``window_monitor.calm`` / ``.shift``: the monitor's level over the stationary events of the
  main seed and the 20 more (``false_alarm_evaluations``: evaluations at WARNING or above;
  ``max_score``), and after the shift (``delay_events`` to the first WARNING);
* ``real_data`` (when ``--path`` exists): the BTC/USD consensus bars of the shared file (made by
  :mod:`bench.shared_bars`), every feature but time of day, reference = 2,000 rows of the
  first three days; the monitor replays those three days (no drift by construction but the
  market's own intraday changes) and then the next six. Labels are the next bar's log return,
  forecast by a stand-in model whose median is 0 and whose 90 % interval is +-1.645 EWMA
  volatilities (half-life 30 bars, past returns only). Per span and per weighting (KS alone,
  the default weights, equal weights): shares of evaluations whose feature, label and concept
  scores reach WARNING or CRITICAL.

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

from pathlib import Path

import pandas as pd

from bench.shared_bars import SHARED_FILE, consensus_bars
from tickcast.config import DriftConfig, Settings, load_settings
from tickcast.features.definitions import compute_features, make_labels
from tickcast.monitoring.detectors import cusum_arl, make_detector
from tickcast.monitoring.drift import LABEL_COLUMN, DriftMonitor, Reference

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


def _monitor(cfg: DriftConfig, reference: np.ndarray) -> DriftMonitor:
    return DriftMonitor(cfg, Reference.from_array(reference, [f"f{i}" for i in range(N_FEATURES)],
                                                  cfg.psi_bins))


def _monitor_throughput(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray, batch: int,
                        events: int) -> tuple[float, int]:
    """(events per second, evaluations made) over ``events`` events in calls of ``batch``."""
    mon = _monitor(cfg, reference)
    mon.update_features(live[: cfg.window])  # a full window, as in steady state
    before = mon.evaluations
    data = live[cfg.window: cfg.window + events]
    t0 = time.perf_counter()
    if batch == 1:
        for row in data:
            mon.update_features(row)
    else:
        for i in range(0, events, batch):
            mon.update_features(data[i: i + batch])
    return events / (time.perf_counter() - t0), mon.evaluations - before


def _monitor_alarms(cfg: DriftConfig, reference: np.ndarray, live: np.ndarray) -> dict[str, Any]:
    """The monitor's level at every evaluation over the stationary events, and after the shift.

    Fed ``eval_every`` events per call, so the report read after each call is the evaluation
    just made (batches give the same evaluations: the monitor cuts them at the same points).
    """
    mon = _monitor(cfg, reference)
    step = cfg.eval_every
    calm_bad, calm_evals, max_score, delay = 0, 0, 0.0, None
    last_eval = 0
    for i in range(0, live.shape[0], step):
        mon.update_features(live[i: i + step])
        rep = mon.report
        if rep is None or mon.evaluations == last_eval:
            continue
        last_eval = mon.evaluations
        seen = rep.events_seen["features"]
        if seen <= N_STATIONARY:
            calm_evals += 1
            calm_bad += rep.level != "NORMAL"
            max_score = max(max_score, rep.score)
        elif delay is None and rep.level != "NORMAL":
            delay = seen - N_STATIONARY
    return {"calm_evaluations": calm_evals, "false_alarm_evaluations": calm_bad,
            "max_score": round(max_score, 4), "delay_events": delay}


def _ewma_interval(y: np.ndarray, halflife: float = 30.0) -> np.ndarray:
    """Stand-in forecasts ``(n, 3)``: median 0, 90 % interval +-1.645 EWMA vols of past labels."""
    sd = pd.Series(y).shift(1).ewm(halflife=halflife, min_periods=30).std().to_numpy()
    sd = np.where(np.isfinite(sd), sd, np.nanstd(y[:500]))
    z = 1.6448536269514722
    return np.c_[-z * sd, np.zeros_like(sd), z * sd]


def _real_data(path: Path, cfg: DriftConfig, seed: int) -> dict[str, Any]:
    """Feature, label and concept drift over the shared file's BTC/USD consensus bars."""
    bars = consensus_bars(path)
    feats = compute_features(bars, Settings())
    labels = make_labels(bars, 1).to_numpy()
    names = [n for n in feats.columns if n not in cfg.exclude_features]
    x = feats[names].to_numpy()
    ok = np.isfinite(x).all(axis=1) & np.isfinite(labels)
    x, y = x[ok], labels[ok]
    forecasts = _ewma_interval(y)
    ts = feats.index.to_numpy()[ok]
    day = 86_400 * 10**9
    n_ref_days = int(np.searchsorted(ts, ts[0] - ts[0] % day + 3 * day))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n_ref_days, 2000, replace=False))
    frame = pd.DataFrame(x[idx], columns=names)
    frame[LABEL_COLUMN] = y[idx]
    zero = {"weight_psi": 0.0, "weight_w1": 0.0, "weight_tvd": 0.0, "weight_kl": 0.0}
    weightings = {"ks_only": cfg.model_copy(update=zero), "default": cfg,
                  "equal": cfg.model_copy(update={k: 1.0 for k in zero} | {"weight_ks": 1.0})}
    out: dict[str, Any] = {"bars": int(len(bars)), "rows": int(len(y)), "features": len(names),
                           "reference_rows": len(idx), "reference_days": 3,
                           "window": cfg.window, "eval_every": cfg.eval_every}
    for span, sl in (("days_1_3", slice(0, n_ref_days)), ("days_4_9", slice(n_ref_days, None))):
        res: dict[str, Any] = {"bars": int(len(y[sl]))}
        for name, c in weightings.items():
            mon = DriftMonitor.from_frames(c, frame, names)
            got: dict[str, list[float]] = {"feature": [], "label": [], "concept": []}
            xs, ys, fs = x[sl], y[sl], forecasts[sl]
            for i in range(0, len(ys), c.eval_every):
                mon.update_features(xs[i: i + c.eval_every])
                mon.update_outcomes(fs[i: i + c.eval_every], ys[i: i + c.eval_every])
                rep = mon.report
                for key, v in (("feature", rep.feature_score), ("label", rep.label_score),
                               ("concept", rep.concept_score)):
                    if v is not None:
                        got[key].append(v)
            res[name] = {}
            for key, vals in got.items():
                a = np.array(vals)
                res[name][key] = None if a.size == 0 else {
                    "evaluations": int(a.size), "median": round(float(np.median(a)), 3),
                    "share_warning": round(float((a >= c.warning_score).mean()), 3),
                    "share_critical": round(float((a >= c.critical_score).mean()), 3)}
        out[span] = res
    return out


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
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "processor": cpu,
            "load_average_1m_end": round(os.getloadavg()[0], 2)}


def run(seed: int = 7, batch: int = 500, detector: str | None = None,
        seeds: int = 20, path: Path | None = SHARED_FILE) -> dict[str, Any]:
    """Run the benchmark and return its result dictionary."""
    load_start = round(os.getloadavg()[0], 2)
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
    eps_500, evals_500 = _monitor_throughput(cfg, reference, live, 500, 50_000)
    eps_1, evals_1 = _monitor_throughput(cfg, reference, live, 1, 5_000)
    calm = [_monitor_alarms(cfg, reference, live)]
    calm += [_monitor_alarms(cfg, *_stream(s)) for s in range(seed + 1, seed + 1 + seeds)]
    delays_m = [c["delay_events"] for c in calm if c["delay_events"] is not None]
    mon = {
        "events_per_s_batch_500": round(eps_500), "evaluations_batch_500": evals_500,
        "events_per_s_single": round(eps_1), "evaluations_single": evals_1,
        "naive_ks_per_event_events_per_s": round(_naive_ks_throughput(cfg, reference, live, 300), 1),
        "window": cfg.window, "eval_every": cfg.eval_every, "reference_rows": N_REFERENCE,
        "weights": {k: getattr(cfg, f"weight_{k}") for k in ("ks", "psi", "w1", "tvd", "kl")},
        "calm": {"seeds": len(calm), "evaluations": sum(c["calm_evaluations"] for c in calm),
                 "false_alarm_evaluations": sum(c["false_alarm_evaluations"] for c in calm),
                 "max_score": max(c["max_score"] for c in calm)},
        "shift": {"delay_events": calm[0]["delay_events"],
                  "delay_median": float(np.median(delays_m)) if delays_m else None,
                  "delay_max": max(delays_m) if delays_m else None,
                  "missed": len(calm) - len(delays_m)},
    }
    real = None
    if path is not None and Path(path).exists():
        real = _real_data(Path(path), cfg, seed)
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
        "real_data": real,
        "real_data_path": str(path) if real is not None else None,
        "machine": {**_machine(), "load_average_1m_start": load_start},
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a summary then the JSON result as the last line."""
    ap = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch", type=int, default=500, help="events per detector call")
    ap.add_argument("--detector", choices=("page_hinkley", "cusum"), default=None,
                    help="default: drift.detector from the config")
    ap.add_argument("--seeds", type=int, default=20, help="extra seeds for the delay distribution")
    ap.add_argument("--path", type=Path, default=SHARED_FILE,
                    help="the shared multi-venue file (real_data section; skipped if missing)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    res = run(seed=args.seed, batch=args.batch, detector=args.detector, seeds=args.seeds,
              path=args.path)
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
    print(f"  full monitor (window KS/PSI/W1/TVD/KL every {m['eval_every']} events + detector): "
          f"{m['events_per_s_batch_500']:,} events/s in batches of 500 "
          f"({m['evaluations_batch_500']:,} evaluations in 50,000 events), "
          f"{m['events_per_s_single']:,} one per call; KS recomputed per event: "
          f"{m['naive_ks_per_event_events_per_s']} events/s")
    c, sh = m["calm"], m["shift"]
    print(f"  monitor level on calm data: {c['false_alarm_evaluations']} of {c['evaluations']:,} "
          f"evaluations at WARNING+ over {c['seeds']} seeds (max score {c['max_score']}); after the "
          f"shift WARNING in {sh['delay_events']} events (median {sh['delay_median']}, max "
          f"{sh['delay_max']}, missed {sh['missed']})")
    if res["real_data"] is not None:
        for span in ("days_1_3", "days_4_9"):
            r = res["real_data"][span]
            parts = [f"{w}: features {r[w]['feature']['share_warning']:.1%} WARNING+ / "
                     f"{r[w]['feature']['share_critical']:.1%} CRITICAL"
                     for w in ("ks_only", "default", "equal")]
            d = r["default"]
            print(f"  real bars {span}: " + "; ".join(parts) + f"; labels {d['label']['share_warning']:.1%}"
                  f", concept {d['concept']['share_warning']:.1%} WARNING+")
    print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
