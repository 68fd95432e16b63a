"""Concept drift: has the relation P(Y|X) changed, or only the inputs P(X)?

A change of the inputs alone leaves a correct model correct: its quantile forecasts follow the
inputs, and the realized value keeps falling below the forecast ``tau``-quantile with
probability ``tau`` whatever the inputs are. A change of the relation breaks that. So the
concept test watches a residual that a correct model makes independent of the inputs:

``z = (y - m) / (m - lo)`` when ``y < m``, ``(y - m) / (hi - m)`` otherwise,

with ``m`` the median forecast and ``lo``, ``hi`` the outer quantile forecasts (0.05 and 0.95).
For a correct model ``P(z <= -1) = lo level, P(z <= 0) = 0.5, P(z <= 1) = hi level`` for every
input, hence for every input distribution; when the conditional law has one shape across
inputs (location and scale move, shape does not) the whole law of ``z`` is the same for every
input distribution. :class:`~tickcast.monitoring.drift.DriftMonitor` compares a sliding window
of ``z`` with a reference sample of ``z`` (KS, PSI, W1, TVD, KL) -- a drift of the residual
distribution -- and :func:`classify_drift` names what moved.

The limit, stated plainly: the invariance holds only where the model is right. When the inputs
move into a region where the model was wrong all along (a tree model extrapolating), the
residuals move with them although P(Y|X) did not change. A residual drift that comes with an
input drift is therefore reported as :attr:`DriftKind.BOTH` -- it cannot be attributed -- and
only a residual drift on stable inputs as :attr:`DriftKind.CONCEPT`.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from numpy.typing import ArrayLike

from tickcast.errors import InvalidInput


class DriftKind(str, Enum):
    """What moved, from the feature (P(X)) and concept (P(Y|X)) scores."""

    NONE = "none"
    COVARIATE = "covariate"  # inputs moved, residuals stable: the model still holds
    CONCEPT = "concept"  # residuals moved on stable inputs: the relation changed
    BOTH = "covariate_and_concept"  # both moved: the residual drift cannot be attributed


def standardized_residuals(forecasts: ArrayLike, realized: ArrayLike, median: int = 1,
                           lower: int = 0, upper: int = -1) -> np.ndarray:
    """Residuals of realized values in units of the forecast's own half-intervals.

    Parameters
    ----------
    forecasts
        Shape ``(b, Q)``: quantile forecasts, one column per level.
    realized
        Shape ``(b,)``: realized values.
    median, lower, upper
        Columns of the median and of the outer quantiles.

    Returns
    -------
    numpy.ndarray
        Shape ``(b,)``: ``z`` (module notes); NaN where an input is not finite or the
        half-interval on the residual's side is not positive.

    Raises
    ------
    InvalidInput
        Shapes disagree (field ``forecasts``).

    Examples
    --------
    >>> f = [[-2.0, 0.0, 1.0], [-2.0, 0.0, 1.0], [-2.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    >>> standardized_residuals(f, [-1.0, 0.5, 3.0, -1.0]).tolist()
    [-0.5, 0.5, 3.0, nan]
    """
    f = np.asarray(forecasts, dtype=np.float64)
    y = np.asarray(realized, dtype=np.float64)
    if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0]:
        raise InvalidInput(f"forecasts must have shape (b, Q) for {y.shape} realized values, "
                           f"got {f.shape}", field="forecasts")
    m, lo, hi = f[:, median], f[:, lower], f[:, upper]
    d = y - m
    half = np.where(d < 0, m - lo, hi - m)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = d / half
    return np.where(np.isfinite(z) & (half > 0), z, np.nan)


def classify_drift(feature_score: float | None, concept_score: float | None,
                   threshold: float) -> DriftKind:
    """Name what moved: a score at or above ``threshold`` counts as drifted, ``None`` as not.

    Examples
    --------
    >>> classify_drift(0.05, 0.4, 0.15).value, classify_drift(0.4, 0.02, 0.15).value
    ('concept', 'covariate')
    >>> classify_drift(0.4, 0.4, 0.15).value, classify_drift(None, None, 0.15).value
    ('covariate_and_concept', 'none')
    """
    inputs = feature_score is not None and feature_score >= threshold
    relation = concept_score is not None and concept_score >= threshold
    if inputs and relation:
        return DriftKind.BOTH
    if relation:
        return DriftKind.CONCEPT
    if inputs:
        return DriftKind.COVARIATE
    return DriftKind.NONE
