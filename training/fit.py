"""Pure XGBoost quantile fitting: walk-forward validation and the final fit (no Ray here).

One booster serves all quantiles: objective ``reg:quantileerror`` with
``quantile_alpha=[0.05, 0.5, 0.95]`` grows one tree per quantile per round. The score is the
pinball loss averaged over the three quantiles and over every validation row of every fold
(rows of later, larger folds weigh as much as rows of earlier ones).

The fold boosters advance in lockstep, one boosting round each at a time (what ``xgb.train``
does for one booster), so that every ``report_every`` rounds one number — the walk-forward
validation loss at that many rounds — can be reported; a scheduler (ASHA under Ray Tune) stops a
poor configuration at the first report that ranks it low. Validation predictions come from
XGBoost's prediction cache (each fold's validation matrix is cached by its booster), so a report
costs one tree layer of prediction, not the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xgboost as xgb

from tickcast.errors import InvalidInput
from training.dataset import Dataset, Fold
from training.evaluation import pinball_loss

# Hyper-parameters a config may set, with the type XGBoost wants.
TUNABLE: dict[str, type] = {
    "max_depth": int, "eta": float, "min_child_weight": float, "subsample": float,
    "colsample_bytree": float, "colsample_bylevel": float, "lambda": float, "alpha": float,
    "gamma": float, "max_bin": int, "max_leaves": int,
}
DEFAULT_CONFIG: dict[str, Any] = {"max_depth": 4, "eta": 0.05, "min_child_weight": 20.0,
                                  "subsample": 0.8, "colsample_bytree": 0.8, "lambda": 1.0}


def booster_params(config: Mapping[str, Any], quantiles: Sequence[float], nthread: int,
                   seed: int = 0) -> dict[str, Any]:
    """Full XGBoost parameters for a hyper-parameter ``config``.

    Raises
    ------
    InvalidInput
        Unknown or non-numeric hyper-parameter (naming it).

    Examples
    --------
    >>> p = booster_params({"max_depth": 3.0}, (0.05, 0.5, 0.95), nthread=1)
    >>> p["max_depth"], p["quantile_alpha"], p["objective"]
    (3, [0.05, 0.5, 0.95], 'reg:quantileerror')
    """
    params: dict[str, Any] = {
        "objective": "reg:quantileerror",
        # Plain floats: XGBoost's JSON parser rejects numpy scalars here.
        "quantile_alpha": [float(q) for q in quantiles],
        "tree_method": "hist",
        "nthread": int(nthread),
        "seed": int(seed),
        "verbosity": 0,
    }
    for key, value in config.items():
        if key not in TUNABLE:
            raise InvalidInput(f"unknown XGBoost hyper-parameter '{key}'", field=f"params.{key}")
        try:
            params[key] = TUNABLE[key](value)
        except (TypeError, ValueError):
            raise InvalidInput(f"hyper-parameter '{key}'={value!r} is not a number",
                               field=f"params.{key}") from None
    return params


@dataclass(frozen=True)
class FoldArrays:
    """Numpy arrays of one fold (picklable: Tune ships them to trial workers)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def fold_arrays(ds: Dataset, folds: Sequence[Fold]) -> list[FoldArrays]:
    """Materialize ``folds`` of ``ds`` as arrays."""
    return [FoldArrays(ds.features[f.train], ds.labels[f.train], ds.features[f.val],
                       ds.labels[f.val]) for f in folds]


def mean_pinball(y: np.ndarray, pred: np.ndarray, quantiles: Sequence[float]) -> float:
    """Pinball loss averaged over the quantile columns of ``pred`` ``[N, Q]``."""
    return float(np.mean([pinball_loss(y, pred[:, j], q) for j, q in enumerate(quantiles)]))


