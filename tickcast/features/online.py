"""Incremental features at each bar close, equal to :func:`compute_features` on the history.

:class:`OnlineFeatures` keeps sliding buffers of the last ``lookback(cfg)`` grid slots (log
close and log volume) plus the recursive RSI/MACD state, so one bar costs O(window). It calls
the kernels of :mod:`tickcast.features.definitions` on a single window, so its numbers are
bit-for-bit those of the offline path.

Amendments: the data plane may re-emit a bar it already emitted (same ``ts``, amended values)
while the bar is within the allowed lateness, and may deliver a bar for a minute that was a gap.
The class keeps, for each of the last ``amend_depth`` bars, the bar and the state before it;
such an update restores the snapshot before the affected bar and replays the newer bars.

Catch-up: :meth:`OnlineFeatures.update_many` feeds a whole frame of bars with the state and
rows of feeding them one by one, bit for bit. Only the newest row is wanted then, so a run of
new bars advances the buffers in one step and the recursions (RSI and MACD averages) in a
plain loop of float operations; the last ``amend_depth`` bars of the run go through the
per-bar path, which keeps the amendment snapshots and computes the row.

Trading sessions: given the asset's calendar, a bar outside every session is invalid exactly
as in :func:`~tickcast.features.definitions.compute_features` (like an imputed bar), and a
closure is a run of missing slots, so nothing spans it and the features warm up after the open.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import pandas as pd

from tickcast.config import FeatureConfig, Settings
from tickcast.errors import InvalidInput
from tickcast.features.definitions import (
    MINUTES_PER_DAY,
    TOD_COS,
    TOD_SIN,
    ema_alpha,
    feature_names,
    imputed_mask,
    is_imputed,
    k_momentum,
    k_ratio,
    k_realized_vol,
    k_rsi,
    k_zscore_last,
    lookback,
    off_session,
    resolve_config,
    schema_hash,
    wilder_alpha,
)
from tickcast.ticks import NS_PER_MIN

if TYPE_CHECKING:
    from tickcast.market.calendar import TradingCalendar

_NAN = float("nan")


class SeededEMA:
    """EMA seeded by the mean of its first ``n`` inputs, restarted by a non-finite input.

    The incremental twin of :func:`tickcast.features.definitions.seeded_ema`.

    Examples
    --------
    >>> e = SeededEMA(2, 0.5)
    >>> [e.update(x) for x in (1.0, 2.0, 3.0, float("nan"), 4.0, 5.0, 6.0)]
    [nan, 1.5, 2.25, nan, nan, 4.5, 5.25]
    """

    __slots__ = ("n", "alpha", "c", "seed", "value")

    def __init__(self, n: int, alpha: float) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.n = n
        self.alpha = alpha
        self.c = 1.0 - alpha
        self.seed: list[float] = []
        self.value = _NAN

    def update(self, x: float) -> float:
        """Feed one input; return the EMA (NaN until seeded)."""
        if not math.isfinite(x):
            self.seed = []
            self.value = _NAN
            return _NAN
        if math.isnan(self.value):
            self.seed.append(float(x))
            if len(self.seed) == self.n:
                self.value = math.fsum(self.seed) / self.n
                self.seed = []
            return self.value
        # Same products and sum as the offline lfilter recursion (z + b0*x with z = c*y_prev).
        self.value = self.c * self.value + self.alpha * x
        return self.value

    def copy(self) -> "SeededEMA":
        out = SeededEMA.__new__(SeededEMA)
        out.n, out.alpha, out.c = self.n, self.alpha, self.c
        out.seed = list(self.seed)
        out.value = self.value
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass(frozen=True)
class _Bar:
    ts: int
    close: float
    volume: float
    vwap: float
    confidence: float
    providers: float
    imputed: bool


class _State:
    """Everything a feature row depends on. Copied before each bar (the amendment snapshot)."""

    __slots__ = ("last_ts", "logc", "lvol", "run", "gain", "loss", "ema_fast", "ema_slow",
                 "signal")

    def __init__(self, cfg: FeatureConfig) -> None:
        w = lookback(cfg)
        fast, slow, sig = cfg.macd
        self.last_ts: int | None = None
        self.logc = np.full(w, np.nan)  # oldest first, newest last
        self.lvol = np.full(w, np.nan)
        self.run = 0
        self.gain = SeededEMA(cfg.rsi, wilder_alpha(cfg.rsi))
        self.loss = SeededEMA(cfg.rsi, wilder_alpha(cfg.rsi))
        self.ema_fast = SeededEMA(fast, ema_alpha(fast))
        self.ema_slow = SeededEMA(slow, ema_alpha(slow))
        self.signal = SeededEMA(sig, ema_alpha(sig))

    def copy(self) -> "_State":
        out = _State.__new__(_State)
        out.last_ts = self.last_ts
        out.logc = self.logc.copy()
        out.lvol = self.lvol.copy()
        out.run = self.run
        out.gain = self.gain.copy()
        out.loss = self.loss.copy()
        out.ema_fast = self.ema_fast.copy()
        out.ema_slow = self.ema_slow.copy()
        out.signal = self.signal.copy()
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _num(bar: Mapping[str, Any], key: str, required: bool) -> float:
    if key not in bar:
        if required:
            raise InvalidInput(f"bar lacks field '{key}'", field=key)
        return _NAN
    v = bar[key]
    if v is None or v is pd.NA:
        return _NAN
    if isinstance(v, (bool, np.bool_)):
        raise InvalidInput(f"bar.{key} must be a number, got a boolean", field=key)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InvalidInput(f"bar.{key} must be a number, got {v!r}", field=key) from None


def _parse_bar(bar: Mapping[str, Any], freq_ns: int) -> _Bar:
    if not isinstance(bar, Mapping):
        raise InvalidInput(f"bar must be a mapping, got {type(bar).__name__}", field="bar")
    if "ts" not in bar:
        raise InvalidInput("bar lacks field 'ts'", field="ts")
    raw = bar["ts"]
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer, float, np.floating)):
        raise InvalidInput(f"bar.ts must be integer UNIX ns, got {raw!r}", field="ts")
    if isinstance(raw, (float, np.floating)):
        if not (math.isfinite(raw) and float(raw).is_integer()):
            raise InvalidInput(f"bar.ts must be integer UNIX ns, got {raw!r}", field="ts")
    ts = int(raw)
    if ts % freq_ns != 0:
        raise InvalidInput(f"bar.ts {ts} is not on the {freq_ns} ns grid", field="ts")
    return _Bar(
        ts=ts,
        close=_num(bar, "close", required=True),
        volume=_num(bar, "volume", required=False),
        vwap=_num(bar, "vwap", required=False),
        confidence=_num(bar, "confidence", required=False),
        providers=_num(bar, "providers", required=False),
        imputed=is_imputed(bar.get("imputed")),
    )


# Numeric bar fields read by _parse_bar, in _Bar order after ts.
_NUM_FIELDS: tuple[str, ...] = ("close", "volume", "vwap", "confidence", "providers")
# What update_many calls for each bad bar (row position in the frame, the error).
ErrorHandler = Callable[[int, InvalidInput], None]


@dataclass
class _Columns:
    """Bars of a frame as columns, in frame order (rows in ``errors`` hold no bar)."""

    ts: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    vwap: np.ndarray
    confidence: np.ndarray
    providers: np.ndarray
    imputed: np.ndarray
    errors: dict[int, InvalidInput]

    def bar(self, i: int) -> _Bar:
        return _Bar(ts=int(self.ts[i]), close=float(self.close[i]), volume=float(self.volume[i]),
                    vwap=float(self.vwap[i]), confidence=float(self.confidence[i]),
                    providers=float(self.providers[i]), imputed=bool(self.imputed[i]))


def _plain_numeric(col: pd.Series) -> bool:
    """A numpy int or float column: each value reads as ``float(v)`` (no None, NA or bool)."""
    return isinstance(col.dtype, np.dtype) and col.dtype.kind in "iuf"


def _bar_columns(bars: pd.DataFrame, freq_ns: int) -> _Columns:
    """Read a frame as :func:`_parse_bar` reads each of its rows (same values, same errors).

    Frames of plain numeric columns (the bar schema) are read column-wise; anything else is
    parsed row by row with :func:`_parse_bar` itself.
    """
    n = len(bars)
    cols = bars.columns
    fast = (cols.is_unique and "ts" in cols and "close" in cols
            and isinstance(bars["ts"].dtype, np.dtype) and bars["ts"].dtype.kind == "i"
            and all(_plain_numeric(bars[c]) for c in _NUM_FIELDS if c in cols))
    if fast:
        ts = bars["ts"].to_numpy(dtype=np.int64)
        num = {c: (bars[c].to_numpy(dtype=np.float64) if c in cols else np.full(n, np.nan))
               for c in _NUM_FIELDS}
        imputed = (imputed_mask(bars["imputed"].to_numpy(dtype=object)) if "imputed" in cols
                   else np.zeros(n, dtype=bool))
        errors = {i: InvalidInput(f"bar.ts {int(ts[i])} is not on the {freq_ns} ns grid", field="ts")
                  for i in np.flatnonzero(ts % freq_ns != 0).tolist()}
        return _Columns(ts, num["close"], num["volume"], num["vwap"], num["confidence"],
                        num["providers"], imputed, errors)
    out = _Columns(np.zeros(n, dtype=np.int64), *(np.full(n, np.nan) for _ in _NUM_FIELDS),
                   np.zeros(n, dtype=bool), {})
    for i, rec in enumerate(bars.to_dict("records")):
        try:
            b = _parse_bar(rec, freq_ns)
        except InvalidInput as exc:
            out.errors[i] = exc
            continue
        out.ts[i] = b.ts
        out.close[i], out.volume[i], out.vwap[i] = b.close, b.volume, b.vwap
        out.confidence[i], out.providers[i], out.imputed[i] = b.confidence, b.providers, b.imputed
    return out


def _shift_in(buf: np.ndarray, value: float) -> None:
    buf[:-1] = buf[1:]
    buf[-1] = value


class OnlineFeatures:
    """Features of the newest bar, updated incrementally at each bar close.

    Parameters
    ----------
    cfg
        Feature config (or whole Settings); must be the one the model was trained with.
    freq_ns
        Bar spacing in ns (``bars.freq_s``).
    calendar
        The asset's trading calendar: a bar outside its sessions is invalid, as offline.
        None: every slot is in session.

    Raises
    ------
    InvalidInput
        From :meth:`update`: malformed bar (field named), or an amendment older than the
        ``amend_depth`` bars whose state is kept.

    Examples
    --------
    >>> of = OnlineFeatures(FeatureConfig())
    >>> row = of.update({"ts": 0, "close": 100.0, "volume": 1.0, "vwap": 100.0,
    ...                  "confidence": 2.0, "providers": 3, "imputed": ""})
    >>> float(row[of.names.index("minutes_since_gap")]), len(row) == len(of.names)
    (1.0, True)
    """

    # Default for instances pickled before calendars existed.
    _calendar: "TradingCalendar | None" = None

    def __init__(self, cfg: FeatureConfig | Settings | None = None, freq_ns: int = NS_PER_MIN,
                 calendar: "TradingCalendar | None" = None) -> None:
        if not isinstance(freq_ns, (int, np.integer)) or freq_ns <= 0:
            raise ValueError(f"freq_ns must be a positive integer, got {freq_ns!r}")
        self._cfg = resolve_config(cfg)
        self._freq = int(freq_ns)
        self._calendar = calendar
        self._names = feature_names(self._cfg)
        self._schema = schema_hash(self._cfg)
        self._window = lookback(self._cfg)
        self._state = _State(self._cfg)
        self._history: deque[tuple[_Bar, _State]] = deque(maxlen=self._cfg.amend_depth)
        self._last_row = np.full(len(self._names), np.nan)
        self.replays = 0  # amendments and late inserts handled (for monitoring)

    # ----------------------------------------------------------------------------- properties
    @property
    def names(self) -> tuple[str, ...]:
        """Feature names, in row order."""
        return self._names

    @property
    def schema_hash(self) -> str:
        """Schema hash of the config (see :func:`tickcast.features.definitions.schema_hash`)."""
        return self._schema

    @property
    def last_ts(self) -> int | None:
        """ts of the newest bar seen (None before the first)."""
        return self._state.last_ts

    @property
    def last_row(self) -> np.ndarray:
        """Feature row of the newest bar (a copy)."""
        return self._last_row.copy()

    @property
    def last_close(self) -> float | None:
        """Close of the newest bar (None before the first, or when it has no usable close)."""
        if not self._history:
            return None
        close = self._history[-1][0].close
        return close if math.isfinite(close) and close > 0 else None

    # ----------------------------------------------------------------------------- updates
    def update(self, bar: Mapping[str, Any]) -> np.ndarray:
        """Add a closed bar (or re-send an amended recent one).

        Parameters
        ----------
        bar
            Mapping with ``ts`` (int ns, bar open) and ``close``; optional ``volume vwap
            confidence providers imputed`` (missing means NaN / real bar).

        Returns
        -------
        numpy.ndarray
            float64 row in :attr:`names` order for the NEWEST bar. After an amendment of an
            earlier bar, that is the newest bar's row recomputed from the amended history.
        """
        b = _parse_bar(bar, self._freq)
        if not b.imputed and off_session(np.array([b.ts]), self._freq, self._calendar)[0]:
            b = replace(b, imputed=True)
        st = self._state
        if st.last_ts is None or b.ts > st.last_ts:
            self._history.append((b, st.copy()))
            self._last_row = self._advance(st, b)
        else:
            self._replay_from(b)
        return self._last_row.copy()

    def update_many(self, bars: pd.DataFrame, on_error: ErrorHandler | None = None) -> np.ndarray:
        """Feed every row of a frame, in frame order, as :meth:`update` would one by one.

        The state afterwards, :attr:`last_row`, the amendment snapshots and :attr:`replays`
        are exactly those of calling :meth:`update` on each row (``to_dict("records")``), bit
        for bit; only the rows of the bars before the newest are not computed (a catch-up
        publishes the newest row only).

        Parameters
        ----------
        bars
            Bar frame (the :meth:`update` fields as columns). New bars, amendments of recent
            bars and late inserts may be mixed, in the order they are to be applied.
        on_error
            Called with (row position, error) for each row :meth:`update` would refuse; that
            row is skipped and the others are applied. None: raise the first such error
            after applying the rows before it (as a loop of :meth:`update` would stop).

        Returns
        -------
        numpy.ndarray
            The newest bar's row, as :meth:`update` returns it (a copy of :attr:`last_row`).

        Raises
        ------
        InvalidInput
            ``bars`` is not a DataFrame; or a row is malformed or amends a bar older than the
            ``amend_depth`` kept, when ``on_error`` is None.

        Examples
        --------
        >>> frame = pd.DataFrame({"ts": np.arange(300, dtype=np.int64) * NS_PER_MIN,
        ...                       "close": 100.0 + np.sin(np.arange(300) / 7.0)})
        >>> bulk, loop = OnlineFeatures(FeatureConfig()), OnlineFeatures(FeatureConfig())
        >>> row = bulk.update_many(frame)
        >>> rows = [loop.update(r) for r in frame.to_dict("records")]
        >>> np.array_equal(row, rows[-1], equal_nan=True), bulk.last_ts == loop.last_ts
        (True, True)
        """
        if not isinstance(bars, pd.DataFrame):
            raise InvalidInput(f"bars must be a pandas DataFrame, got {type(bars).__name__}",
                               field="bars")
        cols = _bar_columns(bars, self._freq)
        if self._calendar is not None and len(cols.ts):
            parsed = np.ones(len(cols.ts), dtype=bool)
            parsed[list(cols.errors)] = False  # rows that hold no bar have no ts to look up
            cols.imputed[parsed] |= off_session(cols.ts[parsed], self._freq, self._calendar)
        n = len(cols.ts)
        # Which rows advance (newer than every bar applied before them): the rest amend.
        bad = np.zeros(n, dtype=bool)
        bad[list(cols.errors)] = True
        floor = np.iinfo(np.int64).min
        ts = np.where(bad, floor, cols.ts)
        last = floor if self._state.last_ts is None else int(self._state.last_ts)
        applied = np.maximum.accumulate(np.concatenate(([last], ts)))[:-1]
        advance = ~bad & ((ts > applied) | (applied == floor))
        i = 0
        while i < n:
            if i in cols.errors:
                if on_error is None:
                    raise cols.errors[i]
                on_error(i, cols.errors[i])
                i += 1
            elif advance[i]:
                j = i + 1
                while j < n and advance[j]:
                    j += 1
                self._advance_run(cols, i, j)
                i = j
            else:
                try:
                    self._replay_from(cols.bar(i))
                except InvalidInput as exc:
                    if on_error is None:
                        raise
                    on_error(i, exc)
                i += 1
        return self._last_row.copy()

    def update_frame(self, bars: pd.DataFrame) -> np.ndarray:
        """Feed every bar of a frame in ``ts`` order; one row per bar (warm-up after restart)."""
        if not isinstance(bars, pd.DataFrame):
            raise InvalidInput(f"bars must be a pandas DataFrame, got {type(bars).__name__}", field="bars")
        if "ts" not in bars.columns:
            raise InvalidInput("bars lacks column 'ts'", field="ts")
        recs = bars.sort_values("ts", kind="stable").to_dict("records")
        out = np.empty((len(recs), len(self._names)))
        for i, rec in enumerate(recs):
            out[i] = self.update(rec)
        return out

    def _advance_run(self, cols: _Columns, start: int, stop: int) -> None:
        """Apply the new bars ``start:stop`` (increasing ts, all newer than the state).

        All but the last ``amend_depth`` bars only move the state, with the very operations of
        :meth:`_advance` (see :meth:`_skip_ahead`); the last ones take the per-bar path, which
        records the snapshots an amendment replays from and computes the newest row.
        """
        split = max(start, stop - self._cfg.amend_depth)
        if split > start:
            self._skip_ahead(cols, start, split)
        st = self._state
        for i in range(split, stop):
            b = cols.bar(i)
            self._history.append((b, st.copy()))
            self._last_row = self._advance(st, b)

    def _skip_ahead(self, cols: _Columns, start: int, stop: int) -> None:
        """Advance the state over bars ``start:stop`` without computing their rows.

        Same arithmetic as :meth:`_advance`, in the same order: the log close and log volume of
        each bar go to the grid (a gap becomes ``min(missing, window)`` NaN slots, exactly what
        :meth:`_push_missing` shifts in), the buffers become the last ``window`` slots, and the
        recursions are fed the same inputs one bar at a time.
        """
        st, w = self._state, self._window
        ts, close = cols.ts[start:stop], cols.close[start:stop]
        vol, imputed = cols.volume[start:stop], cols.imputed[start:stop]
        m = len(ts)
        prev = np.empty(m, dtype=np.int64)
        prev[1:] = ts[:-1]
        prev[0] = ts[0] - self._freq if st.last_ts is None else st.last_ts
        missing = (ts - prev) // self._freq - 1
        gap = missing > 0
        with np.errstate(invalid="ignore"):
            valid = ~imputed & np.isfinite(close) & (close > 0)
            vol_ok = valid & np.isfinite(vol) & (vol >= 0)
        logc = np.full(m, np.nan)
        logc[valid] = np.log(close[valid])
        lvol = np.full(m, np.nan)
        lvol[vol_ok] = np.log1p(vol[vol_ok])
        # Grid slot of each bar after the current buffer (gaps shortened to the window).
        slot = w - 1 + np.cumsum(np.minimum(np.maximum(missing, 0), w) + 1)
        grid_c = np.full(int(slot[-1]) + 1, np.nan)
        grid_v = np.full(int(slot[-1]) + 1, np.nan)
        grid_c[:w], grid_v[:w] = st.logc, st.lvol
        grid_c[slot], grid_v[slot] = logc, lvol
        r1 = grid_c[slot] - grid_c[slot - 1]
        gains = np.maximum(r1, 0.0).tolist()
        losses = np.maximum(-r1, 0.0).tolist()

        gain, loss, fast, slow, signal = st.gain, st.loss, st.ema_fast, st.ema_slow, st.signal
        run = st.run
        for g, lo, c, ok, gp in zip(gains, losses, close.tolist(), valid.tolist(), gap.tolist()):
            if gp:
                run = 0
                for ema in (gain, loss, fast, slow, signal):
                    ema.update(_NAN)
            run = run + 1 if ok else 0
            gain.update(g)
            loss.update(lo)
            cv = c if ok else _NAN
            ef = fast.update(cv)
            es = slow.update(cv)
            signal.update((ef - es) / c if ok else _NAN)
        st.run = run
        st.last_ts = int(ts[-1])
        st.logc = grid_c[-w:].copy()
        st.lvol = grid_v[-w:].copy()

    def _replay_from(self, b: _Bar) -> None:
        hist = list(self._history)
        i = next(j for j, (hb, _) in enumerate(hist) if hb.ts >= b.ts)
        before = hist[i][1]
        if before.last_ts is not None and b.ts <= before.last_ts:
            raise InvalidInput(
                f"bar.ts {b.ts} is older than the {self._cfg.amend_depth} most recent bars kept "
                f"for amendments (oldest kept {hist[0][0].ts})", field="ts")
        replay = [b] + [hb for hb, _ in hist[i:] if hb.ts != b.ts]
        self._history = deque(hist[:i], maxlen=self._cfg.amend_depth)
        self._state = before.copy()
        for rb in replay:
            self._history.append((rb, self._state.copy()))
            self._last_row = self._advance(self._state, rb)
        self.replays += 1

    def _push_missing(self, st: _State, slots: int) -> None:
        """Missing grid slots: buffers get NaN and every recursion restarts (as offline)."""
        k = min(slots, self._window)
        if k == self._window:
            st.logc[:] = np.nan
            st.lvol[:] = np.nan
        else:
            st.logc[:-k] = st.logc[k:]
            st.logc[-k:] = np.nan
            st.lvol[:-k] = st.lvol[k:]
            st.lvol[-k:] = np.nan
        st.run = 0
        for ema in (st.gain, st.loss, st.ema_fast, st.ema_slow, st.signal):
            ema.update(_NAN)

    def _advance(self, st: _State, b: _Bar) -> np.ndarray:
        c = self._cfg
        if st.last_ts is not None:
            missing = (b.ts - st.last_ts) // self._freq - 1
            if missing > 0:
                self._push_missing(st, missing)
        st.last_ts = b.ts
        valid = (not b.imputed) and math.isfinite(b.close) and b.close > 0
        if valid:
            logc = float(np.log(np.array([b.close]))[0])
            vol_ok = math.isfinite(b.volume) and b.volume >= 0
            lvol = float(np.log1p(np.array([b.volume]))[0]) if vol_ok else _NAN
            st.run += 1
        else:
            logc = lvol = _NAN
            st.run = 0
        _shift_in(st.logc, logc)
        _shift_in(st.lvol, lvol)
        run = st.run
        L = st.logc
        feats: dict[str, float] = {}
        for k in c.return_lags:
            feats[f"ret_{k}"] = float(L[-1] - L[-1 - k]) if run >= k + 1 else _NAN

        def r_window(n: int) -> np.ndarray:
            return (L[-n:] - L[-n - 1:-1]).reshape(1, n)

        rv_s = float(k_realized_vol(r_window(c.vol_short))[0]) if run >= c.vol_short + 1 else _NAN
        rv_l = float(k_realized_vol(r_window(c.vol_long))[0]) if run >= c.vol_long + 1 else _NAN
        feats["rv_short"] = rv_s
        feats["rv_long"] = rv_l
        feats["rv_ratio"] = float(k_ratio(np.array([rv_s]), np.array([rv_l]))[0])
        feats["momentum"] = float(k_momentum(r_window(c.momentum))[0]) if run >= c.momentum + 1 else _NAN

        r1 = np.array([L[-1] - L[-2]])
        g = st.gain.update(float(np.maximum(r1, 0.0)[0]))
        lo = st.loss.update(float(np.maximum(-r1, 0.0)[0]))
        feats["rsi"] = float(k_rsi(np.array([g]), np.array([lo]))[0])

        close = b.close if valid else _NAN
        ef = st.ema_fast.update(close)
        es = st.ema_slow.update(close)
        line = float((np.array([ef]) - np.array([es]))[0] / close) if valid else _NAN
        sig = st.signal.update(line)
        feats["macd"] = line
        feats["macd_signal"] = sig
        feats["macd_hist"] = line - sig

        n = c.volume_z
        feats["volume_z"] = (float(k_zscore_last(st.lvol[-n:].reshape(1, n))[0])
                             if run >= n else _NAN)
        if valid and math.isfinite(b.vwap) and b.vwap > 0:
            feats["vwap_dev"] = logc - float(np.log(np.array([b.vwap]))[0])
        else:
            feats["vwap_dev"] = _NAN
        feats["confidence_bp"] = b.confidence if valid else _NAN
        feats["providers"] = b.providers if valid else _NAN
        feats["minutes_since_gap"] = float(min(run, c.gap_age_cap))
        minute = (b.ts // NS_PER_MIN) % MINUTES_PER_DAY
        feats["tod_sin"] = float(TOD_SIN[minute])
        feats["tod_cos"] = float(TOD_COS[minute])
        return np.array([feats[name] for name in self._names], dtype=np.float64)
