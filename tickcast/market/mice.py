"""Multiple imputation by chained equations (MICE) of one price series from others.

A gap in one provider's (or one asset's) bar series is imputed from the series of the other
providers over the same minutes: the columns of a matrix are the target and its predictors,
its rows the minutes of a context window around the gap; each missing value is modelled by a
regression on the other columns, and the regressions are iterated (chained equations), so
predictors that have holes of their own still help where they quote. scikit-learn's
:class:`~sklearn.impute.IterativeImputer` with a Bayesian ridge regression is the engine.

*Multiple* imputation: ``imputations`` runs draw from the posterior predictive distribution
(``sample_posterior=True``, one seed each); the imputed value is their mean (Rubin's rule for a
point estimate) and their standard deviation measures its uncertainty.

Prices enter as log prices in basis points, and each row is taken relative to the other
providers' common level in that minute: the mean of the predictors it has, each net of its
median basis against the target. The chained equations then model how the series deviate from
their common level, which is nearly stationary. In raw levels they do not work here: the series
are almost collinear, so when two of them miss the same minutes (the target and a predictor
with a hole of its own) each one's regression leans on the other's imputation, and the pair
stays near the column medians it started from (errors of 100-300 bp on a 40-minute gap in the
tests; 1 bp in this space). Pure: numpy and scikit-learn, no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from tickcast.errors import InvalidInput

__all__ = ["MiceResult", "mice_impute"]

_BP = 1e4


@dataclass(frozen=True)
class MiceResult:
    """Imputed values of the rows asked for.

    Attributes
    ----------
    rows
        Row indices that were imputed (those with at least one predictor observed).
    values
        Mean of the imputations, in the target's units (a price).
    sd_bp
        Standard deviation of the imputations, in bp of the value (0 with one imputation).
    predictors
        Number of predictors observed at each imputed row.
    """

    rows: np.ndarray
    values: np.ndarray
    sd_bp: np.ndarray
    predictors: np.ndarray


def mice_impute(
    target: np.ndarray,
    predictors: np.ndarray,
    rows: np.ndarray,
    *,
    imputations: int = 5,
    max_iter: int = 10,
    min_rows: int = 30,
    seed: int = 0,
) -> MiceResult | None:
    """Impute ``target`` at ``rows`` from ``predictors`` by chained equations.

    Parameters
    ----------
    target
        ``(n,)`` positive prices of the series to fill; NaN where missing.
    predictors
        ``(n, p)`` positive prices of the other series on the same rows; NaN where missing.
    rows
        Indices of the rows to impute (where ``target`` is missing).
    imputations
        Number of imputations (each from its own seed, ``seed + m``).
    max_iter
        Rounds of the chained equations per imputation.
    min_rows
        Fewest rows where the target and at least one used predictor are both observed (the
        training evidence); fewer gives ``None``.
    seed
        Base seed; the same inputs and seed give the same result.

    Returns
    -------
    MiceResult or None
        ``None`` when it cannot be done honestly: no predictor is observed at any asked row, or
        too few training rows. Rows where no predictor is observed are left out of the result.

    Raises
    ------
    InvalidInput
        Shapes disagree, non-positive prices, a row out of range or where the target is known,
        or a count below 1.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> truth = 100.0 * np.exp(np.cumsum(1e-3 * rng.standard_normal(200)))
    >>> others = np.column_stack([truth * 1.001, truth * 0.999]) * np.exp(1e-5 * rng.standard_normal((200, 2)))
    >>> target = truth.copy()
    >>> target[90:110] = np.nan
    >>> res = mice_impute(target, others, np.arange(90, 110))
    >>> float(np.max(np.abs(res.values / truth[90:110] - 1.0) * 1e4)) < 2.0
    True
    """
    y = np.asarray(target, dtype=np.float64)
    x = np.asarray(predictors, dtype=np.float64)
    want = np.asarray(rows, dtype=np.int64)
    n = len(y)
    if x.ndim != 2 or x.shape[0] != n:
        raise InvalidInput(f"predictors must have shape ({n}, p), got {x.shape}", field="predictors")
    for name, arr in (("target", y), ("predictors", x)):
        if (arr[~np.isnan(arr)] <= 0).any() or np.isinf(arr).any():
            raise InvalidInput(f"{name} must be positive finite prices or NaN", field=name)
    if imputations < 1 or max_iter < 1 or min_rows < 1:
        raise InvalidInput("imputations, max_iter and min_rows must be >= 1", field="imputations")
    if len(want) and (want.min() < 0 or want.max() >= n):
        raise InvalidInput(f"rows must lie in [0, {n})", field="rows")
    if len(want) and not np.isnan(y[want]).all():
        raise InvalidInput("rows to impute must be missing in the target", field="rows")

    seen_y = ~np.isnan(y)
    seen_x = ~np.isnan(x)
    # Predictors that quote at some asked row and share minutes with the target.
    cols = np.flatnonzero(seen_x[want].any(axis=0) & (seen_x & seen_y[:, None]).any(axis=0)) if len(want) else []
    if not len(cols):
        return None
    x = x[:, cols]
    seen_x = seen_x[:, cols]
    if int((seen_y & seen_x.any(axis=1)).sum()) < min_rows:
        return None
    fill = want[seen_x[want].any(axis=1)]
    if not len(fill):
        return None

    # Log prices in bp, relative to the predictors' common level of each row (rows without a
    # predictor have no level and are left out).
    logs = np.log(np.column_stack([y, x])) * _BP
    basis = np.array([np.median(logs[seen_y & seen_x[:, k], k + 1] - logs[seen_y & seen_x[:, k], 0])
                      for k in range(x.shape[1])])
    keep = np.flatnonzero(seen_x.any(axis=1))
    level = np.nanmean(logs[keep, 1:] - basis[None, :], axis=1)
    matrix = logs[keep] - level[:, None]
    at = np.searchsorted(keep, fill)

    from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (registers the class)
    from sklearn.impute import IterativeImputer
    from sklearn.linear_model import BayesianRidge

    draws = np.empty((imputations, len(fill)))
    for m in range(imputations):
        imputer = IterativeImputer(estimator=BayesianRidge(), sample_posterior=True,
                                   max_iter=max_iter, random_state=seed + m,
                                   initial_strategy="median", skip_complete=True)
        with warnings.catch_warnings():
            # Posterior draws never "converge" in sklearn's sense; the rounds are the setting.
            warnings.simplefilter("ignore")
            out = imputer.fit_transform(matrix)
        draws[m] = out[at, 0]
    mean_bp = draws.mean(axis=0) + level[at]
    sd = draws.std(axis=0, ddof=1) if imputations > 1 else np.zeros(len(fill))
    return MiceResult(rows=fill, values=np.exp(mean_bp / _BP), sd_bp=sd,
                      predictors=seen_x[fill].sum(axis=1).astype(np.int64))
