"""Per-request explanations: each feature's contribution to the median forecast (TreeSHAP).

The served engines (the compiled kernel, onnxruntime) only score. Explanations come from the
registry version's native XGBoost booster (``model.xgb.json``, beside the ONNX file), whose
``predict(..., pred_contribs=True)`` is XGBoost's exact TreeSHAP: for one row, one
contribution per feature plus a bias, summing to the booster's raw output. The ONNX graph is
exported from that booster with a parity check, so the contributions add up to the served
median (within float32 rounding).

The booster is loaded on the first explanation a replica is asked for, never before: serving
without ``explain`` holds no native booster in memory and pays nothing for this module.
Identical model files (a pooled model) share one :class:`NativeExplainer`.

No Ray, no Redis here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tickcast.errors import RegistryError, ServiceUnavailable

# The API's contract (issue 14): the five features contributing most, by magnitude.
TOP_FEATURES = 5
METHOD = "xgboost_treeshap"


@dataclass(frozen=True)
class Contribution:
    """One feature's share of the median forecast."""

    feature: str
    value: float | None  # the feature's value in the explained row (None: missing)
    contribution: float  # in log-return units, like the forecast

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"feature": self.feature, "value": self.value, "contribution": self.contribution}


@dataclass(frozen=True)
class Explanation:
    """The median forecast split into a base value and per-feature contributions.

    ``base_value + sum(c.contribution for c in top) + rest`` equals the booster's median.
    """

    target: str  # which output is explained, e.g. "q0.5"
    base_value: float
    top: tuple[Contribution, ...]
    rest: float  # sum of the contributions of every feature not in ``top``
    n_features: int

    @property
    def total(self) -> float:
        """The booster's median for the row (what the contributions add up to)."""
        return self.base_value + sum(c.contribution for c in self.top) + self.rest

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (schema :class:`serve_app.schemas.Explanation`)."""
        return {"method": METHOD, "target": self.target, "base_value": self.base_value,
                "contributions": [c.to_dict() for c in self.top],
                "other_features": self.rest, "n_features": self.n_features}


def top_contributions(contribs: np.ndarray, x: np.ndarray, names: Sequence[str], target: str,
                      k: int = TOP_FEATURES) -> Explanation:
    """The ``k`` largest contributions by magnitude (ties: column order) of one row.

    Parameters
    ----------
    contribs
        ``F + 1`` values: one per feature, then the bias (XGBoost's layout).
    x
        The row's ``F`` feature values (NaN: missing).
    names
        The ``F`` feature names.

    Examples
    --------
    >>> e = top_contributions(np.array([0.1, -0.3, 0.0, 0.05]), np.array([1.0, np.nan, 2.0]),
    ...                       ["a", "b", "c"], "q0.5", k=2)
    >>> [(c.feature, c.value, c.contribution) for c in e.top], round(e.rest, 6), e.base_value
    ([('b', None, -0.3), ('a', 1.0, 0.1)], 0.0, 0.05)
    >>> round(e.total, 6)
    -0.15
    """
    contribs = np.asarray(contribs, dtype=np.float64).ravel()
    n = len(names)
    if contribs.shape != (n + 1,) or np.asarray(x).size != n:
        raise ValueError(f"need {n} + 1 contributions and {n} values, got {contribs.shape[0]} "
                         f"and {np.asarray(x).size}")
    per_feature = contribs[:n]
    order = np.argsort(-np.abs(per_feature), kind="stable")[:k]
    row = np.asarray(x, dtype=np.float64).ravel()
    top = tuple(Contribution(feature=str(names[i]),
                             value=float(row[i]) if np.isfinite(row[i]) else None,
                             contribution=float(per_feature[i])) for i in order.tolist())
    rest = float(per_feature.sum() - per_feature[order].sum())
    return Explanation(target=target, base_value=float(contribs[n]), top=top, rest=rest,
                       n_features=n)


class NativeExplainer:
    """TreeSHAP of one model's native booster, loaded from ``path`` on first use.

    Parameters
    ----------
    path
        The registry version's ``model.xgb.json``.
    feature_names
        The model's input columns, in order.
    target_index, target
        Which output to explain (the median: column 1 of the three quantiles) and its label.
    threads
        XGBoost threads for the explanation.
    """

    def __init__(self, path: str | Path, feature_names: Sequence[str], target_index: int = 1,
                 target: str = "q0.5", threads: int = 1) -> None:
        self.path = Path(path)
        self.feature_names = tuple(feature_names)
        self.target_index = int(target_index)
        self.target = target
        self.threads = int(threads)
        self._booster: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """The booster is in memory (an explanation was asked for)."""
        return self._booster is not None

    def _load(self) -> Any:
        import xgboost as xgb

        if not self.path.is_file():
            raise ServiceUnavailable(f"no explanation for this model: its registry version has "
                                     f"no native booster ({self.path.name})", field="explain")
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(self.path.read_bytes()))
        except (xgb.core.XGBoostError, OSError) as exc:
            raise RegistryError(f"cannot load native booster {self.path}: {exc}",
                                field=self.path.name) from None
        booster.set_param({"nthread": self.threads})
        return booster

    def explain(self, x: np.ndarray, k: int = TOP_FEATURES) -> Explanation:
        """The top ``k`` feature contributions to the median for row ``x`` (``[1, F]``).

        Raises
        ------
        ServiceUnavailable
            The version has no native booster file (nothing to explain with).
        RegistryError
            The booster file cannot be loaded, or its output does not match the model.
        """
        import xgboost as xgb

        row = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
        with self._lock:  # one load; Booster.predict on a shared booster, one call at a time
            if self._booster is None:
                self._booster = self._load()
            contribs = self._booster.predict(xgb.DMatrix(row, missing=np.nan), pred_contribs=True)
        contribs = np.asarray(contribs, dtype=np.float64)
        if contribs.ndim == 3:  # [rows, targets, F + 1]: a multi-output (quantile) booster
            if self.target_index >= contribs.shape[1]:
                raise RegistryError(f"native booster has {contribs.shape[1]} outputs, no "
                                    f"{self.target}", field=self.path.name)
            contribs = contribs[0, self.target_index]
        else:
            contribs = contribs[0]
        if contribs.shape[0] != len(self.feature_names) + 1:
            raise RegistryError(f"native booster takes {contribs.shape[0] - 1} features, the card "
                                f"names {len(self.feature_names)}", field=self.path.name)
        return top_contributions(contribs, row[0], self.feature_names, self.target, k)
