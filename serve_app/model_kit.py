"""Real models and real online features for the serving benchmark, tests and demos.

The full training pipeline (:func:`training.pipeline.train_model`) runs a Ray Tune search; a
benchmark or a test needs a genuine model in seconds. This kit trains one the same way minus
the search: the project's feature definition on real bars, XGBoost quantile regression
(:func:`training.fit.fit_final` with the default hyper-parameters), split-conformal
calibration on a held-out slice, ONNX export with the parity check
(:func:`training.onnx_export.export_quantile_model`), registration in the model registry with
the same card fields serving reads.

Bars come from the shared multi-venue file: one venue's 1-minute bars, which is what the
consensus of a single provider is (the consensus bar equals that provider's bar). ``vwap`` is
the mean of the bar's open, high, low and close, the four ticks a replay expands a bar into
with its volume split evenly.

:func:`shift_to_live` moves a bar history forward by a whole number of bars so that its last
bar is the last completed one: a replay at live time, so that served features are fresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tickcast.config import Settings
from tickcast.features.definitions import compute_features, feature_names, schema_hash
from tickcast.storage.online_store import OnlineFeatureStore
from tickcast.ticks import NS_PER_S
from training.conformal import ConformalCalibrator
from training.dataset import build_dataset, split_calibration
from training.engine import NATIVE_FILE
from training.fit import DEFAULT_CONFIG, fit_final
from training.onnx_export import export_quantile_model
from training.registry import ModelRegistry

SIGMA_FEATURE = "rv_short"


def venue_bars(path: str | Path, symbol: str = "BTC/USD", venue: str = "binanceus",
               limit: int | None = None) -> pd.DataFrame:
    """One venue's bars of ``symbol`` from a multi-venue bar file, in the bar-store schema.

    Parameters
    ----------
    path
        The CSV(.gz) file (see ``/work/shared/data/README.md``).
    symbol, venue
        Which series.
    limit
        Keep only the last ``limit`` bars.
    """
    from tickcast.sources.replay import read_bar_file, symbol_to_asset

    asset = symbol_to_asset(symbol)
    replay = read_bar_file(path, (asset,))
    b = replay.bars
    b = b[(b["asset"] == asset) & (b["venue"] == venue)].sort_values("ts")
    if limit is not None:
        b = b.iloc[-limit:]
    o, h, lo, c = (b[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
    return pd.DataFrame({
        "ts": b["ts"].to_numpy(np.int64), "open": o, "high": h, "low": lo, "close": c,
        "volume": b["volume"].to_numpy(np.float64), "vwap": (o + h + lo + c) / 4.0,
        "ticks": np.full(len(b), 4, dtype=np.int64), "providers": np.ones(len(b), dtype=np.int64),
        "confidence": np.zeros(len(b)), "imputed": np.array([""] * len(b), dtype=object),
    }).reset_index(drop=True)


def shift_to_live(bars: pd.DataFrame, freq_ns: int, now_ns: int | None = None) -> pd.DataFrame:
    """The same bars moved by a whole number of bars so the last one closed just now."""
    now = time.time_ns() if now_ns is None else now_ns
    last_open = (now // freq_ns - 1) * freq_ns  # the bar that closed at the latest boundary
    out = bars.copy()
    out["ts"] = out["ts"] + (last_open - int(out["ts"].iloc[-1]))
    return out


@dataclass(frozen=True)
class TrainedModel:
    """A trained, exported and calibrated model, ready to register."""

    onnx_bytes: bytes
    native_json: bytes
    card: dict[str, Any]
    reference: pd.DataFrame


def train_quick_model(settings: Settings, bars: pd.DataFrame, rounds: int = 80, seed: int = 0,
                      config: dict[str, Any] | None = None) -> TrainedModel:
    """Train a three-quantile XGBoost model on ``bars`` (no search), calibrate and export it.

    Raises
    ------
    InvalidInput
        Too few bars for the calibration split.
    ParityError
        The ONNX export disagrees with XGBoost beyond ``model.onnx_parity_tol``.
    """
    m = settings.model
    freq = settings.bars.freq_s * NS_PER_S
    q = tuple(float(x) for x in m.quantiles)
    ds = build_dataset(bars, settings)
    fit_idx, cal_idx = split_calibration(ds, m.calibration_fraction, m.horizon, m.purge_bars, freq)
    fit_ds, cal_ds = ds.take(fit_idx), ds.take(cal_idx)
    params = dict(DEFAULT_CONFIG if config is None else config)
    booster = fit_final(params, fit_ds.features, fit_ds.labels, q, rounds, nthread=1, seed=seed)
    cal_pred = np.asarray(booster.inplace_predict(cal_ds.features), dtype=np.float64)
    sigma = cal_ds.features[:, ds.feature_names.index(SIGMA_FEATURE)].astype(np.float64)
    calibrator = ConformalCalibrator.from_config(m, sigma_feature=SIGMA_FEATURE)
    calibrator.fit_residuals(cal_ds.labels, cal_pred[:, 0], cal_pred[:, 2], sigma=sigma)
    names = list(ds.feature_names)
    onnx_bytes, gap = export_quantile_model(booster, cal_ds.features, q, m.onnx_parity_tol,
                                            metadata={"feature_names": ",".join(names),
                                                      "schema_hash": ds.schema_hash})
    card = {
        "kind": "xgboost_quantile", "quantiles": list(q), "horizon": m.horizon,
        "bar_freq_s": settings.bars.freq_s, "feature_names": names,
        "schema_hash": ds.schema_hash,
        "onnx": {"parity_max_abs_diff": gap, "parity_rows": len(cal_ds), "native_file": NATIVE_FILE},
        "params": {**params, "rounds": rounds, "objective": "reg:quantileerror", "seed": seed},
        "training": {"rows": len(ds), "fit_rows": len(fit_ds), "calibration_rows": len(cal_ds),
                     "start_ns": ds.span[0], "end_ns": ds.span[1], "trainer": "serve_app.model_kit"},
        "conformal": calibrator.state(),
    }
    sample = fit_ds.frame().iloc[-min(len(fit_ds), m.reference_sample_rows):].reset_index(drop=True)
    return TrainedModel(onnx_bytes=onnx_bytes, native_json=bytes(booster.save_raw("json")),
                        card=card, reference=sample)


def register_model(registry: ModelRegistry, asset: str, model: TrainedModel,
                   alias: str | None = "champion", note: str | None = None) -> str:
    """Register ``model`` for ``asset``; returns the version."""
    card = dict(model.card)
    if note:
        card["note"] = note
    return registry.register(asset, model.onnx_bytes, card, model.reference, alias=alias,
                             extra_files={NATIVE_FILE: model.native_json})


def feature_rows(settings: Settings, bars: pd.DataFrame) -> pd.DataFrame:
    """The project's features of every bar (index ``ts``)."""
    return compute_features(bars, settings.features, freq_ns=settings.bars.freq_s * NS_PER_S)


def publish_features(settings: Settings, store: OnlineFeatureStore, asset: str,
                     features: pd.DataFrame, row: int = -1, close: float | None = None) -> int:
    """Write feature row ``row`` of ``features`` as ``asset``'s online features (with the
    bar's ``close`` when given, as the asset actors publish it); returns bar_ts."""
    bar_ts = int(features.index[row])
    store.write(asset, bar_ts, schema_hash(settings.features), list(feature_names(settings.features)),
                features.iloc[row].to_numpy(np.float64), close=close)
    return bar_ts
