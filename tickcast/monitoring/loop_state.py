"""Per-asset state of the closed loop's monitors (pure: the actors feed them and persist them).

* :class:`DriftTracker` -- the champion's :class:`~tickcast.monitoring.drift.DriftMonitor` fed
  with the features published at each bar close, the champion's logged forecasts (prediction
  drift) and, once the next bar has closed, the realized returns (label, concept and
  performance drift).
* :class:`SafetyTracker` -- :class:`~tickcast.monitoring.safety.SafetyState` fed once per bar
  close, in bar order, with the champion's forecast for the next bar, and with the user's own
  book updates (``book:<ASSET>``), applied in time order between the bars.

Both are plain objects that pickle (the actors checkpoint them) and never recompute a window:
every input goes to the incremental structures of the monitors, in batches.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from tickcast.config import SafetyConfig
from tickcast.market.calendar import TradingCalendar
from tickcast.monitoring.book import BookRejected, BookUpdate
from tickcast.monitoring.drift import DriftMonitor
from tickcast.monitoring.pnl import BP
from tickcast.monitoring.safety import SafetyState, SafetyStatus
from tickcast.monitoring.shadow_eval import Forecast, ForecastJoin

# Column of the prediction-drift reference and of the live prediction rows: the median
# forecast. The interval width is left out: it follows the short realized volatility (the
# conformal scale), which feature drift already watches, and its clustering makes a short
# window differ from a days-long reference in calm markets too.
PREDICTION_COLUMNS: tuple[str, ...] = ("pred",)


class DriftTracker:
    """Drift of one asset's champion from its live inputs.

    Parameters
    ----------
    asset, champion
        The asset and the champion version the monitor was built for.
    monitor
        A monitor built from the champion's reference (prediction reference columns
        :data:`PREDICTION_COLUMNS` when it has one).
    horizon, freq_ns
        Forecast horizon (bars) and bar length: the label of bar ``t`` is
        ``log(close[t + horizon] / close[t])``.
    timeout_bars
        Forecasts still unlabeled this many bars later are dropped.

    Examples
    --------
    >>> from tickcast.config import DriftConfig
    >>> from tickcast.monitoring.drift import Reference
    >>> rng = np.random.default_rng(5)
    >>> ref = Reference.from_array(rng.normal(size=(500, 2)), ["a", "b"])
    >>> mon = DriftMonitor(DriftConfig(window=50, min_window=20, eval_every=10), ref)
    >>> tr = DriftTracker("X", "v1", mon, horizon=1, freq_ns=60)
    >>> rows = [(60 * i, ("b", "a"), rng.normal(size=2) + 3.0) for i in range(40)]
    >>> [e["type"] for e in tr.on_features(rows)][-3:]
    ['drift_level', 'drift_retrain', 'drift_kind']
    >>> tr.level, tr.counts["features"], tr.status()["drift_kind"]
    ('CRITICAL', 40, 'covariate')
    """

    def __init__(self, asset: str, champion: str, monitor: DriftMonitor, *, horizon: int,
                 freq_ns: int, timeout_bars: int = 30) -> None:
        self.asset = asset
        self.champion = champion
        self.monitor = monitor
        self.horizon = int(horizon)
        self.freq_ns = int(freq_ns)
        self.join = ForecastJoin((champion,), self.horizon, self.freq_ns, timeout_bars=timeout_bars)
        self._order_cache: dict[tuple[str, ...], np.ndarray | None] = {}
        self.last_feature_bar = -1
        self.last_forecast_bar = -1
        self.counts: dict[str, int] = {"features": 0, "forecasts": 0, "labels": 0}
        self.rejected: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------
    @property
    def level(self) -> str:
        """Current alert level (NORMAL / WARNING / CRITICAL)."""
        return self.monitor.level

    @property
    def score(self) -> float:
        """Latest overall drift score (0 before the first evaluation)."""
        rep = self.monitor.report
        return 0.0 if rep is None else float(rep.score)

    @property
    def retrain(self) -> bool:
        """Latest retrain flag."""
        rep = self.monitor.report
        return bool(rep is not None and rep.retrain)

    def _reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    def _order(self, names: tuple[str, ...]) -> np.ndarray | None:
        """Column indices turning a row in ``names`` order into the monitor's input order."""
        if names not in self._order_cache:
            pos = {n: i for i, n in enumerate(names)}
            need = self.monitor.input_names
            self._order_cache[names] = (np.array([pos[n] for n in need], dtype=np.int64)
                                        if all(n in pos for n in need) else None)
        return self._order_cache[names]

    # -- inputs ------------------------------------------------------------------------
    def on_features(self, rows: Iterable[tuple[int, Sequence[str], ArrayLike]]) -> list[dict[str, Any]]:
        """Feature rows ``(bar_ts, names, values)`` published at bar closes, oldest first.

        A row of a bar already seen (an amendment, a replay) is skipped, so each bar counts
        once; a row lacking the model's features is rejected (reason ``schema``).
        """
        batch: list[np.ndarray] = []
        for bar_ts, names, values in rows:
            if bar_ts <= self.last_feature_bar:
                self._reject("stale_bar")
                continue
            order = self._order(tuple(names))
            vals = np.asarray(values, dtype=np.float64).ravel()
            if order is None or vals.size != len(names):
                self._reject("schema")
                continue
            batch.append(vals[order])
            self.last_feature_bar = int(bar_ts)
        if not batch:
            return []
        self.counts["features"] += len(batch)
        return self.monitor.update_features(np.vstack(batch))

    def on_forecasts(self, forecasts: Iterable[Forecast]) -> list[dict[str, Any]]:
        """The champion's logged forecasts: prediction drift (first per bar) and labels to come."""
        mine = [f for f in forecasts if f.version == self.champion]
        if not mine:
            return []
        self.join.add(mine)
        rows = []
        for f in mine:
            if f.bar_ts <= self.last_forecast_bar:
                continue
            self.last_forecast_bar = f.bar_ts
            rows.append((f.pred,))
        if not rows:
            return []
        self.counts["forecasts"] += len(rows)
        if self.monitor.predictions is None:
            return []
        return self.monitor.update_predictions(np.asarray(rows, dtype=np.float64))

    def closes_needed(self) -> tuple[int, int] | None:
        """Range of bar closes the pending forecasts need (``[start, end)`` ns) or None."""
        return self.join.needed_range()

    def on_closes(self, ts: ArrayLike, close: ArrayLike) -> list[dict[str, Any]]:
        """Bar closes from the bar store: realized returns of pending forecasts.

        They feed label drift (P(Y)), concept drift (P(Y|X), the forecasts' standardized
        residuals) and, when the model has validation figures, performance drift.
        """
        self.join.add_closes(ts, close)
        if not self.join.settle():
            return []
        y, f, _ = self.join.take()
        self.counts["labels"] += len(y)
        return self.monitor.update_outcomes(f[:, 0, :], y)

    def status(self) -> dict[str, Any]:
        """Level, score, retrain flag, counters (JSON-ready)."""
        rep = self.monitor.report
        return {"asset": self.asset, "champion": self.champion, "level": self.level,
                "score": self.score, "retrain": self.retrain,
                "feature_score": None if rep is None else rep.feature_score,
                "prediction_score": None if rep is None else rep.prediction_score,
                "performance_score": None if rep is None else rep.performance_score,
                "label_score": None if rep is None else rep.label_score,
                "concept_score": None if rep is None else rep.concept_score,
                "drift_kind": "none" if rep is None else rep.drift_kind.value,
                "drifted_features": [] if rep is None else list(rep.drifted_features),
                "last_feature_bar": self.last_feature_bar, "counts": dict(self.counts),
                "rejected": dict(self.rejected), "labels_pending": self.join.pending,
                "labels_dropped": dict(self.join.dropped)}


