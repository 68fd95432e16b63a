"""The training pipeline behind ``tickcast train`` and ``python -m training.retrain``.

bars (BarStore) → features + labels → [fit range | purge | calibration slice] →
walk-forward folds of the fit range → Ray Tune (ASHA) → best configuration refit on the whole
fit range → conformal calibration on the held-out calibration slice → ONNX export + parity →
registry (``champion`` when the asset has none, else ``challenger``).

The reported validation metrics are out-of-fold: each walk-forward fold's model (best
configuration, best round count) predicts its own validation chunk, the chunks are laid end to
end in time, and a fresh conformal calibrator widens the interval causally as their labels
arrive (so the first rows of the first chunk are uncalibrated). None of those rows was used to
fit the model that predicted it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tickcast.config import Settings
from tickcast.errors import InvalidInput
from training.conformal import ConformalCalibrator
from training.dataset import (Dataset, build_dataset, freq_ns, iso,
                              load_bars, parse_time, split_calibration, walk_forward_folds)
from training.engine import NATIVE_FILE
from training.evaluation import evaluate, interval_coverage
from training.fit import fit_final, fit_walk_forward, fold_arrays
from training.onnx_export import INPUT_NAME, OUTPUT_NAME, export_quantile_model
from training.registry import ModelRegistry, code_version, registry_root

SIGMA_FEATURE = "rv_short"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sigma(ds: Dataset, name: str = SIGMA_FEATURE) -> np.ndarray:
    """The conformal volatility scale column of ``ds``."""
    if name not in ds.feature_names:
        raise InvalidInput(f"feature '{name}' (conformal scale) not in the feature schema",
                           field="features")
    return ds.features[:, ds.feature_names.index(name)].astype(np.float64)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat numeric metrics of an :func:`evaluate` dict (what ``registry.compare`` diffs)."""
    out = {k: metrics[k] for k in ("pinball", "coverage_90", "interval_width_bp", "mae", "rmse",
                                   "directional_accuracy", "sharpe", "total_return", "n")
           if k in metrics}
    dm = metrics.get("dm_vs_random_walk", {})
    out["dm_stat"] = dm.get("stat")
    out["dm_p"] = dm.get("p")
    return out


def reference_sample(ds: Dataset, rows: int) -> pd.DataFrame:
    """Evenly spaced rows of ``ds`` (``ts``, features, ``label``): the drift monitor's reference.

    The ``label`` column is label drift's reference (``tickcast.monitoring.drift.LABEL_COLUMN``).
    """
    n = len(ds)
    idx = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(int))
    frame = pd.DataFrame(ds.features[idx], columns=list(ds.feature_names))
    frame.insert(0, "ts", ds.ts[idx])
    frame["label"] = ds.labels[idx]
    return frame


