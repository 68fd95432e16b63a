"""Paper P&L of a forecast signal: positions, fees, equity, drawdown and Sharpe ratio.

Conventions (shared by the incremental :class:`PaperPnL` and the vectorized
:func:`paper_returns`, which agree exactly):

* a position ``p`` in [-1, 1] is a fraction of equity held long (> 0) or short (< 0) in the
  asset over the next bar;
* over a bar with simple return ``r`` the equity is multiplied by ``1 + p * r``;
* changing the position from ``p`` to ``p'`` costs ``|p' - p| * fee_bp / 10_000`` of equity;
* drawdown is ``1 - equity / running peak`` (0 at a new high).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from tickcast.errors import InvalidInput

BP = 1e-4


def signal_positions(median: ArrayLike, interval_bp: ArrayLike | None = None,
                     sizing: str = "sign") -> np.ndarray:
    """Positions in [-1, 1] from median forecasts (log returns).

    Parameters
    ----------
    median
        Median forecast of the next bar's log return.
    interval_bp
        Width of the predicted interval in basis points of price (used by ``"interval"``).
    sizing
        ``"sign"``: ``sign(median)``. ``"interval"``: ``median / (interval / 2)`` clipped to
        [-1, 1] -- a forecast as large as half its interval takes a full position; where the
        interval is missing or not positive, the sign.

    Examples
    --------
    >>> signal_positions([0.001, -0.0002, 0.0]).tolist()
    [1.0, -1.0, 0.0]
    >>> signal_positions([0.001, 0.003, -0.0002], [40.0, 40.0, 20.0], sizing="interval").tolist()
    [0.5, 1.0, -0.2]
    """
    m = np.asarray(median, dtype=np.float64)
    if sizing == "sign":
        return np.sign(m)
    if sizing != "interval":
        raise ValueError(f"sizing must be 'sign' or 'interval', got {sizing!r}")
    if interval_bp is None:
        return np.sign(m)
    half = np.asarray(interval_bp, dtype=np.float64) * (BP / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sized = np.clip(m / half, -1.0, 1.0)
    return np.where(half > 0, sized, np.sign(m))


def paper_returns(positions: ArrayLike, simple_returns: ArrayLike, fee_bp: float,
                  initial_position: float = 0.0) -> np.ndarray:
    """Net per-bar returns of a position series.

    ``positions[t]`` is chosen at the close of bar ``t`` and held over bar ``t + 1``, whose
    simple return is ``simple_returns[t]`` (so both arrays are aligned on the decision time).
    Net return of step ``t``: ``(1 - |positions[t] - positions[t-1]| * fee) * (1 +
    positions[t] * simple_returns[t]) - 1``.

    Examples
    --------
    >>> paper_returns([1.0, 1.0, -1.0], [0.01, -0.02, 0.01], fee_bp=10.0).round(6).tolist()
    [0.00899, -0.02, -0.01198]
    """
    p = np.asarray(positions, dtype=np.float64)
    r = np.asarray(simple_returns, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1:
        raise InvalidInput(f"positions and simple_returns must be 1-D of one length, got "
                           f"{p.shape} and {r.shape}", field="positions")
    turnover = np.abs(np.diff(p, prepend=initial_position))
    return (1.0 - turnover * (fee_bp * BP)) * (1.0 + p * r) - 1.0


def sharpe_ratio(returns: ArrayLike, periods_per_year: float) -> float:
    """Annualized Sharpe ratio (zero risk-free rate) of per-period returns.

    Returns 0.0 for fewer than two returns or zero variance (no evidence either way).

    Examples
    --------
    >>> round(sharpe_ratio([0.01, -0.005, 0.007, 0.002], periods_per_year=252), 3)
    8.473
    """
    r = np.asarray(returns, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return 0.0
    sd = float(r.std(ddof=1))
    if sd == 0.0:
        return 0.0
    return float(r.mean() / sd * math.sqrt(periods_per_year))


def max_drawdown(returns: ArrayLike) -> float:
    """Largest peak-to-trough loss (fraction of the peak) of the compounded returns.

    Examples
    --------
    >>> round(max_drawdown([0.1, -0.2, 0.05, -0.1]), 4)
    0.244
    """
    r = np.asarray(returns, dtype=np.float64)
    if r.size == 0:
        return 0.0
    equity = np.cumprod(1.0 + r)
    peak = np.maximum.accumulate(np.maximum(equity, 1.0))
    return float((1.0 - equity / peak).max())


class PaperPnL:
    """Incremental paper equity of a position series, with fees and drawdown.

    Call :meth:`mark` with each bar's simple return (P&L of the position held over it), then
    :meth:`rebalance` to the new target position.

    Parameters
    ----------
    fee_bp
        Cost of trading one unit of equity, in basis points.

    Examples
    --------
    >>> pnl = PaperPnL(fee_bp=10.0)
    >>> pnl.rebalance(1.0)
    >>> pnl.mark(0.01)
    >>> pnl.rebalance(-1.0)
    >>> pnl.mark(-0.02)
    >>> round(pnl.equity, 6), round(pnl.drawdown, 6)
    (1.027111, 0.0)
    """

    def __init__(self, fee_bp: float) -> None:
        if not (math.isfinite(fee_bp) and fee_bp >= 0):
            raise ValueError(f"fee_bp must be finite and >= 0, got {fee_bp}")
        self.fee_bp = float(fee_bp)
        self.equity = 1.0
        self.peak = 1.0
        self.position = 0.0
        self.bars = 0
        self.fees = 0.0  # total fees paid, in equity units
        self.worst_drawdown = 0.0

    @property
    def drawdown(self) -> float:
        """Current drawdown: ``1 - equity / peak``."""
        return 1.0 - self.equity / self.peak

    def mark(self, simple_return: float) -> None:
        """Apply one bar's simple return to the position held over that bar."""
        self.equity *= 1.0 + self.position * simple_return
        self.bars += 1
        self._track()

    def rebalance(self, target: float) -> None:
        """Move to ``target`` (a fraction of equity), paying the proportional fee."""
        fee = abs(target - self.position) * self.fee_bp * BP * self.equity
        self.equity -= fee
        self.fees += fee
        self.position = float(target)
        self._track()

    def _track(self) -> None:
        if self.equity > self.peak:
            self.peak = self.equity
        self.worst_drawdown = max(self.worst_drawdown, self.drawdown)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready summary."""
        return {"equity": self.equity, "peak": self.peak, "drawdown": self.drawdown,
                "position": self.position, "bars": self.bars, "fees": self.fees,
                "worst_drawdown": self.worst_drawdown}
