"""Forecast evaluation statistics (pure numpy/scipy).

Everything the backtests, the model card and the closed loop report: quantile (pinball) loss,
point errors, interval coverage and width, directional accuracy with a Wilson interval, a sign
strategy's Sharpe ratio and return after fees, and the Diebold-Mariano test with the
Harvey-Leybourne-Newbold small-sample correction.

Returns are log returns of the bar horizon; widths are reported in basis points of log return
(1e-4).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from tickcast.errors import InvalidInput

BARS_PER_YEAR_1MIN = 525_600  # 365 days x 1440 one-minute bars
BP = 1e-4


def _arr(x: Any, field: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field} must be numeric", field=field) from None
    if a.ndim != 1:
        raise InvalidInput(f"{field} must be one-dimensional, got shape {a.shape}", field=field)
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise InvalidInput(f"arrays differ in length: {lengths}", field=next(iter(lengths)))


def pinball_losses(y: Any, q_pred: Any, q: float) -> np.ndarray:
    """Per-observation pinball (quantile) loss: ``max(q * (y - f), (q - 1) * (y - f))``.

    Examples
    --------
    >>> pinball_losses([1.0, -1.0], [0.0, 0.0], 0.9).tolist()
    [0.9, 0.09999999999999998]
    """
    if not 0.0 < q < 1.0:
        raise InvalidInput(f"quantile level q must be in (0, 1), got {q}", field="q")
    ya, fa = _arr(y, "y"), _arr(q_pred, "q_pred")
    _same_length(y=ya, q_pred=fa)
    e = ya - fa
    return np.maximum(q * e, (q - 1.0) * e)


def pinball_loss(y: Any, q_pred: Any, q: float) -> float:
    """Mean pinball loss of quantile forecasts ``q_pred`` at level ``q``."""
    return float(np.mean(pinball_losses(y, q_pred, q)))


def mae(y: Any, pred: Any) -> float:
    """Mean absolute error."""
    ya, pa = _arr(y, "y"), _arr(pred, "pred")
    _same_length(y=ya, pred=pa)
    return float(np.mean(np.abs(ya - pa)))


def rmse(y: Any, pred: Any) -> float:
    """Root mean squared error."""
    ya, pa = _arr(y, "y"), _arr(pred, "pred")
    _same_length(y=ya, pred=pa)
    return float(np.sqrt(np.mean((ya - pa) ** 2)))


def interval_coverage(y: Any, lo: Any, hi: Any) -> float:
    """Share of ``y`` inside ``[lo, hi]`` (bounds included)."""
    ya, la, ha = _arr(y, "y"), _arr(lo, "lo"), _arr(hi, "hi")
    _same_length(y=ya, lo=la, hi=ha)
    return float(np.mean((ya >= la) & (ya <= ha)))


def interval_width_bp(lo: Any, hi: Any) -> float:
    """Mean interval width ``hi - lo`` in basis points of log return."""
    la, ha = _arr(lo, "lo"), _arr(hi, "hi")
    _same_length(lo=la, hi=ha)
    return float(np.mean(ha - la) / BP)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (no continuity correction).

    ``(0.0, 1.0)`` when ``n == 0`` (no information).

    Examples
    --------
    >>> tuple(round(v, 4) for v in wilson_interval(60, 100))
    (0.502, 0.6906)
    """
    if n < 0 or successes < 0 or successes > n:
        raise InvalidInput(f"need 0 <= successes <= n, got {successes} of {n}", field="successes")
    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def directional_accuracy(y: Any, pred: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """Hit rate of the forecast's sign, with a Wilson interval: ``(acc, lo, hi)``.

    Rows whose realized return is exactly 0 are EXCLUDED (no direction to hit; on 1-minute
    bars these are flat minutes). A forecast of exactly 0 makes no call and counts as a miss.
    ``acc`` is NaN and the interval ``(0, 1)`` when nothing is left. Use
    :func:`directional_counts` for the numbers behind it.
    """
    hits, n, _ = directional_counts(y, pred)
    lo, hi = wilson_interval(hits, n, confidence)
    return (hits / n if n else float("nan")), lo, hi


def directional_counts(y: Any, pred: Any) -> tuple[int, int, int]:
    """``(hits, n_used, n_zero_excluded)`` behind :func:`directional_accuracy`."""
    ya, pa = _arr(y, "y"), _arr(pred, "pred")
    _same_length(y=ya, pred=pa)
    nonzero = ya != 0.0
    hits = int(np.sum(np.sign(pa[nonzero]) == np.sign(ya[nonzero])))
    n = int(nonzero.sum())
    return hits, n, int(len(ya) - n)


def sign_strategy(y: Any, pred: Any, fee_bp: float,
                  periods_per_year: float = BARS_PER_YEAR_1MIN) -> dict[str, float]:
    """Hold ``sign(pred)`` over each bar; pay ``fee_bp`` per unit of position change.

    The position starts flat; going long from flat costs one fee, flipping short to long
    costs two. Per-bar simple return ``pos * (exp(y) - 1) - fee * |pos - pos_prev|``.

    Returns
    -------
    dict
        ``sharpe`` (annualized with ``periods_per_year``; 0.0 when the strategy never moves,
        +-inf when every bar returns the same nonzero amount), ``total_return`` (compounded,
        simple), ``turnover`` (position changes, in units).
    """
    if not (math.isfinite(fee_bp) and fee_bp >= 0):
        raise InvalidInput(f"fee_bp must be >= 0, got {fee_bp}", field="fee_bp")
    ya, pa = _arr(y, "y"), _arr(pred, "pred")
    _same_length(y=ya, pred=pa)
    if len(ya) == 0:
        return {"sharpe": float("nan"), "total_return": 0.0, "turnover": 0.0}
    pos = np.sign(pa)
    change = np.abs(np.diff(np.concatenate(([0.0], pos))))
    r = pos * np.expm1(ya) - fee_bp * BP * change
    total = float(np.expm1(np.sum(np.log1p(r))))
    sd = float(np.std(r, ddof=1)) if len(r) > 1 else 0.0
    mean = float(np.mean(r))
    if sd > 0:
        sharpe = mean / sd * math.sqrt(periods_per_year)
    else:
        sharpe = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return {"sharpe": sharpe, "total_return": total, "turnover": float(change.sum())}


class DMResult(NamedTuple):
    """Diebold-Mariano test of equal predictive accuracy (losses a vs b).

    ``stat < 0`` means a has lower loss. ``p`` is two-sided; ``p_a_better`` is the one-sided
    p-value of H1 "a has lower expected loss than b".
    """

    stat: float
    p: float
    n: int
    mean_diff: float
    p_a_better: float
    h: int


def diebold_mariano(loss_a: Any, loss_b: Any, h: int = 1) -> DMResult:
    """Diebold-Mariano test with the Harvey-Leybourne-Newbold correction.

    ``d_t = loss_a_t - loss_b_t``; the long-run variance of ``mean(d)`` uses the
    autocovariances up to lag ``h - 1`` (``gamma_k = 1/n sum (d_t - dbar)(d_{t-k} - dbar)``):
    ``V = (gamma_0 + 2 sum_{k=1}^{h-1} gamma_k) / n``. ``DM = dbar / sqrt(V)`` is multiplied by
    ``sqrt((n + 1 - 2h + h(h-1)/n) / n)`` and compared with Student-t(n-1).

    Zero variance: when every ``d_t`` is equal (e.g. identical forecasts) the statistic is 0
    with ``p = 1`` (``p_a_better = 0.5``) if the differences are 0, else ``+-inf`` with
    ``p = 0`` and ``p_a_better`` 0 when a is always better (``-inf``), 1 when always worse:
    the limits of the finite-variance formulas. If the Newey-West sum is not positive
    (possible for ``h > 1``) ``gamma_0`` alone is used.

    Raises
    ------
    InvalidInput
        Different lengths, non-finite losses, ``h < 1`` or too few observations (n < 2, or
        the correction factor not positive).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> e = rng.normal(size=500)
    >>> r = diebold_mariano(np.abs(e), np.abs(e + 0.5))
    >>> r.stat < 0, r.p_a_better < 0.01
    (True, True)
    """
    a, b = _arr(loss_a, "loss_a"), _arr(loss_b, "loss_b")
    _same_length(loss_a=a, loss_b=b)
    if not isinstance(h, (int, np.integer)) or isinstance(h, bool) or h < 1:
        raise InvalidInput(f"h must be an integer >= 1, got {h!r}", field="h")
    for name, arr in (("loss_a", a), ("loss_b", b)):
        if not np.all(np.isfinite(arr)):
            raise InvalidInput(f"{name} has non-finite values; drop them first", field=name)
    n = len(a)
    factor = (n + 1 - 2 * h + h * (h - 1) / n) / n if n else 0.0
    if n < 2 or factor <= 0:
        raise InvalidInput(f"Diebold-Mariano needs more observations (n={n}, h={h})", field="loss_a")
    d = a - b
    dbar = float(np.mean(d))
    dc = d - dbar
    gamma0 = float(np.dot(dc, dc)) / n
    lrv = gamma0 + 2.0 * sum(float(np.dot(dc[k:], dc[:-k])) / n for k in range(1, h) if k < n)
    if lrv <= 0:
        lrv = gamma0
    if lrv <= 0 or np.all(d == d[0]):
        # Every difference is the same number: no sampling noise at all. The one-sided p-value
        # of "a is better" is then 0 when a's loss is lower every time (stat = -inf, the limit
        # of t.cdf), 1 when it is higher every time.
        if dbar == 0:
            return DMResult(0.0, 1.0, n, 0.0, 0.5, int(h))
        stat = math.copysign(math.inf, dbar)
        return DMResult(stat, 0.0, n, dbar, 0.0 if dbar < 0 else 1.0, int(h))
    dm = dbar / math.sqrt(lrv / n)
    stat = dm * math.sqrt(factor)
    t = stats.t(df=n - 1)
    p = float(2.0 * t.sf(abs(stat)))
    return DMResult(float(stat), min(p, 1.0), n, dbar, float(t.cdf(stat)), int(h))


def evaluate(y: Any, q05: Any, q50: Any, q95: Any, fee_bp: float, *, lo: Any = None,
             hi: Any = None, horizon: int = 1, alpha: float = 0.05,
             periods_per_year: float = BARS_PER_YEAR_1MIN,
             quantiles: tuple[float, float, float] = (0.05, 0.5, 0.95)) -> dict[str, Any]:
    """All backtest metrics of quantile forecasts of log returns, in one dict.

    Rows where ``y`` or any forecast is NaN are dropped (counted in ``n_dropped``).

    Parameters
    ----------
    y
        Realized log returns of the horizon.
    q05, q50, q95
        Forecast quantiles (levels ``quantiles``).
    fee_bp
        Fee per unit of position change of the sign strategy, in bp.
    lo, hi
        Calibrated interval (e.g. conformal); default ``[q05, q95]``.
    horizon
        Forecast horizon in bars (the DM autocovariance lags, ``h - 1``).
    alpha
        Significance level of the verdict.
    periods_per_year
        Annualization of the Sharpe ratio (525,600 one-minute bars).

    Returns
    -------
    dict
        ``n``, ``n_dropped``, ``coverage_90`` (share inside the interval), ``interval_width_bp``,
        ``mae``, ``rmse`` (of the median), ``pinball`` (mean over the three quantiles),
        ``directional_accuracy``, ``directional_ci95`` [lo, hi], ``directional_n``,
        ``directional_zero_excluded``, ``sharpe``, ``total_return``, ``turnover``,
        ``dm_vs_random_walk`` {stat, p, p_model_better, mean_diff, loss} and ``verdict``.
        The random walk forecasts a zero return; both are compared on the ABSOLUTE ERROR OF
        THE MEDIAN forecast (twice the q=0.5 pinball loss). Values may be NaN or +-inf where
        undefined (e.g. no rows).
    """
    arrays = {"y": _arr(y, "y"), "q05": _arr(q05, "q05"), "q50": _arr(q50, "q50"),
              "q95": _arr(q95, "q95")}
    if lo is not None or hi is not None:
        if lo is None or hi is None:
            raise InvalidInput("give both lo and hi, or neither", field="lo" if lo is None else "hi")
        arrays["lo"], arrays["hi"] = _arr(lo, "lo"), _arr(hi, "hi")
    _same_length(**arrays)
    keep = np.ones(len(arrays["y"]), dtype=bool)
    for v in arrays.values():
        keep &= np.isfinite(v)
    a = {k: v[keep] for k, v in arrays.items()}
    yv, f05, f50, f95 = a["y"], a["q05"], a["q50"], a["q95"]
    lo_v, hi_v = a.get("lo", f05), a.get("hi", f95)
    n = int(keep.sum())
    out: dict[str, Any] = {"n": n, "n_dropped": int(len(keep) - n)}
    nan = float("nan")
    if n == 0:
        out.update(coverage_90=nan, interval_width_bp=nan, mae=nan, rmse=nan, pinball=nan,
                   directional_accuracy=nan, directional_ci95=[0.0, 1.0], directional_n=0,
                   directional_zero_excluded=0, sharpe=nan, total_return=0.0, turnover=0.0,
                   dm_vs_random_walk={"stat": nan, "p": nan, "p_model_better": nan,
                                      "mean_diff": nan, "loss": "absolute_error_of_median"},
                   verdict="No realized labels: the model cannot be compared with the random walk.")
        return out
    out["coverage_90"] = interval_coverage(yv, lo_v, hi_v)
    out["interval_width_bp"] = interval_width_bp(lo_v, hi_v)
    out["mae"] = mae(yv, f50)
    out["rmse"] = rmse(yv, f50)
    out["pinball"] = float(np.mean([pinball_loss(yv, f, q) for f, q in zip((f05, f50, f95), quantiles)]))
    acc, dlo, dhi = directional_accuracy(yv, f50)
    _, dn, dzero = directional_counts(yv, f50)
    out.update(directional_accuracy=acc, directional_ci95=[dlo, dhi], directional_n=dn,
               directional_zero_excluded=dzero)
    out.update(sign_strategy(yv, f50, fee_bp, periods_per_year))
    model_loss = np.abs(yv - f50)
    rw_loss = np.abs(yv)
    try:
        dm = diebold_mariano(model_loss, rw_loss, h=horizon)
        out["dm_vs_random_walk"] = {"stat": dm.stat, "p": dm.p, "p_model_better": dm.p_a_better,
                                    "mean_diff": dm.mean_diff, "loss": "absolute_error_of_median"}
        diff_bp = -dm.mean_diff / BP
        if dm.p_a_better < alpha:
            verdict = (f"The model beats the random walk at {alpha:.0%}: its median forecast's "
                       f"absolute error is lower by {diff_bp:.3f} bp per bar (DM={dm.stat:.2f}, "
                       f"one-sided p={dm.p_a_better:.3g}, n={n}).")
        elif dm.mean_diff > 0 and dm.p < alpha:
            verdict = (f"The model is significantly WORSE than the random walk at {alpha:.0%}: its "
                       f"absolute error is higher by {-diff_bp:.3f} bp per bar (DM={dm.stat:.2f}, "
                       f"p={dm.p:.3g}, n={n}).")
        else:
            verdict = (f"The model does not beat the random walk at {alpha:.0%}: mean absolute "
                       f"error model minus random walk {dm.mean_diff / BP:+.3f} bp per bar "
                       f"(DM={dm.stat:.2f}, one-sided p={dm.p_a_better:.3g}, n={n}).")
    except InvalidInput as exc:
        out["dm_vs_random_walk"] = {"stat": nan, "p": nan, "p_model_better": nan, "mean_diff": nan,
                                    "loss": "absolute_error_of_median"}
        verdict = f"Too few labels to compare the model with the random walk ({exc.message})."
    out["verdict"] = verdict
    return out