class SafetyTracker:
    """Feeds :class:`SafetyState` once per closed bar, in order, with the champion's forecast.

    A bar is processed when the champion's forecast for it has arrived, or as soon as a later
    bar has closed (the position for the next bar had to be decided by then: without a
    forecast it is flat). Forecasts of other versions and of bars already processed are
    ignored; the first forecast of a bar counts.

    Parameters
    ----------
    cfg
        The ``safety`` config section.
    fee_bp
        Paper trading cost (``model.fee_bp``).
    champion
        Current champion version (None: no model yet, every bar flat).
    calendar
        The asset's trading calendar. The first bar after a closure is fed as a *reopen*
        (:meth:`SafetyState.update`): the jump over the closure is no one-bar return, so the
        volatility windows and the regime skip it; the paper accounts still mark it.

    Examples
    --------
    >>> from tickcast.config import SafetyConfig
    >>> tr = SafetyTracker(SafetyConfig(vol_short=2, vol_long=4), 1.0, "v1")
    >>> tr.on_bars([0, 60, 120], [100.0, 101.0, 100.5])
    >>> [s.bar for s in tr.step()]  # the last bar waits for its forecast or the next bar
    [1, 2]
    >>> tr.on_forecasts([Forecast("X", "blue", "v1", 120, 0.001, -0.002, 0.004)])
    >>> [(s.bar, s.position) for s in tr.step()]
    [(3, 1.0)]

    The user's book: updates are applied before the first bar that opens at or after them.

    >>> from tickcast.monitoring.book import BookKind, BookUpdate
    >>> tr.on_book([BookUpdate("X", 150, BookKind.PNL, -800.0, capital=10_000.0)])
    >>> tr.on_bars([180, 240], [100.4, 100.3])
    >>> [(s.bar, s.source.value, round(s.drawdown, 3)) for s in tr.step()]
    [(4, 'book', 0.0)]
    >>> tr.on_book([BookUpdate("X", 200, BookKind.PNL, -1_400.0)])
    >>> tr.on_bars([300], [100.2])
    >>> [(s.bar, s.halted, round(s.drawdown, 3)) for s in tr.step()]
    [(5, True, 0.065)]
    """

    # Default for trackers pickled before calendars existed (24/7).
    calendar: TradingCalendar | None = None

    def __init__(self, cfg: SafetyConfig, fee_bp: float, champion: str | None,
                 calendar: TradingCalendar | None = None) -> None:
        self.calendar = calendar
        self.cfg = cfg
        self.state = SafetyState(cfg, fee_bp)
        self.champion = champion
        self._queue: deque[tuple[int, float]] = deque()
        self._forecasts: dict[int, tuple[float, float]] = {}
        self.last_bar_ts = -1  # newest bar queued
        self.last_done_ts = -1  # newest bar processed
        self.counts: dict[str, int] = {"bars": 0, "with_forecast": 0, "without_forecast": 0,
                                       "warm_bars": 0}
        self._book: list[tuple[int, int, BookUpdate]] = []  # heap by (ts, arrival)
        self._book_seq = 0
        self.book_applied = 0  # user book updates applied
        self.book_rejected: dict[str, int] = {}  # reason -> count

    @property
    def status(self) -> SafetyStatus:
        """The last status (regime, multiplier, halt, P&L)."""
        return self.state.status

    def warm(self, ts: ArrayLike, close: ArrayLike) -> SafetyStatus:
        """Fill the volatility windows from stored history (no forecasts, events discarded).

        For a first start: the regime then reflects the recent market at once instead of
        after ``vol_long`` live bars. Only bars newer than any seen are used.
        """
        for t, c in zip(np.asarray(ts, dtype=np.int64).tolist(),
                        np.asarray(close, dtype=np.float64).tolist()):
            if t <= self.last_bar_ts or not (math.isfinite(c) and c > 0):
                continue
            self.state.update(c, None, None, ts=t, reopen=self._reopens(t))
            self.last_bar_ts = self.last_done_ts = t
            self.counts["warm_bars"] += 1
        return self.state.status

    def on_bars(self, ts: ArrayLike, close: ArrayLike) -> None:
        """Closed bars (ts ascending); bars not newer than the last queued one are ignored."""
        for t, c in zip(np.asarray(ts, dtype=np.int64).tolist(),
                        np.asarray(close, dtype=np.float64).tolist()):
            if t <= self.last_bar_ts or not (math.isfinite(c) and c > 0):
                continue
            self._queue.append((t, c))
            self.last_bar_ts = t

    def on_forecasts(self, forecasts: Iterable[Forecast]) -> None:
        """The champion's forecasts (first per bar) for bars not yet processed."""
        for f in forecasts:
            if f.version != self.champion or f.bar_ts <= self.last_done_ts or f.bar_ts in self._forecasts:
                continue
            self._forecasts[f.bar_ts] = (f.pred, (f.hi - f.lo) / BP)

    def on_book(self, items: Iterable[BookUpdate | BookRejected]) -> None:
        """The user's book updates, decoded (``decode_book_entry``); rejections are counted.

        Updates wait until a bar opening at or after their ``ts`` is processed, and are
        applied in ``ts`` order before it: a position holds over the bars that open after it,
        a P&L is judged at that bar's close. An update not newer than the last applied is
        rejected (``stale``), a P&L before any capital too (``missing_capital``).
        """
        for item in items:
            if isinstance(item, BookRejected):
                self._book_reject(item.reason.value)
                continue
            heapq.heappush(self._book, (item.ts, self._book_seq, item))
            self._book_seq += 1

    def _book_reject(self, reason: str) -> None:
        self.book_rejected[reason] = self.book_rejected.get(reason, 0) + 1

    def _apply_book(self, until_ts: int) -> None:
        while self._book and self._book[0][0] <= until_ts:
            _, _, update = heapq.heappop(self._book)
            why = self.state.apply_book(update)
            if why is None:
                self.book_applied += 1
            else:
                self._book_reject(why.value)

    def clear_book(self, reason: str, ts: int | None = None) -> SafetyStatus:
        """Stop following the user's book (pending updates dropped): back to the paper account."""
        self._book.clear()
        return self.state.clear_book(reason, ts=ts)

    def step(self) -> list[SafetyStatus]:
        """Process every bar that can be processed now; returns their statuses."""
        out: list[SafetyStatus] = []
        while self._queue:
            t, close = self._queue[0]
            fc = self._forecasts.pop(t, None)
            if fc is None and len(self._queue) == 1:
                break  # the newest bar waits for its forecast (or the next bar)
            self._queue.popleft()
            self._apply_book(t)
            reopen = self._reopens(t)
            if fc is None:
                status = self.state.update(close, None, None, ts=t, reopen=reopen)
                self.counts["without_forecast"] += 1
            else:
                status = self.state.update(close, fc[0], fc[1], ts=t, reopen=reopen)
                self.counts["with_forecast"] += 1
            self.counts["bars"] += 1
            self.last_done_ts = t
            out.append(status)
        for k in [k for k in self._forecasts if k <= self.last_done_ts]:
            del self._forecasts[k]
        return out

    def _reopens(self, ts: int) -> bool:
        """Whether the market closed between the last bar processed and the bar at ``ts``."""
        cal = self.calendar
        return (cal is not None and not cal.always_open and self.last_done_ts >= 0
                and cal.closed_between(self.last_done_ts, ts))

    def new_champion(self, version: str | None, ts: int | None = None) -> SafetyStatus:
        """A new champion trades from now on: fresh paper accounts, halt lifted."""
        self.champion = version
        self._forecasts.clear()
        return self.state.reset_pnl(f"new champion {version}", ts=ts)

    def to_dict(self) -> dict[str, Any]:
        """Regime, multiplier, halt, P&L and counters (JSON-ready)."""
        st = self.state.status
        return {"champion": self.champion, "regime": st.regime, "multiplier": st.multiplier,
                "halted": st.halted, "ratio": st.ratio, "drawdown": st.drawdown,
                "equity": st.equity, "position": st.position, "bar": st.bar,
                "source": self.state.source.value, "paper_drawdown": self.state.shadow.drawdown,
                "book": self.state.book.to_dict() if self.state.book.active else None,
                "book_applied": self.book_applied, "book_pending": len(self._book),
                "book_rejected": dict(self.book_rejected),
                "edge_cost_bp": self.state.edge_cost_bp,
                "last_bar_ts": self.last_bar_ts, "last_done_ts": self.last_done_ts,
                "queued": len(self._queue), "counts": dict(self.counts)}
