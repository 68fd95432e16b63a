"""Shadow evaluation: pair logged forecasts with realized returns, compare two models, decide.

The closed loop compares model versions on the bars both of them forecast, once each bar's
return is known. Pieces (pure numpy/scipy; the actors feed them from Redis and the bar store):

* :func:`parse_prediction` -- one entry of the ``predictions`` stream as a :class:`Forecast`,
  or a reason why not (never raises on bad input);
* :class:`ForecastJoin` -- the first forecast of each tracked version for each bar, joined with
  the realized log return ``log(close[t + h] / close[t])`` when bar ``t + h`` has closed;
* :func:`compare_forecasts` -- pinball loss per bar (mean over the three quantile forecasts
  ``lo, pred, hi``), the Diebold-Mariano test with the Harvey-Leybourne-Newbold correction
  (:func:`training.evaluation.diebold_mariano`) and the paper Sharpe ratio of each model's signal;
* :func:`decide_promotion` and :func:`decide_rollback` -- the controller's rules;
* :func:`sla_since` -- error rate and latency-SLA share of the serving replicas since a baseline.

Why the first forecast of a bar: clients may ask for the same bar many times (retries, several
consumers); the first answer is the one a client acted on, and taking it makes the join
independent of how many requests follow.

Examples
--------
>>> join = ForecastJoin(("v2", "v1"), horizon=1, freq_ns=60)
>>> fc = [Forecast("BTC-USD", "green", "v2", 0, 0.001, -0.01, 0.01, True),
...       Forecast("BTC-USD", "blue", "v1", 0, 0.0, -0.02, 0.02, False)]
>>> join.add(fc)
2
>>> join.add_closes([0, 60], [100.0, 101.0])
>>> join.settle()
1
>>> y, f, ts = join.take()
>>> round(float(y[0]), 6), f.shape, ts.tolist()
(0.00995, (1, 2, 3), [0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from tickcast.config import ControllerConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.pnl import BP, paper_returns, sharpe_ratio, signal_positions
from training.evaluation import diebold_mariano

PREDICTION_FIELDS: tuple[str, ...] = ("asset", "slot", "version", "bar_ts", "pred", "lo", "hi")


@dataclass(frozen=True)
class Forecast:
    """One logged prediction (a row of the ``predictions`` stream).

    ``pred`` is the median forecast of the next bar's log return, ``[lo, hi]`` the served
    (calibrated) 90 % interval; they are the model's 0.5, 0.05 and 0.95 quantile forecasts.
    """

    asset: str
    slot: str
    version: str
    bar_ts: int
    pred: float
    lo: float
    hi: float
    shadow: bool = False
    ts: int = 0
    price: float = math.nan

    @property
    def quantiles(self) -> tuple[float, float, float]:
        """``(lo, pred, hi)``: the forecasts of the 0.05, 0.5 and 0.95 quantiles."""
        return (self.lo, self.pred, self.hi)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_prediction(fields: Mapping[Any, Any]) -> tuple[Forecast | None, str | None]:
    """Decode one ``predictions`` stream entry; ``(forecast, None)`` or ``(None, reason)``.

    Reasons: ``missing:<field>``, ``bad_number:<field>``, ``explicit_features`` (``bar_ts`` is
    -1: the client sent its own features, so the forecast belongs to no bar), ``non_finite``,
    ``bad_interval`` (``lo > hi``).

    Examples
    --------
    >>> f, why = parse_prediction({b"asset": b"BTC-USD", b"slot": b"blue", b"version": b"v1",
    ...     b"bar_ts": b"60", b"pred": b"0.001", b"lo": b"-0.01", b"hi": b"0.01",
    ...     b"shadow": b"1", b"price": b"100.5"})
    >>> (f.version, f.bar_ts, f.shadow, f.price, why)
    ('v1', 60, True, 100.5, None)
    >>> parse_prediction({b"asset": b"BTC-USD"})
    (None, 'missing:slot')
    >>> parse_prediction({"asset": "A", "slot": "blue", "version": "v", "bar_ts": "-1",
    ...                   "pred": "0", "lo": "0", "hi": "0"})[1]
    'explicit_features'
    """
    text: dict[str, str] = {_text(k): _text(v) for k, v in fields.items()}
    for name in PREDICTION_FIELDS:
        if name not in text or text[name] == "":
            return None, f"missing:{name}"
    try:
        bar_ts = int(text["bar_ts"])
    except ValueError:
        return None, "bad_number:bar_ts"
    if bar_ts < 0:
        return None, "explicit_features"
    nums: dict[str, float] = {}
    for name in ("pred", "lo", "hi"):
        try:
            nums[name] = float(text[name])
        except ValueError:
            return None, f"bad_number:{name}"
    if not all(math.isfinite(v) for v in nums.values()):
        return None, "non_finite"
    if nums["lo"] > nums["hi"]:
        return None, "bad_interval"
    try:
        price = float(text.get("price", "nan"))
    except ValueError:
        price = math.nan
    try:
        ts = int(text.get("ts", "0"))
    except ValueError:
        ts = 0
    shadow = text.get("shadow", "0").strip() in ("1", "true", "True")
    return Forecast(text["asset"], text["slot"], text["version"], bar_ts, nums["pred"], nums["lo"],
                    nums["hi"], shadow, ts, price), None


class ForecastJoin:
    """First forecast per (version, bar) of some versions, joined with realized returns.

    Parameters
    ----------
    versions
        The tracked versions (one: label one model's forecasts; two: pair a candidate with an
        incumbent). A bar is complete when every version forecast it and its label is known.
    horizon
        Forecast horizon in bars (the label of bar ``t`` needs the close of ``t + horizon``).
    freq_ns
        Bar length in ns.
    since_bar_ts
        Forecasts of earlier bars are ignored (e.g. bars before the evaluation started).
    timeout_bars
        A bar still incomplete when its label bar (``t + horizon``) is this many bars older
        than the newest close is dropped (its other forecast never came, or its label bar
        never closed); counted in :attr:`dropped`.

    Notes
    -----
    Memory stays bounded: complete bars move to compact arrays, closes older than every
    pending bar are forgotten, and incomplete bars time out.
    """

    def __init__(self, versions: Sequence[str], horizon: int, freq_ns: int, since_bar_ts: int = 0,
                 timeout_bars: int = 30) -> None:
        vs = tuple(str(v) for v in versions)
        if not vs or len(set(vs)) != len(vs):
            raise ValueError(f"versions must be distinct and non-empty, got {versions!r}")
        if horizon < 1 or freq_ns < 1 or timeout_bars < 1:
            raise ValueError("horizon, freq_ns and timeout_bars must be >= 1")
        self.versions = vs
        self.horizon = int(horizon)
        self.freq_ns = int(freq_ns)
        self.since_bar_ts = int(since_bar_ts)
        self.timeout_bars = int(timeout_bars)
        self._index = {v: i for i, v in enumerate(vs)}
        self._pending: dict[int, list[tuple[float, float, float] | None]] = {}
        self._closes: dict[int, float] = {}
        self._newest_close: int | None = None
        self._y: list[float] = []
        self._f: list[list[tuple[float, float, float]]] = []
        self._ts: list[int] = []
        self._done: set[int] = set()  # completed bars not yet taken (late duplicates ignored)
        self._taken_through: int = -1  # bars <= this were completed and taken
        self.seen = 0  # forecasts accepted (first per version and bar)
        self.duplicates = 0  # later forecasts of a (version, bar) already held
        self.dropped: dict[str, int] = {}
        self.completed = 0

    @property
    def pending(self) -> int:
        """Bars waiting for a forecast or a label."""
        return len(self._pending)

    @property
    def ready(self) -> int:
        """Complete bars not yet taken."""
        return len(self._y)

    def add(self, forecasts: Iterable[Forecast]) -> int:
        """Add forecasts (other versions and older bars are ignored); returns how many were kept."""
        kept = 0
        for f in forecasts:
            i = self._index.get(f.version)
            if i is None or f.bar_ts < self.since_bar_ts:
                continue
            if f.bar_ts in self._done or f.bar_ts <= self._taken_through:
                self.duplicates += 1
                continue
            slot = self._pending.get(f.bar_ts)
            if slot is None:
                slot = self._pending[f.bar_ts] = [None] * len(self.versions)
            if slot[i] is not None:
                self.duplicates += 1
                continue
            slot[i] = f.quantiles
            kept += 1
        self.seen += kept
        return kept

    def needed_range(self) -> tuple[int, int] | None:
        """``(start_ns, end_ns)`` of the closes still needed (end exclusive), or None."""
        if not self._pending:
            return None
        return min(self._pending), max(self._pending) + self.horizon * self.freq_ns + 1

    def add_closes(self, ts: ArrayLike, close: ArrayLike) -> None:
        """Record bar closes (consensus bars from the bar store); non-positive closes ignored."""
        t = np.asarray(ts, dtype=np.int64).ravel()
        c = np.asarray(close, dtype=np.float64).ravel()
        if t.shape != c.shape:
            raise InvalidInput(f"ts and close differ in length: {t.shape} vs {c.shape}", field="close")
        ok = np.isfinite(c) & (c > 0)
        for k, v in zip(t[ok].tolist(), c[ok].tolist()):
            self._closes[int(k)] = float(v)
        if ok.any():
            top = int(t[ok].max())
            self._newest_close = top if self._newest_close is None else max(self._newest_close, top)

    def settle(self) -> int:
        """Move complete bars to the output and time out stale ones; returns new complete bars."""
        new = 0
        h = self.horizon * self.freq_ns
        for bar_ts in sorted(self._pending):
            slot = self._pending[bar_ts]
            c0, c1 = self._closes.get(bar_ts), self._closes.get(bar_ts + h)
            if all(s is not None for s in slot) and c0 is not None and c1 is not None:
                self._y.append(math.log(c1 / c0))
                self._f.append(list(slot))  # type: ignore[arg-type]
                self._ts.append(bar_ts)
                self._done.add(bar_ts)
                del self._pending[bar_ts]
                new += 1
            elif self._newest_close is not None and \
                    bar_ts + (self.timeout_bars + self.horizon) * self.freq_ns <= self._newest_close:
                reason = "unpaired" if any(s is None for s in slot) else "unlabeled"
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                del self._pending[bar_ts]
        self.completed += new
        keep_from = min(self._pending) if self._pending else (
            self._newest_close if self._newest_close is not None else 0)
        # Closes are needed for pending bars and their label bars only.
        self._closes = {k: v for k, v in self._closes.items() if k >= keep_from}
        return new

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Complete bars since the last call: ``(y (n,), forecasts (n, V, 3), bar_ts (n,))``.

        Forecast columns are ``lo, pred, hi`` per version, in :attr:`versions` order.
        """
        y = np.asarray(self._y, dtype=np.float64)
        f = np.asarray(self._f, dtype=np.float64).reshape(len(self._y), len(self.versions), 3)
        ts = np.asarray(self._ts, dtype=np.int64)
        if self._ts:
            self._taken_through = max(self._taken_through, max(self._ts))
        self._done = {t for t in self._done if t > self._taken_through}
        self._y, self._f, self._ts = [], [], []
        return y, f, ts


