"""Split and adaptive conformal calibration of the model's 90% interval.

The model predicts quantiles ``q05`` and ``q95`` of the next log return. Their nominal 90% is
not guaranteed (quantile regression is biased out of sample, and regimes change), so the served
interval is widened (or narrowed) by a conformal offset:

* nonconformity score ``s_t = max(q05_t - y_t, y_t - q95_t) / sigma_t`` (positive when ``y``
  falls outside, negative inside), where ``sigma_t`` is a causal volatility scale, the
  ``rv_short`` feature, floored at ``sigma_floor`` (``scaled=False`` uses ``sigma = 1``);
* offset ``Q`` = the ``ceil((1 - alpha_t)(n + 1))``-th smallest of the last ``window`` scores
  (the finite-sample split-conformal quantile), updated online as labels arrive;
* served interval ``[q05 - Q * sigma, q95 + Q * sigma]``;
* optional adaptive conformal inference (Gibbs & Candes 2021): after each label
  ``alpha_t <- alpha_t + gamma * (alpha - miss_t)``, so a run of misses lowers ``alpha_t`` and
  widens the interval. ``alpha_t`` is kept in ``[0, 1]`` (anti-windup) and the order statistic
  is bounded by the largest score in the window, so the interval stays finite.

Scaling by the short realized volatility makes the score nearly regime-free (a volatility jump
widens the interval at once); the rolling window and ACI correct whatever scaling misses.

What a model card stores (:meth:`ConformalCalibrator.state`) is enough to rebuild the
calibrator (:meth:`ConformalCalibrator.from_state`) and serve ``interval(q05, q95, sigma)``.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

import numpy as np

from tickcast.config import ModelConfig
from tickcast.errors import InvalidInput

STATE_VERSION = 1


def _arr(x: Any, field: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field} must be numeric", field=field) from None
    return a


class ConformalCalibrator:
    """Rolling split-conformal offset for the [q05, q95] interval, optionally adaptive (ACI).

    Parameters
    ----------
    alpha
        Target miss rate (0.1 for a 90% interval).
    window
        Number of most recent scores the offset is the quantile of (``model.conformal_window``).
    scaled
        Divide scores by the volatility scale ``sigma`` (``model.conformal_scaled``).
    aci_gamma
        ACI step; 0 disables it (``model.conformal_aci_gamma``).
    sigma_floor
        Smallest usable ``sigma`` (log-return units); a missing/non-positive ``sigma`` is
        replaced by the median of the recent valid ones (``model.conformal_sigma_floor``).
    sigma_feature
        Name of the feature that supplies ``sigma`` at serving time (recorded in the state).

    Raises
    ------
    ValueError
        A parameter out of range (the bound is named).

    Examples
    --------
    >>> rng = np.random.default_rng(7)
    >>> y = rng.normal(0.0, 1.0, 10_000)  # true 90% interval: +-1.645
    >>> cal = ConformalCalibrator(alpha=0.1, window=5000, scaled=False)
    >>> cal.fit(cal.scores(y[:5000], np.full(5000, -1.0), np.full(5000, 1.0)))
    >>> round(cal.offset, 3)  # the too-narrow +-1 interval is widened
    0.637
    >>> lo, hi = cal.interval(np.full(5000, -1.0), np.full(5000, 1.0))
    >>> float(np.mean((y[5000:] >= lo) & (y[5000:] <= hi)))
    0.8986
    """

    def __init__(self, alpha: float = 0.1, window: int = 720, scaled: bool = True,
                 aci_gamma: float = 0.0, sigma_floor: float = 1e-5,
                 sigma_feature: str = "rv_short") -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if int(window) != window or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window}")
        if not 0.0 <= aci_gamma < 1.0:
            raise ValueError(f"aci_gamma must be in [0, 1), got {aci_gamma}")
        if not sigma_floor > 0.0:
            raise ValueError(f"sigma_floor must be > 0, got {sigma_floor}")
        self.alpha = float(alpha)
        self.window = int(window)
        self.scaled = bool(scaled)
        self.aci_gamma = float(aci_gamma)
        self.sigma_floor = float(sigma_floor)
        self.sigma_feature = str(sigma_feature)
        self._reset()

    @classmethod
    def from_config(cls, cfg: ModelConfig, sigma_feature: str = "rv_short") -> "ConformalCalibrator":
        """Build from ``settings.model``: alpha = 1 - (q_high - q_low) of its quantiles."""
        q_lo, _, q_hi = cfg.quantiles
        return cls(alpha=1.0 - (q_hi - q_lo), window=cfg.conformal_window,
                   scaled=cfg.conformal_scaled, aci_gamma=cfg.conformal_aci_gamma,
                   sigma_floor=cfg.conformal_sigma_floor, sigma_feature=sigma_feature)

    def _reset(self) -> None:
        self._scores: deque[float] = deque()  # chronological, at most `window`
        self._sorted: list[float] = []  # the same scores, sorted (for the order statistic)
        self._sigmas: deque[float] = deque(maxlen=self.window)  # recent valid sigmas (fallback)
        self.alpha_t = self.alpha
        self.updates = 0
        self.misses = 0
        self._recent_miss: deque[int] = deque(maxlen=self.window)

    # ------------------------------------------------------------------------------ scoring
    def _sigma_fallback(self) -> float:
        if self._sigmas:
            return max(float(np.median(np.fromiter(self._sigmas, dtype=np.float64))), self.sigma_floor)
        return self.sigma_floor

    def effective_sigma(self, sigma: Any = None) -> np.ndarray:
        """The scale actually used: 1 when unscaled; else ``max(sigma, floor)``, with missing
        or non-positive ``sigma`` replaced by the median of the recent valid ones."""
        if not self.scaled:
            return np.ones_like(_arr(0.0 if sigma is None else sigma, "sigma"))
        if sigma is None:
            raise InvalidInput("sigma is required when scaled=True", field="sigma")
        s = _arr(sigma, "sigma")
        ok = np.isfinite(s) & (s > 0)
        if ok.all():  # the usual case on the serving path: no median needed
            return np.maximum(s, self.sigma_floor)
        return np.where(ok, np.maximum(np.where(ok, s, 1.0), self.sigma_floor), self._sigma_fallback())

    def scores(self, y: Any, q05: Any, q95: Any, sigma: Any = None) -> np.ndarray:
        """Nonconformity scores ``max(q05 - y, y - q95) / sigma_eff`` (NaN where y or q NaN)."""
        ya, lo, hi = _arr(y, "y"), _arr(q05, "q05"), _arr(q95, "q95")
        return np.maximum(lo - ya, ya - hi) / self.effective_sigma(sigma)

    def _add_score(self, s: float) -> None:
        if len(self._scores) == self.window:
            old = self._scores.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._scores.append(s)
        bisect.insort(self._sorted, s)

    def _add_sigma(self, sigma: float) -> None:
        if math.isfinite(sigma) and sigma > 0:
            self._sigmas.append(float(sigma))

    # ------------------------------------------------------------------------------ fitting
    def fit(self, scores: Any, sigmas: Any = None) -> None:
        """Reset and calibrate on past scores (the last ``window`` finite ones are kept).

        ``sigmas`` (the raw scales of the calibration rows) seed the fallback scale.
        """
        s = _arr(scores, "scores").ravel()
        s = s[np.isfinite(s)]
        self._reset()
        for v in s[-self.window:].tolist():
            self._add_score(v)
        if sigmas is not None:
            for v in _arr(sigmas, "sigmas").ravel()[-self.window:].tolist():
                self._add_sigma(v)

    def fit_residuals(self, y: Any, q05: Any, q95: Any, sigma: Any = None) -> None:
        """:meth:`fit` on the scores of a calibration window's labels and forecasts."""
        if sigma is not None and self.scaled:
            # Seed the fallback first so missing sigmas in the window are scored sensibly.
            self._reset()
            for v in _arr(sigma, "sigma").ravel()[-self.window:].tolist():
                self._add_sigma(v)
        self.fit(self.scores(y, q05, q95, sigma), sigmas=sigma if self.scaled else None)

    # ------------------------------------------------------------------------------ serving
    @property
    def n_scores(self) -> int:
        """Scores currently in the window."""
        return len(self._scores)

    @property
    def offset(self) -> float:
        """Current offset Q (in sigma units when scaled); 0.0 before any score is known."""
        n = len(self._sorted)
        if n == 0:
            return 0.0
        level = min(max(1.0 - self.alpha_t, 0.0), 1.0)
        k = min(max(math.ceil(level * (n + 1)), 1), n)
        return self._sorted[k - 1]

    def interval(self, q05: Any, q95: Any, sigma: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated interval ``(q05 - Q * s, q95 + Q * s)`` with ``s`` = :meth:`effective_sigma`.

        Works on scalars or arrays (numpy broadcasting).
        """
        off = self.offset * self.effective_sigma(sigma)
        return _arr(q05, "q05") - off, _arr(q95, "q95") + off

    def update(self, y: float, q05: float, q95: float, sigma: float | None = None,
               lo: float | None = None, hi: float | None = None) -> bool | None:
        """Take one realized label; return whether it was covered (None if unusable).

        ``lo``/``hi`` are the interval that was actually served for this forecast (with a
        horizon > 1 the offset may have moved since); by default the current one.
        """
        y, q05, q95 = float(y), float(q05), float(q95)
        if not (math.isfinite(y) and math.isfinite(q05) and math.isfinite(q95)):
            return None
        sig = float("nan") if sigma is None else float(sigma)
        if lo is None or hi is None:
            lo_a, hi_a = self.interval(q05, q95, sig if self.scaled else None)
            lo, hi = float(lo_a), float(hi_a)
        covered = bool(lo <= y <= hi)
        score = float(self.scores(y, q05, q95, sig if self.scaled else None))
        if self.scaled:
            self._add_sigma(sig)
        self._add_score(score)
        miss = 0 if covered else 1
        self.updates += 1
        self.misses += miss
        self._recent_miss.append(miss)
        if self.aci_gamma > 0:
            self.alpha_t = min(max(self.alpha_t + self.aci_gamma * (self.alpha - miss), 0.0), 1.0)
        return covered

    def rolling_intervals(self, y: Any, q05: Any, q95: Any, sigma: Any = None,
                          horizon: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Causal intervals over a backtest, updating the calibrator as labels realize.

        Row ``t``'s label (the return over ``(t, t + horizon]``) is known at the close of bar
        ``t + horizon``, so the interval of row ``t`` uses only labels of rows ``<= t -
        horizon``. Starts from the current (fitted) state and leaves the calibrator in the
        state after the last realized label. NaN labels (gaps) are skipped; NaN forecasts give
        a NaN interval. Cost O(T log window).

        Returns
        -------
        (lo, hi)
            float64 arrays of length T.
        """
        if not isinstance(horizon, (int, np.integer)) or isinstance(horizon, bool) or horizon < 1:
            raise InvalidInput(f"horizon must be an integer >= 1, got {horizon!r}", field="horizon")
        ya, f05, f95 = _arr(y, "y"), _arr(q05, "q05"), _arr(q95, "q95")
        if self.scaled:
            if sigma is None:
                raise InvalidInput("sigma is required when scaled=True", field="sigma")
            sg = _arr(sigma, "sigma")
        else:
            sg = np.full(ya.shape, np.nan)
        lengths = {"y": ya.shape, "q05": f05.shape, "q95": f95.shape, "sigma": sg.shape}
        if len(set(lengths.values())) > 1 or ya.ndim != 1:
            raise InvalidInput(f"arrays must be 1-D of equal length, got {lengths}", field="y")
        T = ya.shape[0]
        lo = np.full(T, np.nan)
        hi = np.full(T, np.nan)
        h = int(horizon)
        yl, l05, l95, lsg = ya.tolist(), f05.tolist(), f95.tolist(), sg.tolist()
        for t in range(T):
            j = t - h
            if j >= 0 and math.isfinite(yl[j]) and math.isfinite(lo[j]):
                self.update(yl[j], l05[j], l95[j], lsg[j], lo=float(lo[j]), hi=float(hi[j]))
            if math.isfinite(l05[t]) and math.isfinite(l95[t]):
                s = float(self.effective_sigma(lsg[t])) if self.scaled else 1.0
                off = self.offset * s
                lo[t] = l05[t] - off
                hi[t] = l95[t] + off
        return lo, hi

    # ------------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """JSON-serializable state for the model card (rebuild with :meth:`from_state`).

        Serving applies ``lo = q05 - offset * s``, ``hi = q95 + offset * s`` where ``s`` is
        ``max(<sigma_feature>, sigma_floor)`` (``sigma_fallback`` when the feature is missing)
        if ``scaled``, else 1.
        """
        recent = (sum(self._recent_miss) / len(self._recent_miss)) if self._recent_miss else None
        return {
            "version": STATE_VERSION,
            "method": "split_conformal_rolling" + ("+aci" if self.aci_gamma > 0 else ""),
            "alpha": self.alpha,
            "window": self.window,
            "scaled": self.scaled,
            "aci_gamma": self.aci_gamma,
            "sigma_floor": self.sigma_floor,
            "sigma_feature": self.sigma_feature,
            "sigma_fallback": self._sigma_fallback(),
            "alpha_t": self.alpha_t,
            "offset": self.offset,
            "n_scores": self.n_scores,
            "updates": self.updates,
            "misses": self.misses,
            "recent_coverage": None if recent is None else 1.0 - recent,
            "scores": list(self._scores),
            "sigmas": list(self._sigmas),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ConformalCalibrator":
        """Rebuild a calibrator from :meth:`state` output.

        Raises
        ------
        InvalidInput
            A required key is missing or malformed (the key is named).
        """
        if not isinstance(state, dict):
            raise InvalidInput("conformal state must be a mapping", field="conformal")
        try:
            cal = cls(alpha=state["alpha"], window=state["window"], scaled=state["scaled"],
                      aci_gamma=state["aci_gamma"], sigma_floor=state["sigma_floor"],
                      sigma_feature=state.get("sigma_feature", "rv_short"))
        except KeyError as exc:
            raise InvalidInput(f"conformal state lacks '{exc.args[0]}'", field=str(exc.args[0])) from None
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"conformal state is malformed: {exc}", field="conformal") from None
        for v in state.get("scores", []):
            v = float(v)
            if math.isfinite(v):
                cal._add_score(v)
        for v in state.get("sigmas", []):
            cal._add_sigma(float(v))
        cal.alpha_t = float(state.get("alpha_t", cal.alpha))
        cal.updates = int(state.get("updates", 0))
        cal.misses = int(state.get("misses", 0))
        return cal
