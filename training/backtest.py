"""Backtest a registered model on stored bars: ONNX forecasts + causal adaptive conformal.

Every forecast is what serving would have produced at that bar's close: the registered ONNX
model on features computed from bars up to that bar, and an interval whose conformal offset
starts from the card's state and learns only from labels that had realized by then (label of
row ``t`` becomes usable ``horizon`` rows later). Nothing of the backtest range feeds back into
the model. By default the range starts where the model's training data ended, so a backtest is
out of sample unless the caller asks otherwise (``overlaps_training`` says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tickcast.config import Settings
from tickcast.errors import InvalidInput, RegistryError
from tickcast.features.definitions import schema_hash as feature_schema_hash
from training.conformal import ConformalCalibrator
from training.dataset import build_dataset, iso, load_bars, parse_time
from training.engine import QuantilePredictor
from training.evaluation import evaluate, interval_coverage
from training.registry import ModelRegistry, registry_root
from training.report import write_report


def backtest_model(
    settings: Settings,
    asset: str,
    model: str = "champion",
    start: str | int | None = None,
    end: str | int | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (alias or version) of ``asset`` on bars in ``[start, end)``.

    Returns
    -------
    dict
        :func:`training.evaluation.evaluate` metrics (``coverage_90``, ``interval_width_bp``,
        ``mae``, ``pinball``, ``directional_accuracy``, ``directional_ci95``, ``sharpe``,
        ``dm_vs_random_walk``, ``n``, ``verdict`` ...) plus ``version``, the range, the raw
        (uncalibrated) coverage, ``overlaps_training`` and the report paths.

    Raises
    ------
    NotFound
        Unknown alias or version.
    RegistryError
        The model was trained on another feature schema than the current config computes.
    InvalidInput
        No labeled bars in the range, bad times.
    """
    m = settings.model
    registry = ModelRegistry(registry_root(settings))
    version = registry.resolve(asset, model)
    card = registry.card(asset, version)
    current = feature_schema_hash(settings.features)
    if card.get("schema_hash") != current:
        raise RegistryError(f"model {version} was trained on feature schema "
                            f"{card.get('schema_hash')}, the config computes {current}",
                            field="schema_hash")
    train_end = card.get("training", {}).get("end_exclusive_ns")
    start_ns = parse_time(start, "start")
    if start_ns is None:
        start_ns = int(train_end) if train_end is not None else None
    end_ns = parse_time(end, "end")
    if start_ns is not None and end_ns is not None and end_ns <= start_ns:
        raise InvalidInput(f"end {iso(end_ns)} is not after start {iso(start_ns)}", field="end")

    bars = load_bars(settings, asset, start_ns, end_ns, realize_labels=True)
    ds = build_dataset(bars, settings, start_ns, end_ns, asset=asset)
    if list(ds.feature_names) != list(card["feature_names"]):
        raise RegistryError("feature names differ from the model card", field="feature_names")
    predictor = QuantilePredictor(registry.model_bytes(asset, version))  # ONNX, as served
    pred = predictor.predict(ds.features).astype(np.float64)
    conformal = card.get("conformal")
    if not conformal:
        raise RegistryError(f"model {version} has no conformal state", field="conformal")
    cal = ConformalCalibrator.from_state(conformal)
    sigma_col = ds.feature_names.index(cal.sigma_feature)
    lo, hi = cal.rolling_intervals(ds.labels, pred[:, 0], pred[:, 2],
                                   sigma=ds.features[:, sigma_col].astype(np.float64),
                                   horizon=m.horizon)
    metrics = evaluate(ds.labels, pred[:, 0], pred[:, 1], pred[:, 2], m.fee_bp, lo=lo, hi=hi,
                       horizon=m.horizon, quantiles=tuple(card.get("quantiles", m.quantiles)))
    first, last = ds.span
    out: dict[str, Any] = {
        "asset": asset, "model": model, "version": version,
        "start": iso(first), "end": iso(last),
        **metrics,
        "coverage_90_raw": interval_coverage(ds.labels, pred[:, 0], pred[:, 2]),
        "conformal_offset_end": cal.offset,
        "overlaps_training": bool(train_end is not None and first < int(train_end)),
    }
    if report:
        out_dir = Path(settings.data_dir) / "reports"
        name = f"backtest-{asset}-{version}-{iso(first)}-{iso(last)}".replace(":", "")
        png, page = write_report(
            out_dir, name, ds.ts, ds.labels, pred[:, 1], lo, hi, metrics, m.fee_bp,
            title=f"{asset} {version} backtest {iso(first)} .. {iso(last)}")
        out["report"] = str(page)
        out["report_png"] = str(png)
    return out
