"""Trading calendars: when an asset's market is open, so that a closure is never taken for a gap.

A :class:`TradingCalendar` is a set of sessions, each a half-open interval ``[open, close)`` of
UTC nanoseconds. Three kinds (config ``calendars.<ASSET>``, see :func:`calendar_for`):

* ``"24/7"`` (:class:`AlwaysOpen`, the default): never closes; every query is trivial, so a
  crypto asset pays nothing for the feature;
* a ``pandas_market_calendars`` name (:class:`ExchangeCalendar`, e.g. ``CMEGlobex_FX``,
  ``XNYS``): that library's regular sessions, holidays, early closes and lunch breaks;
* :class:`~tickcast.config.WeeklySessions` (:class:`WeeklyCalendar`): sessions by weekday in a
  time zone (DST followed), holidays (local dates closed all day) and early closes.

Session tables are built per UTC year, lazily, on first use, and kept: a year of a daily
calendar is ~260 intervals, built once in a few milliseconds. Queries are ``searchsorted`` over
the table of the years they touch (also cached), vectorized over timestamp arrays. Calendars
are shared: :func:`calendar_for` returns one object per distinct spec, so a thousand assets on
``CMEGlobex_FX`` share one table, and a pickle holds only the spec (a checkpoint stays small).

Bar expectation. A bar slot ``[t, t + freq)`` (``t`` on the grid of multiples of ``freq``) is
*expected* when it overlaps a session. Only expected slots can be missing; a closure is the
time between two sessions and yields no expected slot, hence no gap.

Conventions: a session's own boundaries are open at ``open`` and closed at ``close``
(``is_open(close)`` is False). Adjacent or overlapping sessions are merged, so a closure always
has a positive length. An ambiguous local time (the repeated hour of a DST fall-back) means its
first occurrence; a non-existent one (the skipped hour) is moved forward to the first valid
instant.
"""

from __future__ import annotations

import calendar as _stdlib_calendar
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from tickcast.config import ALWAYS_OPEN, WEEKDAYS, Settings, WeeklySessions
from tickcast.errors import ConfigError, InvalidInput

NS_PER_S = 1_000_000_000
# How far ahead next_open looks before it says "no session" (a calendar whose holidays close
# it for good, or a library calendar that ends).
MAX_SEARCH_YEARS = 5
# Composed multi-year tables kept per calendar (a query touches one or two years).
_MAX_COMPOSED = 8

_EMPTY = np.empty(0, dtype=np.int64)


class SessionPhase(str, Enum):
    """Whether the market is in a session."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionState:
    """The session an instant falls in, or the closure, and the next transition.

    Attributes
    ----------
    phase
        OPEN or CLOSED.
    since_ns
        Start of the current session (OPEN) or of the closure, i.e. the last close (CLOSED);
        None when unknown (a 24/7 calendar, or no session in the year before).
    next_open_ns
        CLOSED: when the market reopens (None: no session within :data:`MAX_SEARCH_YEARS`).
    next_close_ns
        OPEN: when this session closes (None: never, 24/7).
    """

    phase: SessionPhase
    since_ns: int | None
    next_open_ns: int | None
    next_close_ns: int | None

    @property
    def is_open(self) -> bool:
        """True in a session."""
        return self.phase is SessionPhase.OPEN

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: state, and the next open / close as ISO-8601 UTC (or null)."""
        return {"state": self.phase.value, "next_open": iso_utc(self.next_open_ns),
                "next_close": iso_utc(self.next_close_ns)}