@dataclass
class PairedSample:
    """Accumulated complete pairs of a candidate and an incumbent (what the tests run on)."""

    candidate: str
    incumbent: str
    y: list[float] = field(default_factory=list)
    candidate_forecasts: list[tuple[float, float, float]] = field(default_factory=list)
    incumbent_forecasts: list[tuple[float, float, float]] = field(default_factory=list)
    bar_ts: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Pairs collected."""
        return len(self.y)

    def extend(self, y: np.ndarray, forecasts: np.ndarray, bar_ts: np.ndarray) -> None:
        """Append what :meth:`ForecastJoin.take` returned for ``(candidate, incumbent)``."""
        self.y.extend(float(v) for v in y)
        self.candidate_forecasts.extend(tuple(map(float, r)) for r in forecasts[:, 0, :])  # type: ignore[misc]
        self.incumbent_forecasts.extend(tuple(map(float, r)) for r in forecasts[:, 1, :])  # type: ignore[misc]
        self.bar_ts.extend(int(t) for t in bar_ts)

    def arrays(self, first: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(y, candidate (n, 3), incumbent (n, 3))`` of the first ``first`` pairs (all: None)."""
        k = self.n if first is None else min(first, self.n)
        return (np.asarray(self.y[:k], dtype=np.float64),
                np.asarray(self.candidate_forecasts[:k], dtype=np.float64).reshape(k, 3),
                np.asarray(self.incumbent_forecasts[:k], dtype=np.float64).reshape(k, 3))


