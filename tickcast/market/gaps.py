"""Gaps in a bar series: finding them, and filling them by a policy that depends on their length.

A gap is a run of missing bar open times on the grid ``anchor + k * freq_ns``. The policy
(:class:`GapPolicy`, thresholds in :class:`tickcast.config.GapConfig`) decides by the gap's
duration (missing bars x bar length):

1. ``<= ffill_max_minutes`` and a bar before the gap: **ffill** -- flat bars at the previous
   close (open = high = low = close = vwap), volume 0.
2. from ``mice_min_minutes`` to ``mice_max_minutes``, where other providers' series
   (``alternates``) quote in the gap and share enough minutes with the series around it:
   **mice** -- multiple imputation by chained equations (:func:`~tickcast.market.mice.mice_impute`,
   scikit-learn's ``IterativeImputer``): the other providers' closes over the gap and
   ``mice_context_minutes`` on each side are the predictors of the series' close; each filled
   bar is flat at the mean of ``mice_imputations`` imputations, volume 0. Minutes where no
   other provider quotes are left to the next rules, as a hole of their own.
3. ``<= interp_max_minutes`` and bars on both sides: **interpolate** -- the close moves on a
   straight line from the bar before to the bar after; each filled bar is flat at its point on
   the line, volume 0.
4. longer (or at a series edge): **provider recovery**, if enabled -- the bars another provider
   stored for those minutes (``alternates``: provider name -> its bar frame), scaled by the
   basis (ratio of closes) between the series and that provider. The basis is measured at the
   nearest minutes before and after the gap where both have a real bar, and moves log-linearly
   across the gap (constant when only one side exists). Method ``"provider:<name>"``.
5. otherwise **excluded**: the minutes stay missing and the audit says so.

MICE needs context: the series and the alternates must be given over the gap and some time
around it (``mice_context_minutes`` on each side, :attr:`GapPolicy.context_ns`); with less than
``mice_min_rows`` minutes of shared evidence it does not run and the other rules apply.

A gap only partly covered by a provider: the provider covering the most missing minutes (ties:
the order of ``alternates``) fills the minutes it has; each hole that remains is then treated as
a gap of its own, bounded by the recovered bars -- a short hole is forward-filled or
interpolated, a long one goes to the next provider, else it is excluded. The audit has one row
per contiguous segment filled by one method, so such a gap yields several rows.

Filled bars carry ``imputed`` = their method, ``ticks`` = 0 and ``providers`` = 0 (for ffill and
interpolation), the number of other providers quoting that minute (for MICE) or the provider's
tick count and 1 (for recovery), and as ``confidence`` the larger confidence of the two bars
bounding the hole (the one that exists at a series edge); for MICE, the standard deviation of
its imputations in bp when that is larger.
Pure numpy/pandas: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from tickcast.config import GapConfig
from tickcast.errors import InvalidInput
from tickcast.market.mice import MiceResult, mice_impute
from tickcast.storage.bar_store import BAR_COLUMNS, bar_columns
from tickcast.ticks import NS_PER_MIN

# A guard, not a tuning knob: a grid this long (19 years of minutes) means bad bounds, and
# would allocate gigabytes.
MAX_GRID_SLOTS = 10_000_000

_REAL = 0
_FFILL = 1
_INTERP = 2
_MISSING = -1
_MICE = 3
_PROVIDER0 = 4  # method code of alternates[k] is _PROVIDER0 + k


@dataclass(frozen=True)
class Gap:
    """A run of missing bars: open times ``start_ns .. end_ns`` (inclusive), ``missing`` bars."""

    start_ns: int
    end_ns: int
    missing: int
    freq_ns: int

    @property
    def minutes(self) -> float:
        """Duration of the gap in minutes (missing bars x bar length)."""
        return self.missing * self.freq_ns / NS_PER_MIN


def _check_freq(freq_ns: object) -> int:
    if isinstance(freq_ns, bool) or not isinstance(freq_ns, (int, np.integer)) or int(freq_ns) <= 0:
        raise InvalidInput(f"freq_ns must be a positive integer (ns), got {freq_ns!r}", field="freq_ns")
    return int(freq_ns)


def _check_bound(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{field} must be an integer UNIX ns or None, got {value!r}", field=field)
    return int(value)


def find_gaps(
    ts_ns: np.ndarray,
    freq_ns: int,
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> list[Gap]:
    """Runs of missing bars in a series of bar open times, at any bar frequency.

    Parameters
    ----------
    ts_ns
        Bar open times (UNIX ns), in any order; duplicates are ignored.
    freq_ns
        Bar length in ns.
    start_ns, end_ns
        Optional expected range ``[start_ns, end_ns)``: bars are expected at ``start_ns + k *
        freq_ns`` before the first bar and after the last one, so leading and trailing gaps are
        reported too. Bars outside the range are ignored.

    Returns
    -------
    list[Gap]
        Sorted by start. Missing slots between two bars are counted on the grid anchored at the
        earlier bar.

    Raises
    ------
    InvalidInput
        Non-integer times or a non-positive frequency.

    Examples
    --------
    >>> m = 60_000_000_000
    >>> [(g.start_ns // m, g.end_ns // m, g.missing) for g in find_gaps([0, m, 4 * m, 5 * m], m)]
    [(2, 3, 2)]
    >>> [(g.start_ns // m, g.missing) for g in find_gaps([2 * m], m, start_ns=0, end_ns=5 * m)]
    [(0, 2), (3, 2)]
    """
    freq = _check_freq(freq_ns)
    lo = _check_bound(start_ns, "start_ns")
    hi = _check_bound(end_ns, "end_ns")
    ts = np.asarray(ts_ns)
    if ts.dtype.kind not in "iu":
        raise InvalidInput(f"ts_ns must be integer UNIX ns, got {ts.dtype}", field="ts_ns")
    ts = np.unique(ts.astype(np.int64))
    if lo is not None:
        ts = ts[ts >= lo]
    if hi is not None:
        ts = ts[ts < hi]
    gaps: list[Gap] = []
    if len(ts) == 0:
        if lo is not None and hi is not None and hi > lo:
            n = (hi - lo + freq - 1) // freq
            gaps.append(Gap(lo, lo + (n - 1) * freq, n, freq))
        return gaps
    if lo is not None and ts[0] > lo:
        n = (int(ts[0]) - lo + freq - 1) // freq
        gaps.append(Gap(lo, lo + (n - 1) * freq, n, freq))
    missing = (np.diff(ts) - 1) // freq
    for i in np.flatnonzero(missing > 0):
        k = int(missing[i])
        gaps.append(Gap(int(ts[i]) + freq, int(ts[i]) + k * freq, k, freq))
    if hi is not None:
        n = (hi - int(ts[-1]) - 1) // freq
        if n > 0:
            gaps.append(Gap(int(ts[-1]) + freq, int(ts[-1]) + n * freq, n, freq))
    return gaps


def _alternate_columns(name: str, frame: object) -> dict[str, np.ndarray]:
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"alternate '{name}' must be a DataFrame, got {type(frame).__name__}", field=f"alternates.{name}")
    try:
        return bar_columns(frame, name=f"alternates.{name}")
    except InvalidInput as exc:
        raise InvalidInput(f"alternate '{name}': {exc.message}", field=f"alternates.{name}.{exc.field}") from None


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (inclusive) indices of the runs of True in ``mask``."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2] - 1


class GapPolicy:
    """Fill the gaps of a bar series by duration: ffill, interpolate, another provider, or not.

    Parameters
    ----------
    cfg
        ``ffill_max_minutes``, ``interp_max_minutes``, ``provider_recovery`` and the ``mice_*``
        settings.

    Examples
    --------
    >>> import pandas as pd
    >>> from tickcast.config import GapConfig
    >>> m = 60_000_000_000
    >>> closes = {0: 100.0, 1: 101.0, 3: 103.0, 8: 98.0}
    >>> bars = pd.DataFrame({"ts": [k * m for k in closes], "open": list(closes.values()),
    ...     "high": list(closes.values()), "low": list(closes.values()),
    ...     "close": list(closes.values()), "volume": 1.0, "vwap": list(closes.values()),
    ...     "ticks": 1, "providers": 1, "confidence": 0.0, "imputed": ""})
    >>> filled, audit = GapPolicy(GapConfig(ffill_max_minutes=1, interp_max_minutes=5)).fill(bars, m)
    >>> filled["close"].tolist()
    [100.0, 101.0, 101.0, 103.0, 102.0, 101.0, 100.0, 99.0, 98.0]
    >>> audit[["missing_minutes", "method", "filled"]].values.tolist()
    [[1.0, 'ffill', True], [4.0, 'interpolate', True]]
    """

    def __init__(self, cfg: GapConfig) -> None:
        if not isinstance(cfg, GapConfig):
            raise InvalidInput(f"cfg must be a GapConfig, got {type(cfg).__name__}", field="gaps")
        self.cfg = cfg

    @property
    def context_ns(self) -> int:
        """Time on each side of a gap that MICE fits on (0 when MICE is off): a caller that
        wants MICE passes the series and the alternates over at least that much around it."""
        return self.cfg.mice_context_minutes * NS_PER_MIN if self.cfg.mice_max_minutes else 0

    def fill(
        self,
        bars: pd.DataFrame,
        freq_ns: int,
        alternates: Mapping[str, pd.DataFrame] | None = None,
        start_ns: int | None = None,
        end_ns: int | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return the series with its gaps filled, and the audit of every gap segment.

        Parameters
        ----------
        bars
            The series (bar schema); rows sharing a ``ts`` keep the last one. Bars already
            imputed count as present.
        freq_ns
            Bar length in ns; bar times must lie on one grid of that step.
        alternates
            Provider name -> that provider's bars (bar schema) for recovery of long gaps.
        start_ns, end_ns
            Optional expected range ``[start_ns, end_ns)`` (grid anchored at ``start_ns``), so
            leading and trailing gaps are handled too; bars outside it are dropped. Without them
            only gaps between the first and last bar are considered.

        Returns
        -------
        (filled_bars, audit)
            ``filled_bars`` has the bar schema, sorted by ``ts``; excluded minutes stay absent.
            ``audit`` has columns ``start``, ``end`` (first and last missing bar open, ns),
            ``missing_minutes``, ``method`` (ffill | interpolate | provider:<name> | excluded)
            and ``filled``, one row per contiguous segment filled by one method.

        Raises
        ------
        InvalidInput
            Bad frame (naming the column), bar times off the grid, non-finite closes, or a range
            too long to hold.
        """
        freq = _check_freq(freq_ns)
        lo = _check_bound(start_ns, "start_ns")
        hi = _check_bound(end_ns, "end_ns")
        cols = bar_columns(bars)
        checked_alternates = self._validate_alternates(alternates)
        ts = cols["ts"]
        keep = np.ones(len(ts), dtype=bool)
        if lo is not None:
            keep &= ts >= lo
        if hi is not None:
            keep &= ts < hi
        if not keep.all():
            cols = {c: v[keep] for c, v in cols.items()}
            ts = cols["ts"]
        order = np.argsort(ts, kind="stable")
        ts_sorted = ts[order]
        last = np.ones(len(ts_sorted), dtype=bool)
        last[:-1] = ts_sorted[1:] != ts_sorted[:-1]
        cols = {c: v[order[last]] for c, v in cols.items()}
        ts = cols["ts"]
        if not np.isfinite(cols["close"]).all():
            raise InvalidInput("bars must have finite closes to fill gaps from", field="close")

        if len(ts) == 0 and (lo is None or hi is None):
            return _frame(cols), _audit([], [], [], [], [])
        anchor = lo if lo is not None else int(ts[0])
        last_slot = (hi - 1 - anchor) // freq if hi is not None else (int(ts[-1]) - anchor) // freq
        n = int(last_slot) + 1
        if n > MAX_GRID_SLOTS:
            raise InvalidInput(f"range of {n} bars exceeds {MAX_GRID_SLOTS}", field="end_ns")
        if n <= 0:
            return _frame(cols), _audit([], [], [], [], [])
        offsets = ts - anchor
        if (offsets % freq).any():
            bad = int(ts[np.flatnonzero(offsets % freq)[0]])
            raise InvalidInput(f"bar ts {bad} is not on the {freq} ns grid anchored at {anchor}", field="ts")
        pos = offsets // freq

        grid = _Grid(n, anchor, freq)
        grid.place(pos, cols)
        alts = self._alternates(grid, checked_alternates) if checked_alternates else []
        mice = bool(self.cfg.mice_max_minutes) and bool(alts)
        self._fill_short(grid, mice)
        long_starts, long_ends = _runs(grid.method == _MISSING)
        for s, e in zip(long_starts, long_ends):
            self._resolve(grid, int(s), int(e), alts, mice)
        return grid.output(cols), grid.audit()

    # ---- filling ----------------------------------------------------------------------------

    def _mice_length(self, length_ns: np.ndarray | int) -> np.ndarray | bool:
        """Whether a hole of this duration is one MICE should try."""
        cfg = self.cfg
        return (length_ns >= cfg.mice_min_minutes * NS_PER_MIN) & (length_ns <= cfg.mice_max_minutes * NS_PER_MIN)

    def _fill_short(self, grid: "_Grid", mice: bool) -> None:
        """Vectorized ffill / interpolation of every short gap bounded by real bars (gaps that
        MICE should try first are left to :meth:`_resolve`)."""
        n = grid.n
        idx = np.arange(n)
        present = grid.method == _REAL
        prev = np.maximum.accumulate(np.where(present, idx, -1))
        nxt = np.minimum.accumulate(np.where(present, idx, n)[::-1])[::-1]
        missing = ~present
        dur = (nxt - prev - 1).astype(np.int64) * grid.freq
        ffill = missing & (prev >= 0) & (dur <= self.cfg.ffill_max_minutes * NS_PER_MIN)
        interp = missing & ~ffill & (prev >= 0) & (nxt < n) & (dur <= self.cfg.interp_max_minutes * NS_PER_MIN)
        if mice:
            interp &= ~self._mice_length(dur)
        if ffill.any():
            grid.set_flat(np.flatnonzero(ffill), grid.close[prev[ffill]], prev[ffill], nxt[ffill], _FFILL)
        if interp.any():
            p, q, i = prev[interp], nxt[interp], idx[interp]
            c0, c1 = grid.close[p], grid.close[q]
            line = c0 + (c1 - c0) * (i - p) / (q - p)
            grid.set_flat(i, line, p, q, _INTERP)

    def _resolve(self, grid: "_Grid", s: int, e: int, alts: list["_Alternate"], mice: bool) -> None:
        """Fill the hole ``s..e`` (grid indices, inclusive) whose bounds are filled or edges."""
        n = grid.n
        length_ns = (e - s + 1) * grid.freq
        has_prev, has_next = s > 0, e < n - 1
        if has_prev and length_ns <= self.cfg.ffill_max_minutes * NS_PER_MIN:
            idx = np.arange(s, e + 1)
            grid.set_flat(idx, np.full(len(idx), grid.close[s - 1]), np.full(len(idx), s - 1),
                          np.full(len(idx), e + 1 if has_next else n), _FFILL)
            return
        if mice and alts and self._mice_length(length_ns):
            res = self._mice(grid, s, e, alts)
            if res is not None:
                grid.set_mice(s, e, res)
                # Minutes no other provider quoted: holes of their own, MICE already tried.
                hs, he = _runs(grid.method[s:e + 1] == _MISSING)
                for a, b in zip(hs, he):
                    self._resolve(grid, s + int(a), s + int(b), alts, False)
                return
        if has_prev and has_next and length_ns <= self.cfg.interp_max_minutes * NS_PER_MIN:
            idx = np.arange(s, e + 1)
            c0, c1 = grid.close[s - 1], grid.close[e + 1]
            line = c0 + (c1 - c0) * (idx - (s - 1)) / (e + 2 - s)
            grid.set_flat(idx, line, np.full(len(idx), s - 1), np.full(len(idx), e + 1), _INTERP)
            return
        if self.cfg.provider_recovery and alts:
            best: tuple[int, int] | None = None  # (coverage, position in alts)
            for k, alt in enumerate(alts):
                cover = int(alt.present[s:e + 1].sum())
                if cover and alt.basis_at(s, e) is not None and (best is None or cover > best[0]):
                    best = (cover, k)
            if best is not None:
                alt = alts[best[1]]
                grid.set_provider(s, e, alt)
                rest = alts[:best[1]] + alts[best[1] + 1:]
                hs, he = _runs(grid.method[s:e + 1] == _MISSING)
                for a, b in zip(hs, he):
                    self._resolve(grid, s + int(a), s + int(b), rest, mice)
                return
        grid.method[s:e + 1] = _MISSING  # excluded: stays missing, audited as such

    def _mice(self, grid: "_Grid", s: int, e: int, alts: list["_Alternate"]) -> MiceResult | None:
        """MICE of the hole ``s..e`` from every alternate over a context window around it."""
        cfg = self.cfg
        ctx = -(-cfg.mice_context_minutes * NS_PER_MIN // grid.freq)  # bars, rounded up
        lo, hi = max(0, s - ctx), min(grid.n, e + 1 + ctx)
        target = np.where(grid.real[lo:hi] & (grid.close[lo:hi] > 0), grid.close[lo:hi], np.nan)
        preds = np.column_stack([np.where(a.present[lo:hi], a.floats["close"][lo:hi], np.nan) for a in alts])
        res = mice_impute(target, preds, np.arange(s - lo, e + 1 - lo),
                          imputations=cfg.mice_imputations, max_iter=cfg.mice_max_iter,
                          min_rows=cfg.mice_min_rows, seed=cfg.mice_seed)
        if res is None:
            return None
        return MiceResult(rows=res.rows + lo, values=res.values, sd_bp=res.sd_bp, predictors=res.predictors)

    @staticmethod
    def _validate_alternates(alternates: Mapping[str, pd.DataFrame] | None) -> list[tuple[str, dict[str, np.ndarray]]]:
        if alternates is None:
            return []
        if not isinstance(alternates, Mapping):
            raise InvalidInput("alternates must map provider name -> bar frame", field="alternates")
        out = []
        for name, frame in alternates.items():
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"alternate name {name!r} must be a non-empty string", field="alternates")
            out.append((name, _alternate_columns(name, frame)))
        return out

    def _alternates(self, grid: "_Grid", checked: list[tuple[str, dict[str, np.ndarray]]]) -> list["_Alternate"]:
        out = []
        for k, (name, cols) in enumerate(checked):
            alt = _Alternate(name, _PROVIDER0 + k, grid, cols)
            grid.method_names[alt.code] = f"provider:{name}"
            out.append(alt)
        return out


class _Grid:
    """The series laid on its full time grid, with a method code per slot."""

    def __init__(self, n: int, anchor: int, freq: int) -> None:
        self.n = n
        self.anchor = anchor
        self.freq = freq
        self.method = np.full(n, _MISSING, dtype=np.int16)
        self.real = np.zeros(n, dtype=bool)
        self.floats = {c: np.full(n, np.nan) for c in ("open", "high", "low", "close", "volume", "vwap", "confidence")}
        self.close = self.floats["close"]
        self.ticks = np.zeros(n, dtype=np.int64)
        self.providers = np.zeros(n, dtype=np.int64)
        self.src = np.full(n, -1, dtype=np.int64)  # row of the input frame for real bars
        self.method_names: dict[int, str] = {_FFILL: "ffill", _INTERP: "interpolate", _MICE: "mice",
                                             _MISSING: "excluded"}

    def place(self, pos: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        self.method[pos] = _REAL
        self.real[pos] = True
        for c, arr in self.floats.items():
            arr[pos] = cols[c]
        self.ticks[pos] = cols["ticks"]
        self.providers[pos] = cols["providers"]
        self.src[pos] = np.arange(len(pos))

    def _edge_confidence(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        conf = self.floats["confidence"]
        a = np.where(prev >= 0, conf[np.clip(prev, 0, self.n - 1)], np.nan)
        b = np.where(nxt < self.n, conf[np.clip(nxt, 0, self.n - 1)], np.nan)
        return np.fmax(a, b)

    def set_flat(self, idx: np.ndarray, price: np.ndarray, prev: np.ndarray, nxt: np.ndarray, code: int) -> None:
        conf = self._edge_confidence(prev, nxt)
        for c in ("open", "high", "low", "close", "vwap"):
            self.floats[c][idx] = price
        self.floats["volume"][idx] = 0.0
        self.floats["confidence"][idx] = conf
        self.ticks[idx] = 0
        self.providers[idx] = 0
        self.method[idx] = code

    def set_mice(self, s: int, e: int, res: MiceResult) -> None:
        """Flat bars at the imputed closes of the hole ``s..e``'s rows MICE filled."""
        idx = res.rows
        for c in ("open", "high", "low", "close", "vwap"):
            self.floats[c][idx] = res.values
        self.floats["volume"][idx] = 0.0
        edge = self._edge_confidence(np.full(len(idx), s - 1), np.full(len(idx), e + 1))
        self.floats["confidence"][idx] = np.fmax(edge, res.sd_bp)
        self.ticks[idx] = 0
        self.providers[idx] = res.predictors
        self.method[idx] = _MICE

    def set_provider(self, s: int, e: int, alt: "_Alternate") -> None:
        idx = s + np.flatnonzero(alt.present[s:e + 1])
        basis = alt.basis_at(s, e)
        assert basis is not None  # checked by the caller
        scale = basis(idx)
        for c in ("open", "high", "low", "close", "vwap"):
            self.floats[c][idx] = alt.floats[c][idx] * scale
        self.floats["volume"][idx] = alt.floats["volume"][idx]
        prev = np.full(len(idx), s - 1)
        nxt = np.full(len(idx), e + 1)
        self.floats["confidence"][idx] = self._edge_confidence(prev, nxt)
        self.ticks[idx] = alt.ticks[idx]
        self.providers[idx] = 1
        self.method[idx] = alt.code

    def output(self, cols: dict[str, np.ndarray]) -> pd.DataFrame:
        rows = np.flatnonzero(self.method != _MISSING)
        imputed = np.empty(len(rows), dtype=object)
        codes = self.method[rows]
        real = codes == _REAL
        imputed[real] = cols["imputed"][self.src[rows[real]]]
        for code, name in self.method_names.items():
            if code != _MISSING:
                imputed[codes == code] = name
        out = {
            "ts": self.anchor + rows.astype(np.int64) * self.freq,
            **{c: self.floats[c][rows] for c in ("open", "high", "low", "close", "volume", "vwap")},
            "ticks": self.ticks[rows],
            "providers": self.providers[rows],
            "confidence": self.floats["confidence"][rows],
            "imputed": imputed,
        }
        return _frame(out)

    def audit(self) -> pd.DataFrame:
        gap = ~self.real
        codes = self.method
        same_prev = np.zeros(self.n, dtype=bool)
        same_prev[1:] = gap[:-1] & (codes[1:] == codes[:-1])
        same_next = np.zeros(self.n, dtype=bool)
        same_next[:-1] = gap[1:] & (codes[:-1] == codes[1:])
        starts = np.flatnonzero(gap & ~same_prev)
        ends = np.flatnonzero(gap & ~same_next)
        seg_codes = codes[starts]
        return _audit(
            self.anchor + starts.astype(np.int64) * self.freq,
            self.anchor + ends.astype(np.int64) * self.freq,
            (ends - starts + 1) * self.freq / NS_PER_MIN,
            [self.method_names[int(c)] for c in seg_codes],
            seg_codes != _MISSING,
        )


class _Alternate:
    """One provider's bars on the series' grid, and the basis against the series."""

    def __init__(self, name: str, code: int, grid: _Grid, cols: dict[str, np.ndarray]) -> None:
        self.name = name
        self.code = code
        ts = cols["ts"]
        off = ts - grid.anchor
        ok = (off >= 0) & (off % grid.freq == 0) & (off // grid.freq < grid.n) & np.isfinite(cols["close"]) & (cols["close"] > 0)
        pos = (off[ok] // grid.freq).astype(np.int64)
        self.present = np.zeros(grid.n, dtype=bool)
        self.present[pos] = True
        self.floats = {c: np.full(grid.n, np.nan) for c in ("open", "high", "low", "close", "volume", "vwap")}
        for c, arr in self.floats.items():
            arr[pos] = cols[c][ok]
        self.ticks = np.zeros(grid.n, dtype=np.int64)
        self.ticks[pos] = cols["ticks"][ok]
        # Basis anchors: minutes where the series has a real bar and this provider has one too.
        common = grid.real & self.present & (grid.close > 0)
        idx = np.arange(grid.n)
        self._left = np.maximum.accumulate(np.where(common, idx, -1))
        self._right = np.minimum.accumulate(np.where(common, idx, grid.n)[::-1])[::-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            self._log_basis = np.where(common, np.log(grid.close) - np.log(self.floats["close"]), np.nan)
        self._n = grid.n

    def basis_at(self, s: int, e: int) -> Callable[[np.ndarray], np.ndarray] | None:
        """Scale factor series/provider over the hole ``s..e`` as a function of grid index."""
        left = int(self._left[s - 1]) if s > 0 else -1
        right = int(self._right[e + 1]) if e + 1 < self._n else self._n
        has_l, has_r = left >= 0, right < self._n
        if not (has_l or has_r):
            return None
        if has_l and has_r:
            bl, br = self._log_basis[left], self._log_basis[right]
            return lambda i: np.exp(bl + (br - bl) * (i - left) / (right - left))
        b = self._log_basis[left if has_l else right]
        return lambda i: np.full(len(i), np.exp(b))


def _frame(cols: dict[str, np.ndarray]) -> pd.DataFrame:
    out = pd.DataFrame({c: np.asarray(cols[c], dtype=dt) for c, dt in BAR_COLUMNS.items() if c != "imputed"})
    out.insert(len(out.columns), "imputed", pd.Series(np.asarray(cols["imputed"], dtype=object), dtype="str"))
    return out


def _audit(
    start: np.ndarray | Sequence[int],
    end: np.ndarray | Sequence[int],
    minutes: np.ndarray | Sequence[float],
    method: Sequence[str],
    filled: np.ndarray | Sequence[bool],
) -> pd.DataFrame:
    return pd.DataFrame({
        "start": np.asarray(start, dtype=np.int64),
        "end": np.asarray(end, dtype=np.int64),
        "missing_minutes": np.asarray(minutes, dtype=np.float64),
        "method": pd.Series(list(method), dtype="str"),
        "filled": np.asarray(filled, dtype=bool),
    })


def fill_in_sessions(
    policy: GapPolicy,
    bars: pd.DataFrame,
    freq_ns: int,
    seg_starts: np.ndarray,
    seg_ends: np.ndarray,
    alternates: Mapping[str, pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``policy`` separately over each run of expected bar slots (each trading session).

    A closure of the market is not a gap: nothing is expected between two sessions, so nothing
    there is imputed or audited. Each session is filled as a series of its own whose range is
    the session (``[seg_start, seg_end)``), so neither neighbour of a closure serves the other
    side: a hole at the start of a session has no bar before it (no forward fill from the last
    close, no interpolation across the closure; only provider recovery, else excluded), and a
    hole at its end has no bar after it (forward fill when short, else recovery or excluded).

    Parameters
    ----------
    policy
        The gap policy.
    bars
        The series (bar schema); bars outside every segment are ignored.
    freq_ns
        Bar length in ns.
    seg_starts, seg_ends
        Sorted, disjoint, grid-aligned runs of expected slots
        (:meth:`tickcast.market.calendar.TradingCalendar.expected_segments`).
    alternates
        As for :meth:`GapPolicy.fill`.

    Returns
    -------
    (filled_bars, audit)
        As :meth:`GapPolicy.fill`: the bars of all segments with their gaps filled, and one
        audit row per filled or excluded segment of a gap.

    Examples
    --------
    >>> import pandas as pd
    >>> from tickcast.config import GapConfig
    >>> m = 60_000_000_000
    >>> closes = {0: 100.0, 2: 102.0, 3: 103.0, 10: 110.0, 12: 112.0}  # closed at minutes 5-9
    >>> bars = pd.DataFrame({"ts": [k * m for k in closes], "open": list(closes.values()),
    ...     "high": list(closes.values()), "low": list(closes.values()),
    ...     "close": list(closes.values()), "volume": 1.0, "vwap": list(closes.values()),
    ...     "ticks": 1, "providers": 1, "confidence": 0.0, "imputed": ""})
    >>> policy = GapPolicy(GapConfig(ffill_max_minutes=0, interp_max_minutes=5))
    >>> filled, audit = fill_in_sessions(policy, bars, m, np.array([0, 10 * m]),
    ...                                  np.array([5 * m, 13 * m]))
    >>> (filled["ts"] // m).tolist()  # minute 4 ends a session: nothing to interpolate towards
    [0, 1, 2, 3, 10, 11, 12]
    >>> audit[["missing_minutes", "method"]].values.tolist()
    [[1.0, 'interpolate'], [1.0, 'excluded'], [1.0, 'interpolate']]
    """
    freq = _check_freq(freq_ns)
    starts = np.asarray(seg_starts, dtype=np.int64)
    ends = np.asarray(seg_ends, dtype=np.int64)
    if starts.shape != ends.shape or (len(starts) and (
            (ends <= starts).any() or (starts[1:] < ends[:-1]).any())):
        raise InvalidInput("session segments must be sorted, disjoint and non-empty",
                           field="segments")
    ts = bar_columns(bars)["ts"]
    filled: list[pd.DataFrame] = []
    audits: list[pd.DataFrame] = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        inside = (ts >= s) & (ts < e)
        f, a = policy.fill(bars.loc[inside], freq, alternates, start_ns=s, end_ns=e)
        filled.append(f)
        audits.append(a)
    if not filled:
        return _frame(bar_columns(bars.iloc[:0])), _audit([], [], [], [], [])
    return (pd.concat(filled, ignore_index=True),
            pd.concat(audits, ignore_index=True))
