"""Event-time bars per provider and consensus bars, with a watermark and allowed lateness.

Bars are built from accepted ticks in event-time order. The watermark is the largest accepted
event time seen minus ``allowed_lateness_s``:

* a bar is first emitted once event time passes its end (a tick of a later bar arrived);
* a tick at or after the watermark whose bar was already emitted amends it: the bar is
  re-emitted with the tick included (and the consensus bar re-emitted when it changed);
* a tick older than the watermark is marked ``LATE`` and handed back in
  :attr:`BarUpdate.late` (to be kept aside, never silently dropped);
* :meth:`BarBuilder.flush` emits every bar still open (end of a replay).

A consensus bar aggregates, Pyth-style (:func:`~tickcast.market.consensus.aggregate_votes`),
the bars of the providers for its minute: open, high, low and close are each the median of the
votes ``x - c, x, x + c`` (``c`` the provider's mean half spread in the minute, 0 without
quotes), so high >= max(open, close) holds because the median is monotone. With
``consensus.weighting: reliability`` (the default) each provider's votes are weighted by its
reliability as of its last tick up to that minute; equal reliabilities give the plain median
bit for bit. A provider that did
not trade in the minute but is fresh (last accepted tick within ``stale_after_s`` of the
minute's end, no ``FROZEN`` tick since, reliability >= ``min_reliability``) votes with a flat
bar at its last close. A consensus bar exists for a minute only if some provider whose
reliability is high enough traded in it; with one provider it equals that provider's bar.

Only bars inside the lateness window are kept in memory (a few per provider), plus the last
close, time, reliability and frozen mark of each provider before that window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tickcast.config import BarConfig, ConsensusConfig
from tickcast.errors import InvalidInput, TickStatus
from tickcast.market.consensus import NEVER, aggregate_votes
from tickcast.ticks import NS_PER_S, TickBatch

__all__ = ["BarBuilder", "BarUpdate", "BAR_COLUMNS", "empty_bar_frame", "bar_frame"]

LATEST = np.iinfo(np.int64).max // 4  # "no such time" on the side of the future

BAR_COLUMNS: tuple[str, ...] = (
    "ts", "open", "high", "low", "close", "volume", "vwap", "ticks", "providers", "confidence",
    "imputed",
)
_BAR_DTYPES: dict[str, str] = {
    "ts": "int64", "open": "float64", "high": "float64", "low": "float64", "close": "float64",
    "volume": "float64", "vwap": "float64", "ticks": "int64", "providers": "int64",
    "confidence": "float64", "imputed": "str", "provider": "str",
}

# Per-(provider, minute) partial-bar columns kept between updates.
_FLOAT_COLS = ("open", "high", "low", "close", "volume", "pv", "pxsum", "hs_sum", "hs_n", "rel")
_INT_COLS = ("pid", "minute", "ticks", "first_ts", "last_ts", "frozen_ts", "rel_ts")
_BOOL_COLS = ("emitted",)
# Consensus values compared to decide whether a re-computed bar changed (and is re-emitted).
_CONS_VALUES = ("open", "high", "low", "close", "volume", "vwap", "ticks", "providers", "confidence")


def _build_empty_frame(with_provider: bool) -> pd.DataFrame:
    cols = list(BAR_COLUMNS) + (["provider"] if with_provider else [])
    return pd.DataFrame({c: pd.Series(dtype=_BAR_DTYPES[c]) for c in cols})


# Building an empty frame with this schema costs about a millisecond (one Series per column),
# more than the rest of a small batch's work; every call hands out a shallow copy of one
# template instead (pandas copy-on-write keeps the template unchanged whatever callers do).
_EMPTY_TEMPLATES: dict[bool, pd.DataFrame] = {False: _build_empty_frame(False),
                                              True: _build_empty_frame(True)}
# The dtype text columns get (pandas' "str"); naming it spares the constructor inferring it.
_TEXT_DTYPE = _EMPTY_TEMPLATES[True]["provider"].dtype


def empty_bar_frame(with_provider: bool = False) -> pd.DataFrame:
    """An empty bar frame with the bar schema (plus ``provider`` when asked).

    Examples
    --------
    >>> f = empty_bar_frame(True)
    >>> len(f), list(f.columns)[-2:], str(f["ts"].dtype)
    (0, ['imputed', 'provider'], 'int64')
    """
    return _EMPTY_TEMPLATES[bool(with_provider)].copy(deep=False)


def bar_frame(columns: dict[str, np.ndarray], provider: np.ndarray | None = None) -> pd.DataFrame:
    """Bar frame from numpy columns (``imputed`` set to ``""``; ``provider`` appended if given)."""
    n = len(columns["ts"])
    data: dict[str, object] = {
        "ts": columns["ts"].astype(np.int64, copy=False),
        **{c: columns[c].astype(np.float64, copy=False)
           for c in ("open", "high", "low", "close", "volume", "vwap")},
        "ticks": columns["ticks"].astype(np.int64, copy=False),
        "providers": columns["providers"].astype(np.int64, copy=False),
        "confidence": columns["confidence"].astype(np.float64, copy=False),
        "imputed": pd.array(np.full(n, "", dtype=object), dtype=_TEXT_DTYPE),
    }
    if provider is not None:
        data["provider"] = pd.array(np.asarray(provider, dtype=object), dtype=_TEXT_DTYPE)
    return pd.DataFrame(data)


@dataclass
class BarUpdate:
    """What one :meth:`BarBuilder.update` (or flush) produced.

    Attributes
    ----------
    consensus
        Consensus bars emitted for the first time or re-emitted because they changed.
    provider
        Provider bars emitted for the first time or amended (bar schema plus ``provider``).
    late
        Ticks older than the watermark (status ``LATE``), kept aside.
    watermark_ns
        Largest accepted event time minus the allowed lateness (very negative before any tick).
    bars_new
        Consensus bars in ``consensus`` emitted for the first time.
    bars_amended
        Consensus bars in ``consensus`` that were emitted before and changed.
    """

    consensus: pd.DataFrame
    provider: pd.DataFrame
    late: TickBatch
    watermark_ns: int
    bars_new: int = 0
    bars_amended: int = 0


def _ffill_rows(valid: np.ndarray, values: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Forward-fill ``values`` down each column where ``valid``; ``initial`` before the first."""
    m = valid.shape[0]
    idx = np.where(valid, np.arange(m)[:, None], -1)
    np.maximum.accumulate(idx, axis=0, out=idx)
    got = np.take_along_axis(values, np.maximum(idx, 0), axis=0)
    return np.where(idx >= 0, got, initial[None, :])


