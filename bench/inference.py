"""Inference latency of the exported quantile model: ONNX vs native XGBoost.

``python -m bench.inference [--rounds 300] [--depth 6] [--features 25]``

Fits a three-quantile XGBoost model (``--rounds`` boosting rounds of depth ``--depth``; one tree
per quantile per round, so 3 x rounds trees) on synthetic data made here, exports it to the
served ONNX contract (one session run returns all three quantiles) and measures:

- ONNX single-row latency p50/p99 (µs) and 1,000-row batch latency p50/p99 (ms) with one and
  two intra-op threads;
- native XGBoost ``inplace_predict`` on the same booster, one and two threads;
- the batch size from which native beats ONNX (the :class:`training.engine.QuantilePredictor`
  switch point, config ``model.native_min_rows``), and what the predictor achieves with it;
- as a reference point, the same figures for a single-quantile model of ``--rounds`` trees.

The last line is one JSON object. Timings are wall-clock on a shared machine: compare figures
taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

import numpy as np
import xgboost as xgb

from training.engine import QuantilePredictor
from training.onnx_export import export_quantile_model

QUANTILES = (0.05, 0.5, 0.95)
BATCH_SIZES = (1, 4, 16, 32, 64, 128, 256, 1000)


def _synthetic(rows: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return-like data: heavy-tailed noise, a weak nonlinear signal, volatility clustering."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features)).astype(np.float32)
    vol = 1e-3 * np.exp(0.3 * x[:, 1])
    signal = 3e-4 * np.tanh(x[:, 0]) + 2e-4 * x[:, 2] * (x[:, 3] > 0)
    y = signal + vol * rng.standard_t(4, rows) / np.sqrt(2.0)
    return x, y.astype(np.float32)


def _timed(fn: Callable[[], object], repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def _pct(samples: np.ndarray, scale: float) -> dict[str, float]:
    return {"p50": round(float(np.percentile(samples, 50)) * scale, 2),
            "p99": round(float(np.percentile(samples, 99)) * scale, 2)}


def _measure(onnx_bytes: bytes, native: bytes, x: np.ndarray, repeats_single: int,
             repeats_batch: int) -> dict[str, object]:
    """Latency of every engine/thread combination on one model."""
    rng = np.random.default_rng(1)
    rows = [x[i:i + 1] for i in rng.integers(0, len(x) - 1, 256)]
    batch = x[:1000]
    out: dict[str, object] = {}
    preds: dict[str, QuantilePredictor] = {}
    for threads in (1, 2):
        pred = QuantilePredictor(onnx_bytes, native, onnx_threads=threads, native_threads=threads)
        preds[f"{threads}"] = pred
        it = iter(range(10**9))
        single_onnx = _timed(lambda: pred.predict_onnx(rows[next(it) % len(rows)]),
                             repeats_single, 200)
        batch_onnx = _timed(lambda: pred.predict_onnx(batch), repeats_batch, 3)
        single_nat = _timed(lambda: pred.predict_native(rows[next(it) % len(rows)]),
                            max(200, repeats_single // 10), 20)
        batch_nat = _timed(lambda: pred.predict_native(batch), repeats_batch, 3)
        out[f"threads_{threads}"] = {
            "onnx_single_us": _pct(single_onnx, 1e6), "onnx_batch1000_ms": _pct(batch_onnx, 1e3),
            "native_single_us": _pct(single_nat, 1e6),
            "native_batch1000_ms": _pct(batch_nat, 1e3),
        }
    return {"latency": out, "predictors": preds}


def _crossover(pred: QuantilePredictor, x: np.ndarray, repeats: int) -> dict[str, object]:
    """Median latency per batch size for both engines, and the first size where native wins."""
    table = []
    switch = None
    for n in BATCH_SIZES:
        chunk = x[:n]
        t_onnx = float(np.median(_timed(lambda: pred.predict_onnx(chunk), repeats, 5)))
        t_nat = float(np.median(_timed(lambda: pred.predict_native(chunk), repeats, 5)))
        table.append({"rows": n, "onnx_us": round(t_onnx * 1e6, 1),
                      "native_us": round(t_nat * 1e6, 1)})
        if switch is None and t_nat < t_onnx:
            switch = n
    return {"table": table, "native_wins_from_rows": switch}


def run(rounds: int, depth: int, n_features: int, train_rows: int, seed: int,
        repeats_single: int, repeats_batch: int, reference: bool) -> dict[str, object]:
    """Fit, export, measure; returns the result dictionary."""
    x, y = _synthetic(train_rows, n_features, seed)
    x_val = x[-5000:]
    dtrain = xgb.DMatrix(x[:-5000], label=y[:-5000])
    params = {"objective": "reg:quantileerror", "quantile_alpha": list(QUANTILES),
              "max_depth": depth, "eta": 0.05, "tree_method": "hist", "nthread": 2,
              "min_child_weight": 1.0, "seed": seed}
    t0 = time.perf_counter()
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    fit_s = time.perf_counter() - t0
    onnx_bytes, gap = export_quantile_model(booster, x_val, QUANTILES, tol=1e-5)
    native = bytes(booster.save_raw("json"))
    measured = _measure(onnx_bytes, native, x_val, repeats_single, repeats_batch)
    two = measured["predictors"]["2"]  # type: ignore[index]
    cross = _crossover(two, x_val, max(20, repeats_batch // 2))
    switch = int(cross["native_wins_from_rows"] or 10**9)  # type: ignore[arg-type]
    auto = QuantilePredictor(onnx_bytes, native, native_min_rows=switch, onnx_threads=2,
                             native_threads=2)
    auto_single = _timed(lambda: auto.predict(x_val[:1]), repeats_single, 100)
    auto_batch = _timed(lambda: auto.predict(x_val[:1000]), repeats_batch, 3)
    result: dict[str, object] = {
        "bench": "inference",
        "model": {"quantiles": list(QUANTILES), "rounds_per_quantile": rounds,
                  "trees": rounds * len(QUANTILES), "max_depth": depth, "features": n_features,
                  "train_rows": train_rows - 5000, "fit_s": round(fit_s, 2),
                  "onnx_bytes": len(onnx_bytes), "parity_max_abs_diff": gap},
        **measured["latency"],  # type: ignore[dict-item]
        "crossover_threads_2": cross,
        "predictor_auto_threads_2": {
            "native_min_rows": switch, "single_us": _pct(auto_single, 1e6),
            "batch1000_ms": _pct(auto_batch, 1e3),
            "engines": {"1": auto.engine_for(1), "1000": auto.engine_for(1000)}},
        "targets": {"onnx_single_us_p50": 20.0, "batch1000_ms": 5.0},
    }
    if reference:
        # A single-quantile model of `rounds` trees: what one quantile alone costs.
        p1 = dict(params, quantile_alpha=0.5)
        b1 = xgb.train(p1, dtrain, num_boost_round=rounds)
        o1, _ = export_quantile_model(b1, x_val, (0.5,), tol=1e-5)
        ref = _measure(o1, bytes(b1.save_raw("json")), x_val, repeats_single, repeats_batch)
        result["single_quantile_reference"] = {"trees": rounds, **ref["latency"]}  # type: ignore[dict-item]
    result["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                         "cpu_count": os.cpu_count(), "processor": platform.processor() or None,
                         "xgboost": xgb.__version__, "onnxruntime": _ort_version(),
                         "load_avg_1m": round(os.getloadavg()[0], 2)}
    return result


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a summary then the JSON result as the last line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300, help="boosting rounds per quantile")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--features", type=int, default=25)
    ap.add_argument("--train-rows", type=int, default=25_000)
    ap.add_argument("--repeats-single", type=int, default=3000)
    ap.add_argument("--repeats-batch", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the single-quantile reference model")
    args = ap.parse_args(argv)
    if min(args.rounds, args.depth, args.features, args.repeats_single, args.repeats_batch) < 1 \
            or args.train_rows < 6000:
        ap.error("sizes must be positive and --train-rows >= 6000")
    res = run(args.rounds, args.depth, args.features, args.train_rows, args.seed,
              args.repeats_single, args.repeats_batch, not args.no_reference)
    for th in ("threads_1", "threads_2"):
        lat = res[th]  # type: ignore[index]
        print(f"{th}: onnx single p50 {lat['onnx_single_us']['p50']} us, "
              f"1000 rows p50 {lat['onnx_batch1000_ms']['p50']} ms; native single p50 "
              f"{lat['native_single_us']['p50']} us, 1000 rows p50 "
              f"{lat['native_batch1000_ms']['p50']} ms", file=sys.stderr)
    print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