# ------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------
def pinball_matrix(y: ArrayLike, forecasts: ArrayLike,
                   quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> np.ndarray:
    """Per-bar pinball loss averaged over the quantile columns of ``forecasts`` (n, Q).

    Examples
    --------
    >>> pinball_matrix([1.0], [[0.0, 1.0, 2.0]]).round(4).tolist()
    [0.0333]
    """
    yv = np.asarray(y, dtype=np.float64).ravel()
    f = np.asarray(forecasts, dtype=np.float64).reshape(len(yv), -1)
    q = np.asarray(quantiles, dtype=np.float64)
    if f.shape[1] != q.size:
        raise InvalidInput(f"forecasts have {f.shape[1]} columns for {q.size} quantiles",
                           field="forecasts")
    err = yv[:, None] - f
    return np.maximum(q * err, (q - 1.0) * err).mean(axis=1)


@dataclass(frozen=True)
class Comparison:
    """Candidate vs incumbent on the same bars (losses: mean pinball over the three quantiles).

    ``dm_stat < 0`` means the candidate's loss is lower. ``p_candidate_better`` and
    ``p_candidate_worse`` are the one-sided p-values of the HLN-corrected Diebold-Mariano test;
    ``dm_p`` is two-sided.
    """

    candidate: str
    incumbent: str
    n: int
    loss_candidate: float
    loss_incumbent: float
    mae_candidate: float
    mae_incumbent: float
    coverage_candidate: float
    coverage_incumbent: float
    dm_stat: float
    dm_p: float
    p_candidate_better: float
    p_candidate_worse: float
    dm_mean_diff: float
    horizon: int
    sharpe_candidate: float
    sharpe_incumbent: float
    return_candidate: float
    return_incumbent: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (non-finite numbers become None)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


def compare_forecasts(y: ArrayLike, candidate: ArrayLike, incumbent: ArrayLike, *,
                      fee_bp: float, periods_per_year: float, horizon: int = 1,
                      quantiles: Sequence[float] = (0.05, 0.5, 0.95), sizing: str = "sign",
                      candidate_name: str = "candidate",
                      incumbent_name: str = "incumbent") -> Comparison:
    """Compare two models' ``(lo, pred, hi)`` forecasts of the same bars.

    Parameters
    ----------
    y
        Realized log returns, shape ``(n,)``.
    candidate, incumbent
        Forecasts ``(n, 3)``: ``lo, pred, hi`` (quantile levels ``quantiles``).
    fee_bp
        Paper trading cost per unit of position change.
    periods_per_year
        Annualization of the Sharpe ratio (bars per year).
    horizon
        Forecast horizon in bars (Diebold-Mariano autocovariance lags ``h - 1``).
    sizing
        How a forecast becomes a position (:func:`~tickcast.monitoring.pnl.signal_positions`).

    Raises
    ------
    InvalidInput
        Shapes disagree, non-finite values, or fewer than two bars.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(0, 1e-3, 400)
    >>> y = 0.8 * x + rng.normal(0, 5e-4, 400)
    >>> good = np.column_stack([0.8 * x - 8e-4, 0.8 * x, 0.8 * x + 8e-4])
    >>> flat = np.tile([-2e-3, 0.0, 2e-3], (400, 1))
    >>> c = compare_forecasts(y, good, flat, fee_bp=1.0, periods_per_year=525_600)
    >>> c.n, c.dm_stat < 0, c.p_candidate_better < 1e-6, c.sharpe_candidate > c.sharpe_incumbent
    (400, True, True, True)
    """
    yv = np.asarray(y, dtype=np.float64).ravel()
    n = len(yv)
    fa = np.asarray(candidate, dtype=np.float64)
    fb = np.asarray(incumbent, dtype=np.float64)
    for name, f in (("candidate", fa), ("incumbent", fb)):
        if f.shape != (n, 3):
            raise InvalidInput(f"{name} forecasts must have shape ({n}, 3), got {f.shape}", field=name)
        if not np.isfinite(f).all():
            raise InvalidInput(f"{name} forecasts have non-finite values", field=name)
    if not np.isfinite(yv).all():
        raise InvalidInput("realized returns have non-finite values", field="y")
    if n < 2:
        raise InvalidInput(f"need at least 2 paired bars, got {n}", field="y")
    la = pinball_matrix(yv, fa, quantiles)
    lb = pinball_matrix(yv, fb, quantiles)
    dm = diebold_mariano(la, lb, h=int(horizon))
    simple = np.expm1(yv)

    def trade(f: np.ndarray) -> tuple[float, float]:
        pos = signal_positions(f[:, 1], (f[:, 2] - f[:, 0]) / BP, sizing)
        r = paper_returns(pos, simple, fee_bp)
        return sharpe_ratio(r, periods_per_year), float(np.prod(1.0 + r) - 1.0)

    sa, ra = trade(fa)
    sb, rb = trade(fb)
    p_worse = 1.0 - dm.p_a_better if math.isfinite(dm.stat) else (1.0 if dm.stat < 0 else 0.0)
    return Comparison(
        candidate=candidate_name, incumbent=incumbent_name, n=n,
        loss_candidate=float(la.mean()), loss_incumbent=float(lb.mean()),
        mae_candidate=float(np.abs(yv - fa[:, 1]).mean()),
        mae_incumbent=float(np.abs(yv - fb[:, 1]).mean()),
        coverage_candidate=float(((yv >= fa[:, 0]) & (yv <= fa[:, 2])).mean()),
        coverage_incumbent=float(((yv >= fb[:, 0]) & (yv <= fb[:, 2])).mean()),
        dm_stat=float(dm.stat), dm_p=float(dm.p), p_candidate_better=float(dm.p_a_better),
        p_candidate_worse=float(p_worse), dm_mean_diff=float(dm.mean_diff), horizon=int(horizon),
        sharpe_candidate=sa, sharpe_incumbent=sb, return_candidate=ra, return_incumbent=rb)


# ------------------------------------------------------------------------------------------
# decisions
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What the controller does next, why, and the figures behind it.

    ``action`` is ``wait`` (not enough evidence yet), ``promote`` / ``reject`` (shadow
    evaluation) or ``rollback`` / ``keep`` (watch of a new champion).
    """

    action: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"action": self.action, "reason": self.reason, "evidence": dict(self.evidence)}


def decide_promotion(cmp: Comparison | None, n_paired: int, cfg: ControllerConfig) -> Decision:
    """Promote a challenger only when it is significantly better and not worse on Sharpe.

    Rules (``cfg``: ``min_paired``, ``dm_alpha``, ``sharpe_tolerance``):

    1. fewer than ``min_paired`` paired, realized bars: ``wait``;
    2. one-sided DM p-value of "challenger has lower pinball loss" ``>= dm_alpha``: ``reject``;
    3. challenger's paper Sharpe below the champion's minus ``sharpe_tolerance``: ``reject``;
    4. otherwise ``promote``.

    The test runs on exactly the first ``min_paired`` pairs, fixed in advance, so repeated
    looks at a growing sample cannot inflate the false-promotion rate.

    Examples
    --------
    >>> from tickcast.config import ControllerConfig
    >>> decide_promotion(None, 12, ControllerConfig(min_paired=200)).action
    'wait'
    """
    if cmp is None or n_paired < cfg.min_paired:
        return Decision("wait", f"{n_paired} of {cfg.min_paired} paired bars",
                        {"paired": n_paired, "min_paired": cfg.min_paired})
    ev = {**cmp.to_dict(), "dm_alpha": cfg.dm_alpha, "sharpe_tolerance": cfg.sharpe_tolerance,
          "min_paired": cfg.min_paired, "loss": "mean pinball (q05=lo, q50=pred, q95=hi)",
          "test": "Diebold-Mariano, HLN-corrected, one-sided (challenger better)"}
    if not cmp.p_candidate_better < cfg.dm_alpha:
        return Decision("reject", f"not significantly better: one-sided DM p = "
                        f"{cmp.p_candidate_better:.4g} >= {cfg.dm_alpha} (DM = {cmp.dm_stat:.3f}, "
                        f"n = {cmp.n})", ev)
    if cmp.sharpe_candidate < cmp.sharpe_incumbent - cfg.sharpe_tolerance:
        return Decision("reject", f"worse paper Sharpe: {cmp.sharpe_candidate:.3g} < champion "
                        f"{cmp.sharpe_incumbent:.3g} - {cfg.sharpe_tolerance}", ev)
    return Decision("promote", f"significantly better: one-sided DM p = {cmp.p_candidate_better:.4g}"
                    f" < {cfg.dm_alpha} (DM = {cmp.dm_stat:.3f}, n = {cmp.n}); paper Sharpe "
                    f"{cmp.sharpe_candidate:.3g} vs {cmp.sharpe_incumbent:.3g}", ev)


@dataclass(frozen=True)
class SlaFigures:
    """Serving outcomes over a period: requests, server errors, requests over the latency SLA."""

    requests: int
    errors: int
    slow: int
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        """Server errors (5xx) per request (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def violation_rate(self) -> float:
        """Share of requests slower than the latency SLA (0 without requests)."""
        return self.slow / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"requests": self.requests, "errors": self.errors, "slow": self.slow,
                "error_rate": self.error_rate, "violation_rate": self.violation_rate,
                "p99_ms": self.p99_ms}


def decide_rollback(cmp: Comparison | None, n_labels: int, sla: SlaFigures | None,
                    cfg: ControllerConfig) -> Decision:
    """Roll a new champion back when it is significantly worse or breaks the serving SLA.

    Rules (``cfg``: ``watch_labels``, ``dm_alpha``, ``max_error_rate``,
    ``max_sla_violation_rate``, ``sla_min_requests``):

    1. at least ``sla_min_requests`` requests since the promotion and an error rate above
       ``max_error_rate`` or a share of requests over the latency SLA above
       ``max_sla_violation_rate``: ``rollback`` at once;
    2. fewer than ``watch_labels`` paired, realized bars (new vs previous champion): ``wait``;
    3. one-sided DM p-value of "new champion has higher pinball loss" ``< dm_alpha``:
       ``rollback``;
    4. otherwise ``keep`` (the watch ends).

    Examples
    --------
    >>> from tickcast.config import ControllerConfig
    >>> cfg = ControllerConfig(watch_labels=100, sla_min_requests=10)
    >>> decide_rollback(None, 5, SlaFigures(requests=40, errors=9, slow=0), cfg).action
    'rollback'
    >>> decide_rollback(None, 5, SlaFigures(requests=40, errors=0, slow=1), cfg).action
    'wait'
    """
    ev: dict[str, Any] = {"labels": n_labels, "watch_labels": cfg.watch_labels,
                          "dm_alpha": cfg.dm_alpha, "max_error_rate": cfg.max_error_rate,
                          "max_sla_violation_rate": cfg.max_sla_violation_rate,
                          "sla_min_requests": cfg.sla_min_requests,
                          "sla": None if sla is None else sla.to_dict()}
    if sla is not None and sla.requests >= cfg.sla_min_requests:
        if sla.error_rate > cfg.max_error_rate:
            return Decision("rollback", f"error rate {sla.error_rate:.3f} > {cfg.max_error_rate} "
                            f"over {sla.requests} requests since the promotion", ev)
        if sla.violation_rate > cfg.max_sla_violation_rate:
            return Decision("rollback", f"latency SLA broken: {sla.violation_rate:.3f} of "
                            f"{sla.requests} requests over the SLA > {cfg.max_sla_violation_rate}", ev)
    if cmp is None or n_labels < cfg.watch_labels:
        return Decision("wait", f"{n_labels} of {cfg.watch_labels} labels", ev)
    ev.update(cmp.to_dict())
    ev["test"] = "Diebold-Mariano, HLN-corrected, one-sided (new champion worse)"
    if cmp.p_candidate_worse < cfg.dm_alpha:
        return Decision("rollback", f"significantly worse than the previous champion: one-sided "
                        f"DM p = {cmp.p_candidate_worse:.4g} < {cfg.dm_alpha} (DM = "
                        f"{cmp.dm_stat:.3f}, n = {cmp.n})", ev)
    return Decision("keep", f"not significantly worse than the previous champion: one-sided DM "
                    f"p = {cmp.p_candidate_worse:.4g} >= {cfg.dm_alpha} (n = {cmp.n})", ev)


# ------------------------------------------------------------------------------------------
# serving SLA from the replicas' metric snapshots
# ------------------------------------------------------------------------------------------
_PREDICT_ENDPOINTS = ("predict", "batch")


def _totals(snapshot: Mapping[str, Any]) -> tuple[int, int, int, list[int], list[float]]:
    """(requests, 5xx, slow, latency histogram, bucket bounds) of prediction endpoints."""
    requests = errors = slow = 0
    for key, count in (snapshot.get("requests") or {}).items():
        endpoint, _, code = str(key).split("|", 2) if str(key).count("|") >= 2 else ("", "", "0")
        if endpoint not in _PREDICT_ENDPOINTS:
            continue
        requests += int(count)
        if code.isdigit() and int(code) >= 500:
            errors += int(count)
    for key, count in (snapshot.get("sla_violations") or {}).items():
        if str(key).split("|", 1)[0] in _PREDICT_ENDPOINTS:
            slow += int(count)
    bounds = [float(b) for b in snapshot.get("buckets_ms") or []]
    hist = [0] * (len(bounds) + 1)
    for key, counts in (snapshot.get("latency_hist") or {}).items():
        if str(key).split("|", 1)[0] in _PREDICT_ENDPOINTS and len(counts) == len(hist):
            hist = [a + int(b) for a, b in zip(hist, counts)]
    return requests, errors, slow, hist, bounds


def sla_since(baseline: Mapping[str, Mapping[str, Any]],
              current: Mapping[str, Mapping[str, Any]]) -> SlaFigures:
    """Serving figures since ``baseline``, from per-replica metric snapshots.

    Both arguments map a replica id to its cumulative snapshot
    (:meth:`serve_app.metrics.ServeMetrics.snapshot`). A replica absent from the baseline (new)
    or whose counters went down (restarted) counts from zero. The p99 latency is the upper
    bound of the histogram bucket holding the 99th percentile (None without requests; inf
    when it lies in the overflow bucket).

    Examples
    --------
    >>> base = {"r1": {"requests": {"predict|blue|200": 10}, "sla_violations": {}}}
    >>> now = {"r1": {"requests": {"predict|blue|200": 30, "predict|none|503": 5},
    ...               "sla_violations": {"predict|blue": 2}},
    ...        "r2": {"requests": {"predict|green|200": 5}, "sla_violations": {}}}
    >>> sla_since(base, now)
    SlaFigures(requests=30, errors=5, slow=2, p99_ms=None)
    """
    requests = errors = slow = 0
    hist: list[int] | None = None
    bounds: list[float] = []
    for replica, snap in current.items():
        r1, e1, s1, h1, b1 = _totals(snap)
        r0, e0, s0, h0, _ = _totals(baseline.get(replica, {}))
        if r1 < r0 or e1 < e0 or s1 < s0:  # restarted replica: its counters began again
            r0 = e0 = s0 = 0
            h0 = [0] * len(h1)
        requests += r1 - r0
        errors += e1 - e0
        slow += s1 - s0
        if b1 and len(h0) == len(h1):
            delta = [max(0, a - b) for a, b in zip(h1, h0)]
            if hist is None or len(hist) != len(delta):
                hist, bounds = delta, b1
            else:
                hist = [a + b for a, b in zip(hist, delta)]
    p99: float | None = None
    if hist is not None and sum(hist) > 0:
        target = 0.99 * sum(hist)
        acc = 0
        for i, c in enumerate(hist):
            acc += c
            if acc >= target:
                p99 = bounds[i] if i < len(bounds) else math.inf
                break
    return SlaFigures(requests=requests, errors=errors, slow=slow, p99_ms=p99)
