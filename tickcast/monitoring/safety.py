"""Per-asset safety state: volatility regime, paper P&L, halt and position multiplier.

Called once per consensus bar close with the champion's forecast for the next bar:
``SafetyState.update(bar_close, forecast, interval_bp) -> SafetyStatus``.

Regime
------
``ratio = vol_short / vol_long`` where each is the realized volatility (root mean square of
bar log returns, no demeaning) over the last ``safety.vol_short`` / ``safety.vol_long`` returns
(the long window contains the short one). Until ``vol_long`` returns exist the ratio is
undefined and the regime stays where it is. When the long volatility is 0 (flat prices), so is
the short one, and the ratio is taken as 1. Target regime: CRISIS when ``ratio >=
crisis_ratio``, ELEVATED when ``ratio >= elevated_ratio``, else NORMAL.

Hysteresis: the regime steps *up* to a higher target at once. It steps *down* only after
``recovery_bars`` consecutive bars whose target is below the current regime, and then to the
highest target seen during that streak (a streak that mixes ELEVATED and NORMAL bars out of
CRISIS lands in ELEVATED). A bar whose target equals the current regime ends the streak.

Paper P&L and halt
------------------
Two paper accounts (:class:`~tickcast.monitoring.pnl.PaperPnL`, fees ``model.fee_bp``) follow
the champion's signal: the *shadow* account trades ``signal x regime multiplier x interval
factor`` -- everything except the halt -- and the *managed* account trades ``signal x
multiplier``, the exposure actually advised.

The signal has a deadband (``safety.deadband``): it is 0 -- flat -- unless the forecast's edge
beats its cost, ``|median| > model.fee_bp + safety.half_spread_bp`` (in bp of price; the
market's bid/ask is not known here, so the half spread is configured). Beyond it the signal is
sized by ``safety.sizing``: the sign of the median, or the median over half the interval,
clipped to 1. A model without skill -- whose median is small against the cost -- therefore
stays flat and pays no fees, and its accounts cannot halt by themselves.

The halt follows one drawdown, the *followed* book's:

* the shadow paper account's, by default (it keeps evolving while trading is halted, the
  managed account being flat then);
* the user's own book (:class:`~tickcast.monitoring.book.UserBook`) once the user has reported
  one through :meth:`SafetyState.apply_book` (positions marked at each bar close, or P&L as
  reported), until :meth:`SafetyState.clear_book`.

Then:

* halt when the followed drawdown exceeds ``max_drawdown``;
* resume when at least ``halt_recovery_bars`` bars have passed since the halt AND the followed
  drawdown is back at or below ``halt_resume_drawdown`` (both measured at a bar close). A user
  book that went flat keeps its drawdown; the user lifts the halt by rebasing the book (a new
  ``capital``, see :mod:`tickcast.monitoring.book`).

:meth:`SafetyState.reset_pnl` starts fresh paper accounts (a new champion) and lifts a halt of
the paper account; a halt on the user's book stays (the user's losses are not the model's).

Multiplier
----------
``multipliers[regime] x (wide_interval_multiplier if interval_bp > wide_interval_bp) x
(0 if halted)``. Every regime change, halt, resume and wide-interval switch is returned once, in
``SafetyStatus.events``, as a dict with the figures that triggered it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enum import Enum

from tickcast.config import SafetyConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.book import BookRejection, BookUpdate, UserBook
from tickcast.monitoring.metrics_names import REGIME_CODES
from tickcast.monitoring.pnl import BP, PaperPnL, signal_positions

REGIMES: tuple[str, ...] = tuple(sorted(REGIME_CODES, key=REGIME_CODES.__getitem__))


class HaltSource(str, Enum):
    """Whose drawdown the halt follows."""

    PAPER = "paper"  # the shadow paper account of the champion's signal
    BOOK = "book"  # the user's own book


@dataclass(frozen=True)
class SafetyStatus:
    """What serving needs after a bar, plus the evidence behind it."""

    regime: str
    multiplier: float
    halted: bool
    events: tuple[dict[str, Any], ...] = ()
    ratio: float | None = None  # vol_short / vol_long (None while the long window fills)
    drawdown: float = 0.0  # the followed drawdown (the one that halts; see source)
    equity: float = 1.0  # managed account equity
    position: float = 0.0  # managed position now held (signal x multiplier)
    bar: int = 0  # bar closes seen
    ts: int | None = None
    source: HaltSource = HaltSource.PAPER  # whose drawdown the halt follows
    paper_drawdown: float = 0.0  # shadow paper account drawdown
    book: dict[str, Any] | None = None  # the user's book (None: none reported)

    def to_redis_fields(self, updated_ns: int) -> dict[str, str]:
        """Fields of the ``safety:<ASSET>`` hash the serving app reads."""
        return {"regime": self.regime, "multiplier": repr(float(self.multiplier)),
                "halted": "1" if self.halted else "0", "updated": str(int(updated_ns))}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"regime": self.regime, "multiplier": self.multiplier, "halted": self.halted,
                "events": list(self.events), "ratio": self.ratio, "drawdown": self.drawdown,
                "equity": self.equity, "position": self.position, "bar": self.bar, "ts": self.ts,
                "source": self.source.value, "paper_drawdown": self.paper_drawdown,
                "book": self.book}


class SafetyState:
    """Regime, paper P&L, halt and multiplier of one asset (see the module notes).

    Parameters
    ----------
    cfg
        The ``safety`` config section.
    fee_bp
        Trading cost in basis points (``model.fee_bp``); with ``cfg.half_spread_bp`` it makes
        the deadband.

    Examples
    --------
    >>> from tickcast.config import SafetyConfig
    >>> cfg = SafetyConfig(vol_short=5, vol_long=50, recovery_bars=3)
    >>> state = SafetyState(cfg, fee_bp=1.0)
    >>> rng = np.random.default_rng(1)
    >>> r = np.r_[rng.normal(0, 1e-3, 60), rng.normal(0, 5e-3, 8), rng.normal(0, 1e-3, 30)]
    >>> statuses = [state.update(c) for c in 100 * np.exp(np.cumsum(r))]
    >>> [(s.bar, e["from"], e["to"], round(e["ratio"], 2)) for s in statuses for e in s.events]
    [(63, 'NORMAL', 'ELEVATED', 2.06), (71, 'ELEVATED', 'NORMAL', 1.29)]
    >>> statuses[65].regime, statuses[65].multiplier, statuses[-1].multiplier
    ('ELEVATED', 0.5, 1.0)
    """

    def __init__(self, cfg: SafetyConfig, fee_bp: float = 1.0) -> None:
        self.cfg = cfg
        self.fee_bp = float(fee_bp)
        self._sq = np.zeros(cfg.vol_long)  # squared log returns, ring buffer
        self._head = 0
        self._n_returns = 0
        self._prev_close: float | None = None
        self._bars = 0
        self._regime = "NORMAL"
        self._below = 0  # consecutive bars whose target is below the regime
        self._below_peak = 0  # highest target code during that streak
        self._ratio: float | None = None
        self._halted = False
        self._halt_bar = 0
        self._wide = False
        self.shadow = PaperPnL(fee_bp)
        self.managed = PaperPnL(fee_bp)
        self.book = UserBook()
        self._status = SafetyStatus("NORMAL", self._multiplier(), False)

    # -- read-only state ---------------------------------------------------------------
    @property
    def regime(self) -> str:
        """Current regime: NORMAL, ELEVATED or CRISIS."""
        return self._regime

    @property
    def halted(self) -> bool:
        """Whether trading is halted by the drawdown limit."""
        return self._halted

    @property
    def multiplier(self) -> float:
        """Current position multiplier."""
        return self._multiplier()

    @property
    def status(self) -> SafetyStatus:
        """The status returned by the last update (no events before the first)."""
        return self._status

    @property
    def source(self) -> HaltSource:
        """Whose drawdown the halt follows: the user's book once reported, else the paper account."""
        return HaltSource.BOOK if self.book.active else HaltSource.PAPER

    @property
    def edge_cost_bp(self) -> float:
        """The deadband: the edge (bp) a forecast's median must exceed to take a position."""
        return self.fee_bp + self.cfg.half_spread_bp

    def _followed_drawdown(self) -> float:
        return self.book.drawdown if self.book.active else self.shadow.drawdown

    def signal(self, forecast: float | None, interval_bp: float | None) -> float:
        """The position the signal asks for (before multipliers): 0 inside the deadband.

        Examples
        --------
        >>> from tickcast.config import SafetyConfig
        >>> state = SafetyState(SafetyConfig(), fee_bp=1.0)  # cost 1 + 1 bp half spread
        >>> [state.signal(f, None) for f in (1.5e-4, -2.5e-4, 3e-4, None)]
        [0.0, -1.0, 1.0, 0.0]
        """
        if forecast is None:
            return 0.0
        if self.cfg.deadband and not abs(forecast) / BP > self.edge_cost_bp:
            return 0.0
        return float(signal_positions(forecast, interval_bp, self.cfg.sizing))

    def _multiplier(self, with_halt: bool = True) -> float:
        m = float(self.cfg.multipliers[self._regime])
        if self._wide:
            m *= self.cfg.wide_interval_multiplier
        if with_halt and self._halted:
            return 0.0
        return m

    # -- update ------------------------------------------------------------------------
    def update(self, bar_close: float, forecast: float | None = None,
               interval_bp: float | None = None, *, ts: int | None = None,
               reopen: bool = False) -> SafetyStatus:
        """Process one bar close and the champion's forecast for the next bar.

        Parameters
        ----------
        bar_close
            Close price of the bar that just closed.
        forecast
            Median forecast (log return) of the next bar; ``None``: no signal, flat.
        interval_bp
            Width of the predicted interval in basis points of price; ``None``: unknown.
        ts
            Bar timestamp (UNIX ns), copied into the events.
        reopen
            The bar is the first after a market closure: its move from the last close before
            the closure is marked on the paper accounts (a held position bears it) but is not
            a one-bar return, so it stays out of the volatility windows and the regime.

        Raises
        ------
        InvalidInput
            ``bar_close`` not finite and > 0, ``forecast`` not finite, ``interval_bp`` not
            finite and >= 0 (the field is named; the state is left unchanged).
        """
        close = _number(bar_close, "bar_close")
        if not close > 0:
            raise InvalidInput(f"bar_close must be > 0, got {bar_close!r}", field="bar_close")
        fc = None if forecast is None else _number(forecast, "forecast")
        width = None if interval_bp is None else _number(interval_bp, "interval_bp")
        if width is not None and width < 0:
            raise InvalidInput(f"interval_bp must be >= 0, got {interval_bp!r}", field="interval_bp")

        self._bars += 1
        events: list[dict[str, Any]] = []
        if self._prev_close is not None:
            simple = close / self._prev_close - 1.0
            self.shadow.mark(simple)
            self.managed.mark(simple)
            self.book.mark(simple)
            if not reopen:
                self._push_return(math.log(close / self._prev_close))
                self._regime_step(events, ts)
        self._prev_close = close
        self._halt_step(events, ts)
        self._wide_step(width, events, ts)

        signal = self.signal(fc, width)
        self.shadow.rebalance(signal * self._multiplier(with_halt=False))
        mult = self._multiplier()
        self.managed.rebalance(signal * mult)
        for ev in events:  # the exposure in force after this bar, whatever triggered it
            ev["multiplier"] = mult
        self._status = self._make_status(mult, tuple(events), ts)
        return self._status

    def _make_status(self, mult: float, events: tuple[dict[str, Any], ...],
                     ts: int | None) -> SafetyStatus:
        return SafetyStatus(self._regime, mult, self._halted, events, self._ratio,
                            self._followed_drawdown(), self.managed.equity, self.managed.position,
                            self._bars, ts, self.source, self.shadow.drawdown,
                            self.book.to_dict() if self.book.active else None)

    def apply_book(self, update: BookUpdate) -> BookRejection | None:
        """Apply a user book update; from the first one on, the halt follows the book.

        Updates take effect at once (a position holds over the bars that close after it); the
        halt is judged at the next bar close. Returns ``None``, or the reason the update was
        not applied (``stale``: not newer than the last; ``missing_capital``: a P&L before
        any capital), the state then unchanged.
        """
        return self.book.apply(update)

    def clear_book(self, reason: str, *, ts: int | None = None) -> SafetyStatus:
        """Stop following the user's book; the halt follows the paper account again."""
        events: tuple[dict[str, Any], ...] = ({
            "type": "book_cleared", "reason": reason, "bar": self._bars, "ts": ts,
            "book": self.book.to_dict(), "halted": self._halted},)
        self.book = UserBook()
        self._status = self._make_status(self._multiplier(), events, ts)
        return self._status

    def reset_pnl(self, reason: str, *, ts: int | None = None) -> SafetyStatus:
        """Start fresh paper accounts (e.g. a new champion) and lift a halt.

        The volatility history and the regime are kept: they describe the market, not the
        model.
        """
        book = self.book.active
        events: list[dict[str, Any]] = [{
            "type": "pnl_reset", "reason": reason, "bar": self._bars, "ts": ts,
            "equity": self.managed.equity, "drawdown": self.shadow.drawdown,
            "was_halted": self._halted, "source": self.source.value,
            # A halt on the user's book is the user's risk: a new champion does not lift it.
            "halt_kept": self._halted and book}]
        self.shadow = PaperPnL(self.fee_bp)
        self.managed = PaperPnL(self.fee_bp)
        if not book:
            self._halted = False
        mult = self._multiplier()
        events[0]["multiplier"] = mult
        self._status = self._make_status(mult, tuple(events), ts)
        return self._status

    # -- steps -------------------------------------------------------------------------
    def _push_return(self, r: float) -> None:
        self._sq[self._head] = r * r
        self._head = (self._head + 1) % self._sq.size
        self._n_returns += 1

    def _vols(self) -> tuple[float, float]:
        n_long = self._sq.size
        short_idx = (self._head - 1 - np.arange(self.cfg.vol_short)) % n_long
        return (math.sqrt(float(self._sq[short_idx].mean())),
                math.sqrt(float(self._sq.mean())))

    def _regime_step(self, events: list[dict[str, Any]], ts: int | None) -> None:
        c = self.cfg
        if self._n_returns < c.vol_long:
            return
        vol_s, vol_l = self._vols()
        ratio = vol_s / vol_l if vol_l > 0 else 1.0
        self._ratio = ratio
        target = 2 if ratio >= c.crisis_ratio else 1 if ratio >= c.elevated_ratio else 0
        current = REGIME_CODES[self._regime]
        new = current
        if target > current:
            new = target
        elif target < current:
            self._below_peak = target if self._below == 0 else max(self._below_peak, target)
            self._below += 1
            if self._below >= c.recovery_bars:
                new = self._below_peak
        else:
            self._below = 0
        if new == current:
            return
        bars_below = self._below if new < current else 0
        self._below = 0
        before = self._regime
        self._regime = REGIMES[new]
        events.append({
            "type": "regime", "from": before, "to": self._regime, "bar": self._bars, "ts": ts,
            "ratio": ratio, "vol_short": vol_s, "vol_long": vol_l,
            "elevated_ratio": c.elevated_ratio, "crisis_ratio": c.crisis_ratio,
            "recovery_bars": c.recovery_bars, "bars_below": bars_below})

    def _halt_step(self, events: list[dict[str, Any]], ts: int | None) -> None:
        c = self.cfg
        dd = self._followed_drawdown()
        followed = self.book if self.book.active else self.shadow
        evidence = {"source": self.source.value, "equity": followed.equity, "peak": followed.peak}
        if not self._halted and dd > c.max_drawdown:
            self._halted = True
            self._halt_bar = self._bars
            events.append({"type": "halt", "bar": self._bars, "ts": ts, "drawdown": dd,
                           "max_drawdown": c.max_drawdown, **evidence})
        elif self._halted:
            waited = self._bars - self._halt_bar
            if waited >= c.halt_recovery_bars and dd <= c.halt_resume_drawdown:
                self._halted = False
                events.append({"type": "resume", "bar": self._bars, "ts": ts, "drawdown": dd,
                               "halt_resume_drawdown": c.halt_resume_drawdown,
                               "bars_halted": waited, "halt_recovery_bars": c.halt_recovery_bars,
                               **evidence})

    def _wide_step(self, width: float | None, events: list[dict[str, Any]], ts: int | None) -> None:
        c = self.cfg
        wide = width is not None and width > c.wide_interval_bp
        if wide == self._wide:
            return
        self._wide = wide
        events.append({"type": "wide_interval", "active": wide, "bar": self._bars, "ts": ts,
                       "interval_bp": width, "wide_interval_bp": c.wide_interval_bp,
                       "wide_interval_multiplier": c.wide_interval_multiplier})


def _number(value: Any, name: str) -> float:
    """``value`` as a finite float, else :class:`InvalidInput` naming ``name``."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name) from None
    if not math.isfinite(v):
        raise InvalidInput(f"{name} must be finite, got {value!r}", field=name)
    return v