@dataclass
class WalkForwardResult:
    """Outcome of :func:`fit_walk_forward`.

    Attributes
    ----------
    best_rounds
        Rounds with the lowest validation loss among the reported ones.
    best_loss
        That loss (mean pinball over quantiles and validation rows).
    history
        ``(rounds, loss)`` at every report.
    predictions
        Per fold, validation predictions ``[n_val, Q]`` at ``best_rounds`` (when requested).
    """

    best_rounds: int
    best_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)
    predictions: list[np.ndarray] = field(default_factory=list)


def fit_walk_forward(
    config: Mapping[str, Any],
    folds: Sequence[FoldArrays],
    quantiles: Sequence[float],
    max_rounds: int,
    report_every: int,
    nthread: int = 1,
    seed: int = 0,
    on_report: Callable[[int, float], None] | None = None,
    keep_predictions: bool = False,
) -> WalkForwardResult:
    """Boost one quantile model per fold in lockstep and score them every ``report_every`` rounds.

    Parameters
    ----------
    config
        Hyper-parameters (keys of :data:`TUNABLE`).
    folds
        Walk-forward folds.
    quantiles
        Quantile levels (model output columns).
    max_rounds
        Boosting rounds at most.
    report_every
        Score (and call ``on_report``) every this many rounds and after the last one.
    nthread
        XGBoost threads per booster.
    seed
        XGBoost seed (row/column subsampling).
    on_report
        Called as ``on_report(rounds, loss)``; under Tune it reports, and the scheduler may end
        the trial inside this call.
    keep_predictions
        Also return each fold's validation predictions at the best round count.

    Raises
    ------
    InvalidInput
        No folds, or bad round counts.
    """
    if not folds:
        raise InvalidInput("no walk-forward folds", field="folds")
    if max_rounds < 1 or report_every < 1:
        raise InvalidInput("max_rounds and report_every must be >= 1", field="tune.max_rounds")
    params = booster_params(config, quantiles, nthread, seed)
    mats = []
    boosters = []
    for f in folds:
        dtrain = xgb.DMatrix(f.x_train, label=f.y_train, nthread=nthread)
        dval = xgb.DMatrix(f.x_val, label=f.y_val, nthread=nthread)
        mats.append((dtrain, dval))
        boosters.append(xgb.Booster(params, [dtrain, dval]))
    weights = np.array([len(f.y_val) for f in folds], dtype=np.float64)
    weights /= weights.sum()
    result = WalkForwardResult(best_rounds=0, best_loss=math.inf)
    for it in range(max_rounds):
        for booster, (dtrain, _) in zip(boosters, mats):
            booster.update(dtrain, it)
        rounds = it + 1
        if rounds % report_every and rounds != max_rounds:
            continue
        losses = [mean_pinball(f.y_val, b.predict(dval), quantiles)
                  for f, b, (_, dval) in zip(folds, boosters, mats)]
        loss = float(np.dot(weights, losses))
        result.history.append((rounds, loss))
        if loss < result.best_loss:
            result.best_loss, result.best_rounds = loss, rounds
        if on_report is not None:
            on_report(rounds, loss)
    if keep_predictions:
        result.predictions = [
            np.asarray(b.predict(dval, iteration_range=(0, result.best_rounds)))
            for b, (_, dval) in zip(boosters, mats)]
    return result


def fit_final(config: Mapping[str, Any], x: np.ndarray, y: np.ndarray,
              quantiles: Sequence[float], rounds: int, nthread: int = 1,
              seed: int = 0) -> xgb.Booster:
    """Fit the model that gets exported: ``rounds`` rounds on all of ``x, y``.

    Raises
    ------
    InvalidInput
        Empty data or ``rounds < 1``.
    """
    if len(y) == 0:
        raise InvalidInput("no rows to fit", field="bars")
    if rounds < 1:
        raise InvalidInput("rounds must be >= 1", field="rounds")
    params = booster_params(config, quantiles, nthread, seed)
    dtrain = xgb.DMatrix(x, label=y, nthread=nthread)
    return xgb.train(params, dtrain, num_boost_round=int(rounds))