def train_model(
    settings: Settings,
    asset: str,
    train_start: str | int | None = None,
    train_end: str | int | None = None,
    trials: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Train, calibrate, export and register a model of ``asset``; returns the summary.

    Parameters
    ----------
    settings
        Configuration (data dir, model, tune sections).
    asset
        Asset whose consensus bars are read from ``<data_dir>/bars``.
    train_start, train_end
        Training range (ISO-8601 or ns; end exclusive). Labels never look past ``train_end``.
    trials
        Tune trials (default ``tune.trials``).
    seed
        Seeds the search and XGBoost.
    log
        Progress lines (stderr by default: stdout ends with the JSON summary).

    Raises
    ------
    InvalidInput
        No bars, too few rows for the splits, bad times.
    ParityError
        The ONNX export disagrees with XGBoost beyond ``model.onnx_parity_tol``.
    """
    from tickcast.ray_runtime import connect_ray, disconnect_ray
    from training.tuning import run_tune

    t_start = time.monotonic()
    m = settings.model
    f = freq_ns(settings)
    q = tuple(float(x) for x in m.quantiles)
    start_ns = parse_time(train_start, "train_start")
    end_ns = parse_time(train_end, "train_end")
    bars = load_bars(settings, asset, start_ns, end_ns)
    if bars.empty:
        raise InvalidInput(f"no consensus bars of {asset} under {settings.data_dir}/bars",
                           field="asset")
    ds = build_dataset(bars, settings, start_ns, end_ns, asset=asset)
    fit_idx, cal_idx = split_calibration(ds, m.calibration_fraction, m.horizon, m.purge_bars, f)
    fit_ds, cal_ds = ds.take(fit_idx), ds.take(cal_idx)
    folds = walk_forward_folds(fit_ds.ts, m.walk_forward_folds, m.horizon, m.purge_bars, f)
    arrays = fold_arrays(fit_ds, folds)
    log(f"train {asset}: {len(bars)} bars, {len(ds)} labeled rows {iso(ds.span[0])} .. "
        f"{iso(ds.span[1])}; fit {len(fit_ds)}, calibration {len(cal_ds)}, "
        f"{len(folds)} walk-forward folds, purge {m.purge_bars} bars")

    conn = connect_ray(settings)
    try:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        outcome = run_tune(settings, arrays, Path(settings.data_dir) / "tune",
                           name=f"{asset}-{stamp}-{os.getpid()}", trials=trials, seed=seed)
    finally:
        disconnect_ray(conn)
    log(f"tune: {outcome.trials} trials in {outcome.seconds:.1f} s ({outcome.concurrency} at "
        f"once, {outcome.stopped_early} stopped early by ASHA); best pinball "
        f"{outcome.loss:.4g} at {outcome.rounds} rounds: {json.dumps(outcome.config)}")

    nthread = max(1, os.cpu_count() or 1)
    # Out-of-fold validation of the chosen configuration.
    wf = fit_walk_forward(outcome.config, arrays, q, max_rounds=outcome.rounds,
                          report_every=outcome.rounds, nthread=nthread, seed=seed,
                          keep_predictions=True)
    val_idx = np.concatenate([fo.val for fo in folds])
    val_ds = fit_ds.take(val_idx)
    oof = np.concatenate(wf.predictions)
    val_cal = ConformalCalibrator.from_config(m, sigma_feature=SIGMA_FEATURE)
    lo, hi = val_cal.rolling_intervals(val_ds.labels, oof[:, 0], oof[:, 2], sigma=_sigma(val_ds),
                                       horizon=m.horizon)
    validation = evaluate(val_ds.labels, oof[:, 0], oof[:, 1], oof[:, 2], m.fee_bp, lo=lo, hi=hi,
                          horizon=m.horizon, quantiles=q)
    validation["coverage_90_raw"] = interval_coverage(val_ds.labels, oof[:, 0], oof[:, 2])

    # The model that ships: all fit rows, then calibrated on the held-out slice.
    booster = fit_final(outcome.config, fit_ds.features, fit_ds.labels, q, outcome.rounds,
                        nthread=nthread, seed=seed)
    cal_pred = np.asarray(booster.inplace_predict(cal_ds.features), dtype=np.float64)
    calibrator = ConformalCalibrator.from_config(m, sigma_feature=SIGMA_FEATURE)
    calibrator.fit_residuals(cal_ds.labels, cal_pred[:, 0], cal_pred[:, 2], sigma=_sigma(cal_ds))
    calibration = evaluate(cal_ds.labels, cal_pred[:, 0], cal_pred[:, 1], cal_pred[:, 2],
                           m.fee_bp, horizon=m.horizon, quantiles=q)

    names = list(ds.feature_names)
    onnx_bytes, gap = export_quantile_model(
        booster, cal_ds.features, q, m.onnx_parity_tol,
        metadata={"asset": asset, "feature_names": json.dumps(names),
                  "schema_hash": ds.schema_hash})
    log(f"export: ONNX parity max |onnx - xgboost| = {gap:.2e} on {len(cal_ds)} rows")

    registry = ModelRegistry(registry_root(settings))
    aliases = registry.aliases(asset)
    alias = registry.default_alias(asset)
    card: dict[str, Any] = {
        "asset": asset,
        "kind": "xgboost_quantile",
        "quantiles": list(q),
        "horizon": m.horizon,
        "bar_freq_s": settings.bars.freq_s,
        "feature_names": names,
        "schema_hash": ds.schema_hash,
        "onnx": {"input": INPUT_NAME, "output": OUTPUT_NAME, "parity_max_abs_diff": gap,
                 "parity_rows": len(cal_ds), "native_file": NATIVE_FILE},
        "training": {
            "requested_start": iso(start_ns) if start_ns is not None else None,
            "requested_end": iso(end_ns) if end_ns is not None else None,
            "start": iso(ds.span[0]), "end": iso(ds.span[1]),
            "start_ns": ds.span[0], "end_ns": ds.span[1],
            "end_exclusive_ns": end_ns if end_ns is not None else ds.span[1] + f,
            "rows": len(ds), "fit_rows": len(fit_ds), "calibration_rows": len(cal_ds),
            "calibration_start": iso(cal_ds.span[0]), "purge_bars": m.purge_bars,
            "walk_forward_folds": len(folds),
        },
        "params": {**outcome.config, "rounds": outcome.rounds, "objective": "reg:quantileerror",
                   "seed": seed},
        "tune": {"trials": outcome.trials, "seconds": outcome.seconds,
                 "stopped_early": outcome.stopped_early, "errors": outcome.errors,
                 "concurrency": outcome.concurrency, "best_pinball": outcome.loss},
        "metrics": {**headline(validation), "validation": validation,
                    "calibration_slice": calibration},
        "conformal": calibrator.state(),
        "parent_version": aliases.get("champion"),
        "code_version": code_version(),
    }
    version = registry.register(
        asset, onnx_bytes, card, reference_sample(fit_ds, m.reference_sample_rows), alias=alias,
        extra_files={NATIVE_FILE: bytes(booster.save_raw("json"))})
    log(f"registered {asset} {version} as {alias} in {registry.root}")
    dm = validation["dm_vs_random_walk"]
    return {
        "asset": asset, "version": version, "alias": alias,
        "registry": str(registry.root),
        "validation": {k: validation[k] for k in (
            "n", "pinball", "coverage_90", "coverage_90_raw", "interval_width_bp", "mae",
            "directional_accuracy", "directional_ci95", "sharpe", "verdict")},
        "dm_vs_random_walk": {"stat": dm["stat"], "p": dm["p"],
                              "p_model_better": dm["p_model_better"]},
        "conformal_offset": calibrator.offset,
        "parity_max_abs_diff": gap,
        "params": card["params"],
        "tune_seconds": round(outcome.seconds, 2),
        "trials": outcome.trials, "stopped_early": outcome.stopped_early,
        "seconds": round(time.monotonic() - t_start, 2),
    }