def iso_utc(ns: int | None) -> str | None:
    """ISO-8601 UTC with seconds (``2024-01-07T23:00:00Z``), None for None."""
    if ns is None:
        return None
    return datetime.fromtimestamp(ns // NS_PER_S, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _year_of(ns: int) -> int:
    return time.gmtime(ns // NS_PER_S).tm_year


def _year_start_ns(year: int) -> int:
    return _stdlib_calendar.timegm((year, 1, 1, 0, 0, 0)) * NS_PER_S


def _merge(opens: np.ndarray, closes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort intervals, drop empty ones and merge those that overlap or touch."""
    keep = closes > opens
    opens, closes = opens[keep], closes[keep]
    if len(opens) == 0:
        return _EMPTY, _EMPTY
    order = np.argsort(opens, kind="stable")
    opens, closes = opens[order], closes[order]
    reach = np.maximum.accumulate(closes)
    # A new block starts where an open lies beyond everything that came before it.
    starts = np.concatenate(([True], opens[1:] > reach[:-1]))
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:], [len(opens)])) - 1
    return opens[first].astype(np.int64), reach[last].astype(np.int64)


def _as_ns_array(ts: Any, field: str = "ts") -> np.ndarray:
    arr = np.asarray(ts)
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{field} must be integer UNIX ns, got dtype {arr.dtype}", field=field)
    return arr.astype(np.int64, copy=False)


class TradingCalendar:
    """Sessions of one market as UTC intervals; subclasses say how a year's sessions are made.

    Queries take UNIX ns (int or int arrays). Subclasses implement :meth:`_build_year`; this
    base caches its results per year and composes the years a query needs.
    """

    #: Stable description of the calendar ("24/7", the library name, or the weekly spec).
    spec: str | WeeklySessions

    def __init__(self, spec: str | WeeklySessions) -> None:
        self.spec = spec
        self._years: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._composed: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    # -- what a subclass provides -------------------------------------------------------------
    def _build_year(self, year: int) -> tuple[np.ndarray, np.ndarray]:
        """(opens, closes) of the sessions opening in UTC ``year``, any order."""
        raise NotImplementedError

    @property
    def always_open(self) -> bool:
        """True for a calendar that never closes (every query has a trivial answer)."""
        return False

    @property
    def name(self) -> str:
        """Short human name (the config value, or ``weekly:<zone>``)."""
        return self.spec if isinstance(self.spec, str) else f"weekly:{self.spec.timezone}"

    # -- tables -------------------------------------------------------------------------------
    def sessions(self, start_ns: int, end_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Merged sessions (opens, closes) of every session that can overlap ``[start, end)``."""
        return self._table(_year_of(int(start_ns)) - 1, _year_of(max(int(start_ns), int(end_ns))))

    def _year(self, year: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._years.get(year)
        if got is None:
            opens, closes = self._build_year(year)
            lo, hi = _year_start_ns(year), _year_start_ns(year + 1)
            opens = np.asarray(opens, dtype=np.int64)
            closes = np.asarray(closes, dtype=np.int64)
            mine = (opens >= lo) & (opens < hi)  # each session belongs to its open's year
            got = (opens[mine], closes[mine])
            with self._lock:
                self._years[year] = got
        return got

    def _table(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        key = (y0, y1)
        got = self._composed.get(key)
        if got is None:
            parts = [self._year(y) for y in range(y0, y1 + 1)]
            got = _merge(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            with self._lock:
                if len(self._composed) >= _MAX_COMPOSED:
                    self._composed.pop(next(iter(self._composed)))
                self._composed[key] = got
        return got

    # -- queries ------------------------------------------------------------------------------
    def is_open(self, ts_ns: Any) -> np.ndarray:
        """Whether each instant falls in a session (vectorized; ``close`` itself is closed).

        Examples
        --------
        >>> cal = calendar_for(WeeklySessions(timezone="UTC", sessions=[
        ...     {"days": ["mon", "tue", "wed", "thu", "fri"], "open": "09:00", "close": "17:00"}]))
        >>> mon = 1_704_067_200 * NS_PER_S  # 2024-01-01, a Monday
        >>> h = 3600 * NS_PER_S
        >>> cal.is_open([mon + 8 * h, mon + 9 * h, mon + 17 * h, mon + 5 * 24 * h + 10 * h]).tolist()
        [False, True, False, False]
        """
        ts = _as_ns_array(ts_ns)
        if ts.size == 0:
            return np.zeros(ts.shape, dtype=bool)
        opens, closes = self.sessions(int(ts.min()), int(ts.max()))
        i = np.searchsorted(closes, ts, side="right")  # first session closing after ts
        inside = np.zeros(ts.shape, dtype=bool)
        ok = i < len(opens)
        inside[ok] = opens[i[ok]] <= ts[ok]
        return inside

    def expected_bars(self, ts_ns: Any, freq_ns: int) -> np.ndarray:
        """Whether each bar slot ``[t, t + freq)`` overlaps a session (vectorized)."""
        ts = _as_ns_array(ts_ns)
        if ts.size == 0:
            return np.zeros(ts.shape, dtype=bool)
        opens, closes = self.sessions(int(ts.min()), int(ts.max()) + freq_ns)
        i = np.searchsorted(closes, ts, side="right")
        out = np.zeros(ts.shape, dtype=bool)
        ok = i < len(opens)
        out[ok] = opens[i[ok]] < ts[ok] + freq_ns
        return out

    def expected_segments(self, start_ns: int, end_ns: int,
                          freq_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Runs of expected bar slots in ``[start, end)``, as grid-aligned ``[seg_start, seg_end)``.

        ``start`` and ``end`` should lie on the grid (multiples of ``freq_ns``). Each session
        widens to the slots it overlaps; runs that touch are merged.

        Examples
        --------
        >>> cal = calendar_for(WeeklySessions(timezone="UTC", sessions=[
        ...     {"days": ["mon", "tue"], "open": "09:00", "close": "17:00"}]))
        >>> mon, m = 1_704_067_200 * NS_PER_S, 60 * NS_PER_S
        >>> s, e = cal.expected_segments(mon + 600 * m, mon + 2 * 1440 * m, m)
        >>> [((a - mon) // m, (b - mon) // m) for a, b in zip(s.tolist(), e.tolist())]
        [(600, 1020), (1980, 2460)]
        """
        start, end = int(start_ns), int(end_ns)
        if end <= start:
            return _EMPTY, _EMPTY
        opens, closes = self.sessions(start, end)
        i0 = int(np.searchsorted(closes, start, side="right"))
        i1 = int(np.searchsorted(opens, end, side="left"))
        o, c = opens[i0:i1], closes[i0:i1]
        seg_s = np.maximum((o // freq_ns) * freq_ns, start)
        seg_e = np.minimum(-((-c) // freq_ns) * freq_ns, end)
        return _merge(seg_s, seg_e)

    def count_expected(self, start_ns: int, end_ns: int, freq_ns: int) -> int:
        """Number of expected bar slots in ``[start, end)`` (grid-aligned bounds)."""
        s, e = self.expected_segments(start_ns, end_ns, freq_ns)
        return int(((e - s) // freq_ns).sum())

    def open_ns_between(self, start_ns: int, end_ns: int) -> int:
        """Nanoseconds of session time in ``[start, end)`` (0 when ``end <= start``)."""
        start, end = int(start_ns), int(end_ns)
        if end <= start:
            return 0
        opens, closes = self.sessions(start, end)
        i0 = int(np.searchsorted(closes, start, side="right"))
        i1 = int(np.searchsorted(opens, end, side="left"))
        lo = np.maximum(opens[i0:i1], start)
        hi = np.minimum(closes[i0:i1], end)
        return int(np.maximum(hi - lo, 0).sum())

    def closed_between(self, start_ns: int, end_ns: int) -> bool:
        """True when some instant of ``[start, end)`` is outside every session."""
        return self.open_ns_between(start_ns, end_ns) < int(end_ns) - int(start_ns)

    def next_open(self, ts_ns: int) -> int | None:
        """The earliest instant ``>= ts`` in a session (``ts`` itself when open); None when no
        session starts within :data:`MAX_SEARCH_YEARS`."""
        ts = int(ts_ns)
        y = _year_of(ts)
        for y1 in range(y, y + MAX_SEARCH_YEARS + 1):
            opens, closes = self._table(y - 1, y1)
            i = int(np.searchsorted(closes, ts, side="right"))
            if i < len(opens):
                return max(ts, int(opens[i]))
        return None

    def session_state(self, now_ns: int) -> SessionState:
        """Open or closed at ``now``, since when, and the next transition.

        Examples
        --------
        >>> cal = calendar_for(WeeklySessions(timezone="UTC", sessions=[
        ...     {"days": ["mon", "tue", "wed", "thu", "fri"], "open": "09:00", "close": "17:00"}]))
        >>> fri_evening = (1_704_067_200 + 4 * 86400 + 18 * 3600) * NS_PER_S
        >>> cal.session_state(fri_evening).to_dict()
        {'state': 'closed', 'next_open': '2024-01-08T09:00:00Z', 'next_close': None}
        """
        now = int(now_ns)
        y = _year_of(now)
        opens, closes = self._table(y - 1, y + 1)
        i = int(np.searchsorted(closes, now, side="right"))
        if i < len(opens) and opens[i] <= now:
            return SessionState(SessionPhase.OPEN, int(opens[i]), None, int(closes[i]))
        since = int(closes[i - 1]) if i > 0 else None
        return SessionState(SessionPhase.CLOSED, since, self.next_open(now), None)

    # -- identity -----------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A pickle holds the spec only; loading returns the process's shared instance.
        return (calendar_for, (self.spec,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class AlwaysOpen(TradingCalendar):
    """A market that never closes (crypto): every slot is expected, no query touches a table."""

    def __init__(self) -> None:
        super().__init__(ALWAYS_OPEN)

    @property
    def always_open(self) -> bool:
        return True

    def _build_year(self, year: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([_year_start_ns(year)]), np.array([_year_start_ns(year + 1)])

    def is_open(self, ts_ns: Any) -> np.ndarray:
        return np.ones(_as_ns_array(ts_ns).shape, dtype=bool)

    def expected_bars(self, ts_ns: Any, freq_ns: int) -> np.ndarray:
        return np.ones(_as_ns_array(ts_ns).shape, dtype=bool)

    def expected_segments(self, start_ns: int, end_ns: int,
                          freq_ns: int) -> tuple[np.ndarray, np.ndarray]:
        if int(end_ns) <= int(start_ns):
            return _EMPTY, _EMPTY
        return np.array([int(start_ns)]), np.array([int(end_ns)])

    def open_ns_between(self, start_ns: int, end_ns: int) -> int:
        return max(0, int(end_ns) - int(start_ns))

    def next_open(self, ts_ns: int) -> int | None:
        return int(ts_ns)

    def session_state(self, now_ns: int) -> SessionState:
        return SessionState(SessionPhase.OPEN, None, None, None)


class WeeklyCalendar(TradingCalendar):
    """Weekly sessions in a time zone, with holidays and early closes (see
    :class:`~tickcast.config.WeeklySessions`)."""

    spec: WeeklySessions

    def __init__(self, spec: WeeklySessions) -> None:
        super().__init__(spec)

    def _localize(self, naive: list[datetime]) -> np.ndarray:
        if not naive:
            return _EMPTY
        idx = pd.DatetimeIndex(naive).tz_localize(
            self.spec.timezone, ambiguous=np.ones(len(naive), dtype=bool),
            nonexistent="shift_forward")
        return idx.as_unit("ns").asi8.astype(np.int64)

    def _build_year(self, year: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        # Local dates around the UTC year (time zones reach +-14 h, sessions up to a day).
        first, last = date(year - 1, 12, 30), date(year + 1, 1, 2)
        opens: list[datetime] = []
        closes: list[datetime] = []
        day = first
        while day <= last:
            wd = WEEKDAYS[day.weekday()]
            for s in spec.sessions:
                if wd not in s.days:
                    continue
                oh, om = (int(x) for x in s.open.split(":"))
                ch, cm = (int(x) for x in s.close.split(":"))
                start = datetime(day.year, day.month, day.day, oh, om)
                end = datetime(day.year, day.month, day.day, ch, cm)
                if end <= start:
                    end += timedelta(days=1)
                opens.append(start)
                closes.append(end)
            day += timedelta(days=1)
        o, c = _merge(self._localize(opens), self._localize(closes))
        for holiday in spec.holidays:
            if first <= holiday <= last:
                h = datetime(holiday.year, holiday.month, holiday.day)
                hs, he = self._localize([h, h + timedelta(days=1)])
                o, c = _cut(o, c, int(hs), int(he))
        for day_, at in spec.early_closes.items():
            if first <= day_ <= last:
                hh, mm = (int(x) for x in at.split(":"))
                t = int(self._localize([datetime(day_.year, day_.month, day_.day, hh, mm)])[0])
                inside = (o < t) & (c > t)
                c = np.where(inside, t, c)
        return o, c


def _cut(opens: np.ndarray, closes: np.ndarray, hs: int, he: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``[hs, he)`` from the sessions (a session across it keeps both ends)."""
    left_o, left_c = opens, np.minimum(closes, hs)
    right_o, right_c = np.maximum(opens, he), closes
    return _merge(np.concatenate([left_o, right_o]), np.concatenate([left_c, right_c]))


class ExchangeCalendar(TradingCalendar):
    """A ``pandas_market_calendars`` calendar: its regular sessions, holidays, early closes and
    breaks (a lunch break splits a session in two)."""

    spec: str

    def __init__(self, name: str) -> None:
        super().__init__(name)
        import pandas_market_calendars as mcal  # heavy import, only for assets that use one

        try:
            self._cal = mcal.get_calendar(name)
        except RuntimeError as exc:
            raise ConfigError(f"calendar {name!r}: {exc}", field="calendars") from None

    def _build_year(self, year: int) -> tuple[np.ndarray, np.ndarray]:
        # A week on each side: sessions may open the day before their trading date.
        sched = self._cal.schedule(start_date=f"{year - 1}-12-24", end_date=f"{year + 1}-01-07")
        if sched.empty:
            return _EMPTY, _EMPTY

        def ns(col: str) -> np.ndarray:
            values = pd.DatetimeIndex(sched[col])
            out = np.full(len(values), np.iinfo(np.int64).min, dtype=np.int64)
            ok = ~values.isna()
            out[ok] = values[ok].as_unit("ns").asi8
            return out

        opens, closes = ns("market_open"), ns("market_close")
        if "break_start" in sched.columns and "break_end" in sched.columns:
            bs, be = ns("break_start"), ns("break_end")
            has = (bs != np.iinfo(np.int64).min) & (be != np.iinfo(np.int64).min)
            first_c = np.where(has, bs, closes)
            second_o = be[has]
            return (np.concatenate([opens, second_o]),
                    np.concatenate([first_c, closes[has]]))
        return opens, closes


ALWAYS: AlwaysOpen = AlwaysOpen()
_SHARED: dict[Any, TradingCalendar] = {ALWAYS_OPEN: ALWAYS}
_SHARED_LOCK = threading.Lock()


def calendar_for(spec: str | WeeklySessions | dict[str, Any] | None) -> TradingCalendar:
    """The shared calendar of a spec: ``"24/7"`` / None, a library name, or weekly sessions.

    Raises
    ------
    ConfigError
        An unknown library calendar or an invalid weekly spec.
    """
    if spec is None:
        return ALWAYS
    if isinstance(spec, dict):
        spec = WeeklySessions.model_validate(spec)
    key: Any = spec if isinstance(spec, str) else spec.model_dump_json()
    got = _SHARED.get(key)
    if got is not None:
        return got
    with _SHARED_LOCK:
        got = _SHARED.get(key)
        if got is None:
            got = WeeklyCalendar(spec) if isinstance(spec, WeeklySessions) else ExchangeCalendar(spec)
            _SHARED[key] = got
    return got


def trading_calendar(settings: Settings, asset: str) -> TradingCalendar:
    """The calendar configured for ``asset`` (``calendars.<ASSET>``; 24/7 when absent)."""
    return calendar_for(settings.calendars.get(asset))
