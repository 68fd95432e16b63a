"""Trading sessions at the serving edge: a closed market is a reason, not a failure.

During a closure of an asset's market (``calendars.<ASSET>``) a forecast request answers 503
``market_closed`` with the next open, not ``stale features``: the features are old because
nothing trades, and a next-bar forecast has no next bar until the open. ``/v1/health`` shows
each asset's session state, and a closed asset neither makes the replica unready nor is listed
among the reasons.

:class:`SessionBook` holds the calendars of the assets that close and caches each asset's state
until its next transition (open or close), so a request costs a dict lookup and a comparison;
24/7 assets are not in it and cost nothing. The predictor calls the functions below in one line
each; no Ray or Redis here.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import numpy as np

from tickcast.config import Settings
from tickcast.errors import ServiceUnavailable
from tickcast.market.calendar import (ALWAYS, SessionPhase, SessionState, TradingCalendar,
                                      iso_utc, trading_calendar)

_OPEN_ALWAYS = SessionState(SessionPhase.OPEN, None, None, None)
_FOREVER = np.iinfo(np.int64).max


class MarketClosed(ServiceUnavailable):
    """The asset's market is closed (HTTP 503); the body names the next open."""

    code = "market_closed"

    def __init__(self, asset: str, state: SessionState, calendar: str) -> None:
        self.next_open = iso_utc(state.next_open_ns)
        when = f"reopens at {self.next_open}" if self.next_open else "no session scheduled ahead"
        super().__init__(f"market closed: {asset} {when} (calendar {calendar})", field="asset")

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["next_open"] = self.next_open
        return out


class SessionBook:
    """Session state of every asset whose market closes, cached until its next transition.

    Parameters
    ----------
    calendars
        Asset -> calendar; 24/7 calendars are left out (always open, nothing to track).
    """

    def __init__(self, calendars: Mapping[str, TradingCalendar]) -> None:
        self.calendars = {a: c for a, c in calendars.items() if not c.always_open}
        self._states: dict[str, tuple[SessionState, int]] = {}  # asset -> (state, valid until)
        self._masks: dict[int, tuple[int, int, np.ndarray]] = {}  # id(names) -> (.., until, mask)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "SessionBook":
        """The calendars of ``settings.assets`` (``calendars.<ASSET>``), their session tables
        built now (a library calendar takes up to a second a year; not on a request)."""
        book = cls({a: trading_calendar(settings, a) for a in settings.assets})
        now = time.time_ns()
        for cal in {id(c): c for c in book.calendars.values()}.values():
            cal.session_state(now)
        return book

    def calendar(self, asset: str) -> TradingCalendar:
        """The asset's calendar (24/7 when it has none)."""
        return self.calendars.get(asset, ALWAYS)

    def state(self, asset: str, now_ns: int) -> SessionState:
        """Open or closed at ``now`` (24/7 assets: always open)."""
        cal = self.calendars.get(asset)
        if cal is None:
            return _OPEN_ALWAYS
        got = self._states.get(asset)
        if got is not None and now_ns < got[1] and (got[0].since_ns or 0) <= now_ns:
            return got[0]
        state = cal.session_state(now_ns)
        until = state.next_close_ns if state.is_open else state.next_open_ns
        self._states[asset] = (state, _FOREVER if until is None else until)
        return state

    def closed_mask(self, names: np.ndarray, now_ns: int) -> np.ndarray:
        """Per entry of ``names`` (an array kept by the caller), whether its market is closed;
        cached for that array until the first transition among its assets."""
        key = id(names)
        got = self._masks.get(key)
        if got is not None and got[0] <= now_ns < got[1]:
            return got[2]
        mask = np.zeros(len(names), dtype=bool)
        until = _FOREVER
        for i, asset in enumerate(names.tolist()):
            if asset in self.calendars:
                self.state(asset, now_ns)
                state, valid = self._states[asset]
                mask[i] = not state.is_open
                until = min(until, valid)
        with self._lock:
            if len(self._masks) > 4:  # old views' arrays
                self._masks.clear()
            self._masks[key] = (now_ns, until, mask)
        return mask


def check_open(book: SessionBook | None, asset: str, now_ns: int) -> None:
    """Raise :class:`MarketClosed` when ``asset``'s market is closed at ``now``."""
    if book is None or asset not in book.calendars:
        return
    state = book.state(asset, now_ns)
    if not state.is_open:
        raise MarketClosed(asset, state, book.calendars[asset].name)


def session_entry(book: SessionBook | None, asset: str, now_ns: int) -> dict[str, Any]:
    """The health page's session block of one asset: state, next open / close, calendar."""
    if book is None:
        return {**_OPEN_ALWAYS.to_dict(), "calendar": ALWAYS.name}
    return {**book.state(asset, now_ns).to_dict(), "calendar": book.calendar(asset).name}


def closed_assets(status: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Assets of a health status whose session block says closed."""
    return {a for a, e in status.items()
            if isinstance(e.get("session"), dict) and e["session"].get("state") == "closed"}


def closed_rows(book: SessionBook | None, names: np.ndarray, pos: np.ndarray, now_ns: int,
                errors: list[tuple[str, str, str]]) -> np.ndarray | np.bool_:
    """Rows of a batch (``pos`` into ``names``; -1 = unknown) whose market is closed; appends
    their ``market_closed`` errors. ``False`` when no asset of the book closes."""
    if book is None or not book.calendars or len(names) == 0:
        return np.False_
    mask = book.closed_mask(names, now_ns)
    shut = (pos >= 0) & mask[np.maximum(pos, 0)]
    for k in np.flatnonzero(shut).tolist():
        asset = str(names[pos[k]])
        exc = MarketClosed(asset, book.state(asset, now_ns), book.calendars[asset].name)
        errors.append((asset, exc.code, exc.message))
    return shut