class BarBuilder:
    """Per-provider and consensus 1-minute bars for one asset, in event time.

    Parameters
    ----------
    asset
        Asset id; batches of another asset are refused.
    bars
        Bar frequency and allowed lateness (``bars`` config section).
    consensus
        Staleness and reliability thresholds (``consensus`` config section).

    Examples
    --------
    >>> from tickcast.config import BarConfig, ConsensusConfig
    >>> t0 = 1_700_000_040 * 10**9  # a minute boundary
    >>> b = TickBatch.from_columns("BTC-USD", ["a"] * 4, ts_event=t0 + np.array([0, 30, 61, 125]) * 10**9,
    ...                            price=[100.0, 102.0, 101.0, 99.0], size=[1.0, 3.0, 1.0, 1.0])
    >>> bb = BarBuilder("BTC-USD", BarConfig(), ConsensusConfig())
    >>> up = bb.update(b)
    >>> up.consensus[["open", "high", "low", "close", "volume", "vwap", "ticks"]].values.tolist()
    [[100.0, 102.0, 100.0, 102.0, 4.0, 101.5, 2.0], [101.0, 101.0, 101.0, 101.0, 1.0, 101.0, 1.0]]
    >>> len(bb.flush().consensus)
    1
    """

    def __init__(self, asset: str, bars: BarConfig, consensus: ConsensusConfig) -> None:
        self.asset = asset
        self.bars_cfg = bars
        self.consensus_cfg = consensus
        self.freq_ns = int(bars.freq_s) * NS_PER_S
        self.lateness_ns = int(round(bars.allowed_lateness_s * NS_PER_S))
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._max_ts = int(NEVER)
        self._late_before = int(NEVER)  # after a flush, nothing before the flushed bars is taken
        self._rows = self._empty_rows(0)
        # Per provider, as of the end of the last bar dropped from memory.
        self._pre_close = np.empty(0)
        self._pre_conf = np.empty(0)
        self._pre_last_ts = np.empty(0, dtype=np.int64)
        self._pre_frozen_ts = np.empty(0, dtype=np.int64)
        self._pre_rel = np.empty(0)
        # Consensus bars emitted and still amendable: minute -> values (_CONS_VALUES order).
        self._cons_min = np.empty(0, dtype=np.int64)
        self._cons_vals = np.empty((0, len(_CONS_VALUES)))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _empty_rows(n: int) -> dict[str, np.ndarray]:
        rows: dict[str, np.ndarray] = {c: np.empty(n) for c in _FLOAT_COLS}
        rows.update({c: np.empty(n, dtype=np.int64) for c in _INT_COLS})
        rows.update({c: np.zeros(n, dtype=bool) for c in _BOOL_COLS})
        return rows

    def _lut(self, providers: tuple[str, ...]) -> np.ndarray:
        new = [p for p in providers if p not in self._index]
        if new:
            for name in new:
                self._index[name] = len(self._names)
                self._names.append(name)
            k = len(new)
            self._pre_close = np.concatenate([self._pre_close, np.full(k, np.nan)])
            self._pre_conf = np.concatenate([self._pre_conf, np.zeros(k)])
            self._pre_last_ts = np.concatenate([self._pre_last_ts, np.full(k, NEVER, dtype=np.int64)])
            self._pre_frozen_ts = np.concatenate([self._pre_frozen_ts, np.full(k, NEVER, dtype=np.int64)])
            self._pre_rel = np.concatenate([self._pre_rel, np.ones(k)])
        return np.array([self._index[p] for p in providers], dtype=np.int64)

    @property
    def watermark_ns(self) -> int:
        """Largest accepted event time minus the allowed lateness."""
        return int(max(self._max_ts - self.lateness_ns, self._late_before))

    @property
    def open_bars(self) -> int:
        """Provider bars held in memory (open or still amendable)."""
        return int((self._rows["ticks"] > 0).sum())

    # ------------------------------------------------------------------ grouping
    def _group_ticks(self, batch: TickBatch, gp: np.ndarray, rows: np.ndarray,
                     rel: np.ndarray | None, frozen: bool) -> dict[str, np.ndarray]:
        """Partial bars of the ticks ``rows`` grouped by (provider, minute) in event-time order."""
        ts = batch.ts_event[rows]
        if len(ts) > 1 and not np.all(ts[1:] >= ts[:-1]):
            order = np.argsort(ts, kind="stable")
            rows, ts = rows[order], ts[order]
        pid = gp[rows]
        by_p = np.argsort(pid, kind="stable")  # radix sort on small ints keeps time order
        rows, ts, pid = rows[by_p], ts[by_p], pid[by_p]
        minute = ts // self.freq_ns
        n = len(rows)
        brk = np.flatnonzero((pid[1:] != pid[:-1]) | (minute[1:] != minute[:-1])) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [n]]) - 1
        g = len(starts)
        out = self._empty_rows(g)
        out["pid"], out["minute"] = pid[starts], minute[starts]
        rel_src = np.ones(n) if rel is None else np.nan_to_num(rel[rows], nan=1.0)
        out["rel"], out["rel_ts"] = rel_src[ends], ts[ends]
        if frozen:
            out["frozen_ts"] = ts[ends]
            out["open"][:] = np.nan
            out["close"][:] = np.nan
            out["high"][:] = -np.inf
            out["low"][:] = np.inf
            for c in ("volume", "pv", "pxsum", "hs_sum", "hs_n"):
                out[c][:] = 0.0
            out["ticks"][:] = 0
            out["first_ts"][:] = LATEST
            out["last_ts"][:] = NEVER
            return out
        px, sz = batch.price[rows], batch.size[rows]
        half = 0.5 * (batch.ask[rows] - batch.bid[rows])
        quoted = np.isfinite(half)
        out["open"], out["close"] = px[starts], px[ends]
        out["high"] = np.maximum.reduceat(px, starts)
        out["low"] = np.minimum.reduceat(px, starts)
        out["volume"] = np.add.reduceat(sz, starts)
        out["pv"] = np.add.reduceat(px * sz, starts)
        out["pxsum"] = np.add.reduceat(px, starts)
        out["hs_sum"] = np.add.reduceat(np.where(quoted, half, 0.0), starts)
        out["hs_n"] = np.add.reduceat(quoted.astype(np.float64), starts)
        out["ticks"] = ends - starts + 1
        out["first_ts"], out["last_ts"] = ts[starts], ts[ends]
        out["frozen_ts"][:] = NEVER
        return out

    @staticmethod
    def _merge(parts: list[dict[str, np.ndarray]],
               ranks: list[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Merge partial bars of the same (provider, minute); also returns "touched by new ticks"."""
        rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        rank = np.concatenate([np.full(len(p["pid"]), r, dtype=np.int64) for p, r in zip(parts, ranks)])
        pid, minute = rows["pid"], rows["minute"]
        # Open from the earliest first tick (ties: the earlier arrival, i.e. lower rank).
        o = np.lexsort((rank, rows["first_ts"], minute, pid))
        sp, sm = pid[o], minute[o]
        n = len(o)
        brk = np.flatnonzero((sp[1:] != sp[:-1]) | (sm[1:] != sm[:-1])) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [n]]) - 1
        if len(starts) == n:  # nothing to merge
            out = {c: v[o] for c, v in rows.items()}
            return out, (rank[o] > 0) & (out["ticks"] > 0)
        out: dict[str, np.ndarray] = {"pid": sp[starts], "minute": sm[starts]}
        take = {c: rows[c][o] for c in rows}
        out["open"] = take["open"][starts]
        out["high"] = np.maximum.reduceat(take["high"], starts)
        out["low"] = np.minimum.reduceat(take["low"], starts)
        for c in ("volume", "pv", "pxsum", "hs_sum", "hs_n", "ticks"):
            out[c] = np.add.reduceat(take[c], starts)
        out["first_ts"] = np.minimum.reduceat(take["first_ts"], starts)
        out["last_ts"] = np.maximum.reduceat(take["last_ts"], starts)
        out["frozen_ts"] = np.maximum.reduceat(take["frozen_ts"], starts)
        out["emitted"] = np.logical_or.reduceat(take["emitted"], starts)
        touched = np.logical_or.reduceat((rank[o] > 0) & (take["ticks"] > 0), starts)
        # Close from the latest last tick (ties: the later arrival); groups keep their positions.
        oc = np.lexsort((rank, rows["last_ts"], minute, pid))
        out["close"] = rows["close"][oc][ends]
        orl = np.lexsort((rank, rows["rel_ts"], minute, pid))
        out["rel"] = rows["rel"][orl][ends]
        out["rel_ts"] = rows["rel_ts"][orl][ends]
        return out, touched

    # ------------------------------------------------------------------ update
    def update(self, batch: TickBatch, reliability: np.ndarray | None = None) -> BarUpdate:
        """Add a batch (its ``OK`` ticks, and ``FROZEN`` marks) and emit what became due.

        Parameters
        ----------
        batch
            Ticks of this builder's asset, statuses already set by earlier stages. Ticks
            older than the watermark are set to ``LATE`` in place.
        reliability
            Optional per-tick reliability of the tick's provider right after the tick
            (:attr:`ConsensusBook.last_tick_reliability`); providers below
            ``min_reliability`` are left out of consensus bars. ``None``: all reliable.

        Raises
        ------
        InvalidInput
            The batch is of another asset, or ``reliability`` has the wrong length.
        """
        if batch.asset != self.asset:
            raise InvalidInput(f"bar builder of {self.asset} got a batch of {batch.asset}", field="asset")
        n = len(batch)
        if reliability is not None and len(reliability) != n:
            raise InvalidInput(f"reliability has {len(reliability)} values for {n} ticks",
                               field="reliability")
        late = np.zeros(n, dtype=bool)
        touched = np.zeros(len(self._rows["pid"]), dtype=bool)
        max_before = self._max_ts
        changed_from = int(LATEST)  # earliest minute whose partial bars this batch changes
        if n:
            lut = self._lut(batch.providers)
            valid = (batch.provider >= 0) & (batch.provider < len(batch.providers))
            gp = np.zeros(n, dtype=np.int64)
            gp[valid] = lut[batch.provider[valid]]
            status, ts = batch.status, batch.ts_event
            ok = (status == TickStatus.OK) & valid
            # Watermark just before each tick, in arrival order.
            running = np.maximum.accumulate(np.where(ok, ts, NEVER))
            prev_max = np.empty(n, dtype=np.int64)
            prev_max[0] = self._max_ts
            prev_max[1:] = np.maximum(running[:-1], self._max_ts)
            floor = np.maximum(prev_max - self.lateness_ns, self._late_before)
            late = ok & (ts < floor)
            status[late] = TickStatus.LATE
            acc = np.flatnonzero(ok & ~late)
            frz = np.flatnonzero((status == TickStatus.FROZEN) & valid & (ts >= floor))
            parts, ranks = [self._rows], [0]
            if len(acc):
                parts.append(self._group_ticks(batch, gp, acc, reliability, frozen=False))
                ranks.append(1)
                self._max_ts = max(self._max_ts, int(ts[acc].max()))
            if len(frz):
                parts.append(self._group_ticks(batch, gp, frz, reliability, frozen=True))
                ranks.append(1)
            if len(parts) > 1:
                changed_from = int(min(int(p["minute"].min()) for p in parts[1:]))
                self._rows, touched = self._merge(parts, ranks)
        late_batch = batch.take(late) if late.any() else TickBatch.empty(self.asset, batch.providers)
        return self._emit(touched, late_batch, final=False, since=(max_before, changed_from))

    def flush(self) -> BarUpdate:
        """Emit every bar still open and forget them (end of a replay).

        Ticks that fall in a flushed bar afterwards are ``LATE``.
        """
        touched = np.zeros(len(self._rows["pid"]), dtype=bool)
        if len(self._rows["minute"]):
            end = (int(self._rows["minute"].max()) + 1) * self.freq_ns
            out = self._emit(touched, TickBatch.empty(self.asset), final=True)
            self._late_before = max(self._late_before, end)
            out.watermark_ns = self.watermark_ns
            return out
        return self._emit(touched, TickBatch.empty(self.asset), final=True)

    # ------------------------------------------------------------------ emission
    def _emit(self, touched: np.ndarray, late: TickBatch, final: bool,
              since: tuple[int, int] | None = None) -> BarUpdate:
        """Emit what became due; ``since`` = (newest event time before the batch, earliest
        minute the batch changed), which lets a batch that changed nothing due skip the work."""
        r = self._rows
        minute, ticks = r["minute"], r["ticks"]
        if len(minute) == 0:
            return BarUpdate(empty_bar_frame(), empty_bar_frame(True), late, self.watermark_ns)
        freq = self.freq_ns
        closed = np.ones(len(minute), dtype=bool) if final else (minute + 1) * freq <= self._max_ts
        real = ticks > 0
        if since is not None and self._nothing_due(closed, since):
            return BarUpdate(empty_bar_frame(), empty_bar_frame(True), late, self.watermark_ns)
        emit_p = closed & real & (~r["emitted"] | touched)
        r["emitted"] |= closed & real

        provider_df = self._provider_frame(np.flatnonzero(emit_p))
        cons_df, n_new, n_amended, ff = self._consensus(closed, final)

        # Forget bars that no tick can reach any more (their end is at or before the watermark).
        wm = LATEST if final else self._max_ts - self.lateness_ns
        drop = (minute + 1) * freq <= wm
        if drop.any():
            mins, ffc = ff
            n_drop = int(np.searchsorted(mins, int(minute[drop].max()), side="right"))
            last = n_drop - 1
            self._pre_close, self._pre_conf, self._pre_last_ts, self._pre_frozen_ts, self._pre_rel = (
                ffc[0][last].copy(), ffc[1][last].copy(), ffc[2][last].copy(), ffc[3][last].copy(),
                ffc[4][last].copy(),
            )
            keep = ~drop
            self._rows = {c: v[keep] for c, v in r.items()}
            gone = (self._cons_min + 1) * freq <= wm
            self._cons_min, self._cons_vals = self._cons_min[~gone], self._cons_vals[~gone]
        return BarUpdate(cons_df, provider_df, late, self.watermark_ns, n_new, n_amended)

    def _nothing_due(self, closed: np.ndarray, since: tuple[int, int]) -> bool:
        """True when this update can neither emit nor forget a bar (most small batches).

        A consensus bar depends only on the partial bars of its minute and earlier ones (the
        forward-filled provider state runs forward in time) and on whether its end has passed.
        Every closed bar was emitted with its current values by the last full evaluation, so
        a batch whose changes all fall in still-open minutes, that closes no minute and moves
        the watermark past no bar end, would emit exactly nothing: the evaluation is skipped.
        """
        max_before, changed_from = since
        minute = self._rows["minute"]
        end = (minute + 1) * self.freq_ns
        if np.any(end <= self._max_ts - self.lateness_ns):  # bars to forget: full path
            return False
        affected = closed & ((minute >= changed_from) | (end > max_before))
        return not affected.any()

    def _provider_frame(self, idx: np.ndarray) -> pd.DataFrame:
        if len(idx) == 0:
            return empty_bar_frame(True)
        r = self._rows
        pid, minute = r["pid"][idx], r["minute"][idx]
        names = np.asarray(self._names, dtype=object)[pid]
        order = np.lexsort((names.astype(str), minute))
        idx, pid, minute, names = idx[order], pid[order], minute[order], names[order]
        vol, ticks = r["volume"][idx], r["ticks"][idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            # A bar without volume (zero-size ticks) has no VWAP: the mean traded price stands in.
            vwap = np.where(vol > 0, r["pv"][idx] / vol, r["pxsum"][idx] / ticks)
        return bar_frame({
            "ts": minute * self.freq_ns, "open": r["open"][idx], "high": r["high"][idx],
            "low": r["low"][idx], "close": r["close"][idx], "volume": vol, "vwap": vwap,
            "ticks": ticks, "providers": np.ones(len(idx), dtype=np.int64),
            "confidence": np.zeros(len(idx)),
        }, provider=names)

    def _consensus(self, closed: np.ndarray, final: bool) -> tuple[pd.DataFrame, int, int, tuple]:
        """Consensus bars of closed minutes: new ones and changed ones; plus forward-filled state."""
        r = self._rows
        cfg = self.consensus_cfg
        mins, mi = np.unique(r["minute"], return_inverse=True)
        m, n_prov = len(mins), len(self._names)
        pid = r["pid"]

        def grid(values: np.ndarray, fill: float | int, dtype: type = np.float64) -> np.ndarray:
            g = np.full((m, n_prov), fill, dtype=dtype)
            g[mi, pid] = values
            return g

        real_row = grid(r["ticks"] > 0, False, bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            conf_row = np.where(r["hs_n"] > 0, r["hs_sum"] / np.maximum(r["hs_n"], 1.0), 0.0)
        close = grid(r["close"], np.nan)
        conf = grid(conf_row, 0.0)
        last_ts = grid(np.where(r["ticks"] > 0, r["last_ts"], NEVER), NEVER, np.int64)
        frozen_ts = grid(r["frozen_ts"], NEVER, np.int64)
        rel = grid(r["rel"], np.nan)
        has_row = grid(np.ones(len(pid), dtype=bool), False, bool)

        close_ff = _ffill_rows(real_row, close, self._pre_close)
        conf_ff = _ffill_rows(real_row, conf, self._pre_conf)
        last_ff = _ffill_rows(real_row, last_ts, self._pre_last_ts)
        frozen_ff = _ffill_rows(frozen_ts > NEVER, frozen_ts, self._pre_frozen_ts)
        rel_ff = _ffill_rows(has_row, rel, self._pre_rel)
        ff = (mins, (close_ff, conf_ff, last_ff, frozen_ff, rel_ff))

        reliable = rel_ff >= cfg.min_reliability
        voting_real = real_row & reliable
        end = (mins + 1) * self.freq_ns
        flat = (
            ~real_row & reliable & np.isfinite(close_ff) & (last_ff > NEVER)
            & (end[:, None] - last_ff <= int(cfg.stale_after_s * NS_PER_S)) & (frozen_ff <= last_ff)
        )
        due_min = voting_real.any(axis=1) & (np.ones(m, dtype=bool) if final else end <= self._max_ts)
        sel = np.flatnonzero(due_min)
        if len(sel) == 0:
            return empty_bar_frame(), 0, 0, ff

        vr, fl = voting_real[sel], flat[sel]
        vote = vr | fl
        c = np.where(vr, conf[sel], conf_ff[sel])
        weights = None
        if cfg.weighting == "reliability":
            w = np.where(vote, rel_ff[sel], 0.0)
            weights = np.concatenate([w, w, w], axis=1)
        agg: dict[str, np.ndarray] = {}
        conf_close = np.empty(0)
        for field in ("open", "high", "low", "close"):
            val = np.where(vr, grid(r[field], np.nan)[sel], close_ff[sel])
            val = np.where(vote, val, np.nan)
            agg[field], cf = aggregate_votes(np.concatenate([val - c, val, val + c], axis=1), weights)
            if field == "close":
                conf_close = cf
        vol = np.where(vr, grid(r["volume"], 0.0)[sel], 0.0).sum(axis=1)
        pv = np.where(vr, grid(r["pv"], 0.0)[sel], 0.0).sum(axis=1)
        pxsum = np.where(vr, grid(r["pxsum"], 0.0)[sel], 0.0).sum(axis=1)
        ticks = np.where(vr, grid(r["ticks"], 0, np.int64)[sel], 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vwap = np.where(vol > 0, pv / vol, pxsum / ticks)
            conf_bp = conf_close / agg["close"] * 1e4
        vals = np.column_stack([
            agg["open"], agg["high"], agg["low"], agg["close"], vol, vwap,
            ticks.astype(np.float64), vr.sum(axis=1).astype(np.float64), conf_bp,
        ])
        minutes = mins[sel]

        # First emission or changed since the last emission?
        known = np.zeros(len(minutes), dtype=bool)
        pos_c = np.zeros(len(minutes), dtype=np.int64)
        if len(self._cons_min):
            pos_c = np.minimum(np.searchsorted(self._cons_min, minutes), len(self._cons_min) - 1)
            known = self._cons_min[pos_c] == minutes
        changed = np.zeros(len(minutes), dtype=bool)
        if known.any():
            before = self._cons_vals[pos_c[known]]
            now = vals[known]
            same = (before == now) | (np.isnan(before) & np.isnan(now))
            changed[known] = ~same.all(axis=1)
            self._cons_vals[pos_c[known]] = now
        new = ~known
        if new.any():
            all_min = np.concatenate([self._cons_min, minutes[new]])
            all_vals = np.concatenate([self._cons_vals, vals[new]])
            order = np.argsort(all_min, kind="stable")
            self._cons_min, self._cons_vals = all_min[order], all_vals[order]
        out = np.flatnonzero(new | changed)
        frame = bar_frame({
            "ts": minutes[out] * self.freq_ns, "open": vals[out, 0], "high": vals[out, 1],
            "low": vals[out, 2], "close": vals[out, 3], "volume": vals[out, 4], "vwap": vals[out, 5],
            "ticks": vals[out, 6].astype(np.int64), "providers": vals[out, 7].astype(np.int64),
            "confidence": vals[out, 8],
        }) if len(out) else empty_bar_frame()
        return frame, int(new.sum()), int(changed.sum()), ff
