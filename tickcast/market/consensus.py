"""Multi-provider consensus: outlier and frozen-feed screening, reliability, Pyth aggregation.

Screening (:class:`ConsensusBook`) is causal and vectorized over a batch in event-time order:

* each provider has a robust *level*, the median of its last ``level_window`` screened prices
  (flagged ticks included, so that a move the provider keeps confirming re-anchors its level);
* a tick is compared with the levels, as of just before it, of every fresh provider (its own
  included; others only while their reliability is at least ``min_reliability``). With
  ``majority_min`` or more levels their median decides; with one or two levels the tick must
  disagree with each of them, so that one provider cannot outvote another and a provider alone
  is checked against its own past; a tick with no fresh level to compare with (the first
  tick of a lone provider, or after a long silence of every provider) is accepted;
* a provider's own level may confirm its own move (a lone provider re-anchors after a few
  consistent ticks) only when the move is plausible: the level lies within
  ``max(reanchor_max_bp, reanchor_vol_k x sigma_1m)`` of the price of the provider's last
  accepted tick (its *anchor*), ``sigma_1m`` being its recent volatility scaled to a minute
  (EWMA over accepted ticks of ``r^2 / dt``). A larger move is judged against the anchor until
  it has persisted ``reanchor_persist_s`` or another provider's level confirms it. So a lone
  venue's 2 % crash minute is followed (inside the band, or plausible), while a whole minute
  printed at x10 stays an outlier and the real prices after it are accepted. With
  ``majority_min`` or more fresh levels their median decides as before;
* the band is ``band_bp`` plus ``dispersion_k`` times an EWMA of the recent cross-provider
  dispersion (median absolute deviation of the providers' levels, clipped at ``band_bp``, so
  that neither single prints nor one deviant provider widen it), in basis points. A 2 % move
  in a minute is well inside it; a x5 or x0.2 print is far outside;
* a frozen feed is a stale quote repeated while the market moves. A provider's *run* is a
  stretch of its ticks at exactly the same price. Only its in-order, non-outlier accepted
  ticks make, extend or end runs: a late or out-of-order tick (event time older than one
  already received from it) or a bad print says nothing about the feed's present. A tick is
  ``FROZEN`` when its run has lasted more than ``frozen_after_s``, a fresh other provider's
  price moved since the run began, and at some tick of the run the median level of the other
  fresh providers was more than ``floor + frozen_dispersion_k x dispersion`` bp away from the
  unchanged price. The floor is ``frozen_move_bp`` for a repeated price (venues do trade at
  one price for minutes while the market wanders a few bp around it) and the smaller
  ``frozen_quote_move_bp`` where a tick repeats its whole two-sided quote, bid and ask
  included (a live book moves its touch with the market; a stale feed repeats everything).
  The evidence stays until the price changes: a stale feed does not come alive because the
  market comes back to its price;
* each provider's reliability is an EWMA (step ``reliability_alpha``) of "this quote was good":
  accepted ticks are good, outliers, frozen ticks and reason-coded rejections are bad.

:func:`pyth_aggregate` is the aggregation of the Pyth network: every provider votes three times
(``p - c``, ``p``, ``p + c`` with ``c`` its confidence, e.g. half the bid/ask spread); the
aggregate is the median of the votes and its confidence ``max(R - q25, q75 - R)``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter

from tickcast.config import ConsensusConfig, OutlierConfig
from tickcast.errors import TickStatus
from tickcast.ticks import NS_PER_S, TickBatch

__all__ = ["ConsensusBook", "pyth_aggregate", "aggregate_votes", "NEVER"]

NEVER = np.iinfo(np.int64).min // 4  # "no such time": far in the past, safe to subtract from
_BP = 1e4
# Statuses that say nothing about a provider's quality: re-deliveries, lateness, wrong asset.
_NEUTRAL = (TickStatus.DUPLICATE, TickStatus.LATE, TickStatus.UNKNOWN_ASSET)


def aggregate_votes(votes: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Median and Pyth confidence of each row of ``votes`` (NaN = no vote), optionally weighted.

    As in Pyth's price model, with ``k`` votes sorted ``s``: the aggregate is the median (the
    mean of the two middle votes when ``k`` is even), ``q25 = s[k // 4]``,
    ``q75 = s[k - k // 4 - 1]`` and the confidence ``max(R - q25, q75 - R)``; so one provider
    with confidence ``c`` gives back its price and ``c``. Order statistics are monotone in every
    vote. Rows without any vote give NaN.

    With ``weights`` (same shape; a weight <= 0 or NaN removes the vote), a vote ``s_i`` owns
    the slice ``(C_{i-1}, C_i]`` of the total weight ``W`` (``C`` cumulative in sorted order).
    The median is the mean of the votes over the central band of width ``W / k`` (one vote's
    share at equal weights), each vote counted by how much of its slice lies in the band:
    the weighted quantile function averaged over ``[1/2 - 1/(2k), 1/2 + 1/(2k)]``. ``q25`` is
    the first vote with ``C_i > W / 4`` and ``q75`` the last with ``C_i - w_i < 3 W / 4``.
    With equal weights these are exactly the unweighted statistics (such rows take the
    unweighted path, bit for bit). The weighted median is non-decreasing and continuous in every
    vote (an average of weighted quantiles, each monotone), so high >= open, close >= low still
    holds for bars, and continuous in the weights: a slightly less reliable provider moves it
    slightly, it never snaps to another vote.

    Parameters
    ----------
    votes
        ``(rows, votes)`` array.
    weights
        Optional ``(rows, votes)`` array of non-negative weights.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Aggregate and confidence per row.

    Examples
    --------
    >>> med, conf = aggregate_votes(np.array([[100.0, 101.0, 102.0, 103.0]]),
    ...                             np.array([[1.0, 1.0, 1.0, 1.0]]))
    >>> float(med[0]), float(conf[0])
    (101.5, 0.5)
    >>> med, conf = aggregate_votes(np.array([[100.0, 101.0, 102.0, 103.0]]),
    ...                             np.array([[1.0, 1.0, 1.0, 0.5]]))
    >>> round(float(med[0]), 4), round(float(conf[0]), 4)
    (101.2143, 1.2143)
    """
    v = np.asarray(votes, dtype=np.float64)
    if weights is None:
        return _aggregate_equal(v)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != v.shape:
        raise ValueError(f"weights have shape {w.shape}, votes {v.shape}")
    valid = ~np.isnan(v) & (w > 0)  # NaN weights compare False: removed
    v = np.where(valid, v, np.nan)
    med, conf = _aggregate_equal(v)
    wv = np.where(valid, w, 0.0)
    top = wv.max(axis=1) if wv.shape[1] else np.zeros(len(wv))
    unequal = (valid & (wv != top[:, None])).any(axis=1)
    rows = np.flatnonzero(unequal)
    if len(rows):
        med[rows], conf[rows] = _aggregate_weighted(v[rows], wv[rows] / top[rows, None])
    return med, conf


def _aggregate_equal(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unweighted :func:`aggregate_votes`."""
    v = np.sort(v, axis=1)  # NaN sorts last
    m, width = v.shape
    k = width - np.isnan(v).sum(axis=1)
    rows = np.arange(m)
    last = np.maximum(k - 1, 0)
    # Median: mean of the two middle order statistics (the same one when k is odd).
    med = 0.5 * (v[rows, last // 2] + v[rows, np.minimum(k // 2, last)])
    q25 = v[rows, k // 4]
    q75 = v[rows, np.maximum(k - k // 4 - 1, 0)]
    conf = np.maximum(med - q25, q75 - med)
    none = k == 0
    med[none] = np.nan
    conf[none] = np.nan
    return med, conf


def _aggregate_weighted(v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted median and confidence of rows with at least one vote (``w`` 0 where none)."""
    order = np.argsort(v, axis=1, kind="stable")  # NaN (no vote, weight 0) last
    s = np.take_along_axis(v, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    valid = ws > 0
    c = np.cumsum(ws, axis=1)
    total = c[:, -1:]
    k = valid.sum(axis=1, keepdims=True)
    half_band = total / (2.0 * k)
    lo, hi = 0.5 * total - half_band, 0.5 * total + half_band
    overlap = np.clip(np.minimum(c, hi) - np.maximum(c - ws, lo), 0.0, None)
    overlap[~valid] = 0.0
    rows = np.arange(len(v))
    # Offsets from the first vote in the band, so that a band inside one value (or several
    # equal votes) gives that value exactly.
    first = s[rows, np.argmax(overlap > 0, axis=1)]
    dev = np.where(valid, s - first[:, None], 0.0)
    med = first + (dev * overlap).sum(axis=1) / overlap.sum(axis=1)
    q25 = s[rows, (valid & (c <= 0.25 * total)).sum(axis=1)]
    q75 = s[rows, (valid & (c - ws < 0.75 * total)).sum(axis=1) - 1]
    return med, np.maximum(med - q25, q75 - med)


def pyth_aggregate(prices: np.ndarray | list[float], confs: np.ndarray | list[float],
                   weights: np.ndarray | list[float] | None = None) -> tuple:
    """Pyth-style aggregate of provider prices with confidences.

    Parameters
    ----------
    prices
        Provider prices along the last axis (1-D for one aggregate, 2-D for one per row);
        NaN = provider does not vote.
    confs
        Confidence per price (e.g. half the bid/ask spread); NaN is read as 0.
    weights
        Optional weight per price (e.g. the provider's reliability): each of its three votes
        carries it (see :func:`aggregate_votes`). ``None``: equal weights.

    Returns
    -------
    (price, confidence)
        Floats for 1-D input, arrays for 2-D input; NaN when nobody votes.

    Examples
    --------
    >>> pyth_aggregate([100.0, 101.0, 105.0], [0.5, 0.5, 1.0])
    (101.0, 3.0)
    >>> pyth_aggregate([64000.0], [0.0])
    (64000.0, 0.0)
    """
    p = np.asarray(prices, dtype=np.float64)
    c = np.nan_to_num(np.broadcast_to(np.asarray(confs, dtype=np.float64), p.shape), nan=0.0)
    one = p.ndim == 1
    p2, c2 = np.atleast_2d(p), np.atleast_2d(c)
    w3 = None
    if weights is not None:
        w2 = np.atleast_2d(np.broadcast_to(np.asarray(weights, dtype=np.float64), p.shape))
        w3 = np.concatenate([w2, w2, w2], axis=1)
    agg, conf = aggregate_votes(np.concatenate([p2 - c2, p2, p2 + c2], axis=1), w3)
    if one:
        return float(agg[0]), float(conf[0])
    return agg, conf


def _row_median(a: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (NaN for an all-NaN row)."""
    m, w = a.shape
    if m == 0:
        return np.empty(0)
    nan = np.isnan(a)
    if not nan.any():
        if w % 2:
            return np.partition(a, w // 2, axis=1)[:, w // 2]
        part = np.partition(a, (w // 2 - 1, w // 2), axis=1)
        return 0.5 * (part[:, w // 2 - 1] + part[:, w // 2])
    s = np.sort(a, axis=1)
    k = w - nan.sum(axis=1)
    rows = np.arange(m)
    last = np.maximum(k - 1, 0)
    med = 0.5 * (s[rows, last // 2] + s[rows, np.minimum(k // 2, last)])
    med[k == 0] = np.nan
    return med


def _shift(a: np.ndarray, first: float) -> np.ndarray:
    """``a`` shifted one place later, ``first`` in front: the previous value of each element."""
    out = np.empty(len(a))
    if len(a):
        out[0] = first
        out[1:] = a[:-1]
    return out


def _prev_index(mask: np.ndarray) -> np.ndarray:
    """For each position, the last position strictly before it where ``mask`` holds (-1: none)."""
    n = len(mask)
    last = np.maximum.accumulate(np.where(mask, np.arange(n), -1))
    prev = np.empty(n, dtype=np.int64)
    if n:
        prev[0] = -1
        prev[1:] = last[:-1]
    return prev


class ConsensusBook:
    """Per-asset provider state: robust levels, dispersion, frozen runs, reliability.

    Parameters
    ----------
    outliers
        Outlier band settings (``outliers`` config section).
    consensus
        Staleness, frozen-feed and reliability settings (``consensus`` config section).

    Examples
    --------
    >>> from tickcast.config import ConsensusConfig, OutlierConfig
    >>> rng = np.random.default_rng(7)
    >>> t0 = 1_700_000_000 * 10**9
    >>> names = np.tile(["a", "b", "c"], 40)
    >>> price = 100.0 * (1 + 1e-4 * rng.standard_normal(120))
    >>> price[61] *= 5.0  # one provider prints x5
    >>> b = TickBatch.from_columns("BTC-USD", names, ts_event=t0 + np.arange(120) * 10**9,
    ...                            price=price)
    >>> book = ConsensusBook(OutlierConfig(), ConsensusConfig())
    >>> book.update(b)
    >>> np.flatnonzero(b.status == TickStatus.OUTLIER).tolist(), b.provider_names()[61]
    ([61], 'b')
    >>> {k: round(v, 3) for k, v in book.reliability.items()}
    {'a': 1.0, 'b': 0.986, 'c': 1.0}
    """

    def __init__(self, outliers: OutlierConfig, consensus: ConsensusConfig) -> None:
        self.outliers = outliers
        self.consensus = consensus
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        w = outliers.level_window
        self._hist = np.full((0, w), np.nan)  # last `w` screened prices per provider, oldest first
        self._level = np.empty(0)
        self._last_ts = np.empty(0, dtype=np.int64)
        # Frozen-feed state, kept from in-order, non-outlier accepted ticks only (see _frozen).
        self._last_quote = np.full((0, 3), np.nan)  # price, bid, ask of the last such tick
        self._run_start = np.empty(0, dtype=np.int64)  # when the current unchanged-price run began
        self._last_change = np.empty(0, dtype=np.int64)  # last time the price moved (first tick: no)
        self._diverged = np.empty(0, dtype=bool)  # the market has left the current run's price
        self._rel = np.empty(0)
        # Re-anchor plausibility (see _reanchor): price and time of the last accepted tick,
        # volatility (variance per second, EWMA), start of an implausible stretch (NEVER: none).
        self._anchor = np.empty(0)
        self._anchor_ts = np.empty(0, dtype=np.int64)
        self._var = np.empty(0)
        self._away = np.empty(0, dtype=np.int64)
        self._outlier_total = np.empty(0, dtype=np.int64)
        self._frozen_total = np.empty(0, dtype=np.int64)
        self._disp = 0.0  # EWMA of cross-provider dispersion, bp
        self.last_tick_reliability = np.empty(0)

    def __setstate__(self, state: dict[str, object]) -> None:
        """Restore a pickled book; one pickled before runs kept bid/ask and divergence (it
        had ``_last_price``) gets its last prices as bare quotes and no divergence yet, and one
        pickled before the re-anchor rule starts without anchors (its next accepted tick
        sets them)."""
        if "_last_quote" not in state:
            last = np.asarray(state.pop("_last_price"), dtype=np.float64)
            quote = np.full((len(last), 3), np.nan)
            quote[:, 0] = last
            state["_last_quote"] = quote
            state["_diverged"] = np.zeros(len(last), dtype=bool)
        if "_anchor" not in state:  # pickled before the re-anchor plausibility rule
            k = len(np.asarray(state["_rel"]))
            state["_anchor"] = np.full(k, np.nan)
            state["_anchor_ts"] = np.full(k, NEVER, dtype=np.int64)
            state["_var"] = np.zeros(k)
            state["_away"] = np.full(k, NEVER, dtype=np.int64)
        self.__dict__.update(state)

    # ------------------------------------------------------------------ registry
    def _lut(self, providers: tuple[str, ...]) -> np.ndarray:
        """Global provider id for each name of a batch vocabulary (registering new names)."""
        new = [p for p in providers if p not in self._index]
        if new:
            for name in new:
                self._index[name] = len(self._names)
                self._names.append(name)
            k = len(new)
            self._hist = np.vstack([self._hist, np.full((k, self.outliers.level_window), np.nan)])
            self._level = np.concatenate([self._level, np.full(k, np.nan)])
            self._last_ts = np.concatenate([self._last_ts, np.full(k, NEVER, dtype=np.int64)])
            self._last_quote = np.vstack([self._last_quote, np.full((k, 3), np.nan)])
            self._run_start = np.concatenate([self._run_start, np.full(k, NEVER, dtype=np.int64)])
            self._last_change = np.concatenate([self._last_change, np.full(k, NEVER, dtype=np.int64)])
            self._diverged = np.concatenate([self._diverged, np.zeros(k, dtype=bool)])
            self._rel = np.concatenate([self._rel, np.ones(k)])
            self._anchor = np.concatenate([self._anchor, np.full(k, np.nan)])
            self._anchor_ts = np.concatenate([self._anchor_ts, np.full(k, NEVER, dtype=np.int64)])
            self._var = np.concatenate([self._var, np.zeros(k)])
            self._away = np.concatenate([self._away, np.full(k, NEVER, dtype=np.int64)])
            self._outlier_total = np.concatenate([self._outlier_total, np.zeros(k, dtype=np.int64)])
            self._frozen_total = np.concatenate([self._frozen_total, np.zeros(k, dtype=np.int64)])
        return np.array([self._index[p] for p in providers], dtype=np.int64)

    # ------------------------------------------------------------------ views
    @property
    def providers(self) -> tuple[str, ...]:
        """Providers seen so far, in order of first appearance."""
        return tuple(self._names)

    @property
    def reliability(self) -> dict[str, float]:
        """Reliability score per provider, in [0, 1] (1 until proven otherwise)."""
        return {n: float(r) for n, r in zip(self._names, self._rel)}

    @property
    def levels(self) -> dict[str, float]:
        """Current robust price level per provider (NaN before its first tick)."""
        return {n: float(v) for n, v in zip(self._names, self._level)}

    @property
    def dispersion_bp(self) -> float:
        """Recent cross-provider dispersion (EWMA, basis points)."""
        return float(self._disp)

    @property
    def outlier_counts(self) -> dict[str, int]:
        """Ticks flagged ``OUTLIER`` since creation, per provider."""
        return {n: int(c) for n, c in zip(self._names, self._outlier_total)}

    @property
    def frozen_counts(self) -> dict[str, int]:
        """Ticks flagged ``FROZEN`` since creation, per provider."""
        return {n: int(c) for n, c in zip(self._names, self._frozen_total)}

    def excluded(self) -> tuple[str, ...]:
        """Providers currently below ``min_reliability`` (left out of the consensus)."""
        low = self._rel < self.consensus.min_reliability
        return tuple(n for n, x in zip(self._names, low) if x)

    # ------------------------------------------------------------------ update
    def update(self, batch: TickBatch) -> None:
        """Screen the batch's ``OK`` ticks (mark ``OUTLIER`` / ``FROZEN``) and update reliability.

        Ticks are screened in event-time order (sorted here only when needed); the batch's row
        order is taken as the arrival order, which tells in-order ticks from late ones.
        Afterwards :attr:`last_tick_reliability` holds, for each tick of the batch, its
        provider's reliability right after that tick (NaN for ticks that do not count).
        """
        n = len(batch)
        self.last_tick_reliability = np.full(n, np.nan)
        if n == 0:
            return
        lut = self._lut(batch.providers)
        valid = (batch.provider >= 0) & (batch.provider < len(batch.providers))
        gp = np.full(n, -1, dtype=np.int64)
        gp[valid] = lut[batch.provider[valid]]
        status = batch.status
        cand = np.flatnonzero((status == TickStatus.OK) & valid)
        if len(cand):
            ts = batch.ts_event[cand]
            in_order = self._in_order(gp[cand], ts)
            if len(ts) > 1 and not np.all(ts[1:] >= ts[:-1]):
                order = np.argsort(ts, kind="stable")
                cand, ts, in_order = cand[order], ts[order], in_order[order]
            status[cand] = self._screen(gp[cand], ts, batch.price[cand], batch.bid[cand],
                                        batch.ask[cand], in_order)
        self._update_reliability(gp, status, valid)

    def _in_order(self, pid: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Whether each tick (in arrival order) is at least as recent as every earlier arrival
        of its provider: a late or out-of-order tick says nothing about the feed's present."""
        ok = np.ones(len(pid), dtype=bool)
        for p in np.flatnonzero(np.bincount(pid, minlength=len(self._names))).tolist():
            sel = np.flatnonzero(pid == p)
            t = ts[sel]
            seen = np.empty(len(t), dtype=np.int64)
            seen[0] = self._last_ts[p]
            seen[1:] = t[:-1]
            ok[sel] = t >= np.maximum.accumulate(seen)
        return ok

    def _screen(self, pid: np.ndarray, ts: np.ndarray, px: np.ndarray, bid: np.ndarray,
                ask: np.ndarray, in_order: np.ndarray) -> np.ndarray:
        """Status (OK / OUTLIER / FROZEN) of candidate ticks sorted by event time."""
        cfg, ccfg = self.outliers, self.consensus
        n, n_prov, w = len(pid), len(self._names), cfg.level_window
        level0, ts0 = self._level.copy(), self._last_ts.copy()

        level_after = np.empty(n)
        present = np.flatnonzero(np.bincount(pid, minlength=n_prov))
        masks: dict[int, np.ndarray] = {}
        for p in present.tolist():
            is_p = pid == p
            masks[p] = is_p
            sel = np.flatnonzero(is_p)
            ext = np.concatenate([self._hist[p], px[sel]])
            med = _row_median(sliding_window_view(ext, w))  # level before, then after, each tick
            level_after[sel] = med[1:]
            self._hist[p] = ext[len(ext) - w:]
            self._level[p] = med[-1]
            self._last_ts[p] = max(int(ts0[p]), int(ts[sel].max()))

        # Every provider's level / last tick time as of just before each tick.
        lv = np.empty((n, n_prov))
        last_t = np.empty((n, n_prov), dtype=np.int64)
        for q in range(n_prov):
            if q in masks:
                prev = _prev_index(masks[q])
                has = prev >= 0
                pi = np.maximum(prev, 0)
                lv[:, q] = np.where(has, level_after[pi], level0[q])
                last_t[:, q] = np.where(has, ts[pi], ts0[q])
            else:
                lv[:, q], last_t[:, q] = level0[q], ts0[q]

        own = pid[:, None] == np.arange(n_prov)[None, :]
        fresh = (last_t > NEVER) & (ts[:, None] - last_t <= int(ccfg.stale_after_s * NS_PER_S))
        trusted = (self._rel >= ccfg.min_reliability)[None, :] | own
        use = fresh & trusted & ~np.isnan(lv)
        lvm = np.where(use, lv, np.nan)
        k = use.sum(axis=1)
        ref = _row_median(lvm)
        with np.errstate(invalid="ignore", divide="ignore"):
            dev_ref = np.abs(px - ref) / ref * _BP
            dev_each = np.where(use, np.abs(px[:, None] - lvm) / lvm * _BP, np.inf)
        dev_min = dev_each.min(axis=1) if n_prov else np.full(n, np.inf)
        dev = np.where(k >= cfg.majority_min, dev_ref, dev_min)

        # Cross-provider dispersion: median absolute deviation of the levels in use (so one
        # deviant provider among three or more does not widen the band it is judged by),
        # clipped at band_bp; EWMA over ticks, value just before each tick.
        alpha = 1.0 - 0.5 ** (1.0 / cfg.dispersion_halflife_ticks)
        sample = k >= 2
        disp_before = np.full(n, self._disp)
        if sample.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                spread = np.abs(lvm[sample] - ref[sample, None]) / ref[sample, None] * _BP
            s = np.minimum(_row_median(spread), cfg.band_bp)
            y = lfilter([alpha], [1.0, alpha - 1.0], s, zi=[(1.0 - alpha) * self._disp])[0]
            after = np.empty(n)
            after[sample] = y
            prev = _prev_index(sample)
            disp_before = np.where(prev >= 0, after[np.maximum(prev, 0)], self._disp)
            self._disp = float(y[-1])
        band = cfg.band_bp + cfg.dispersion_k * disp_before
        outlier = (k >= 1) & (dev > band)
        if n_prov:
            outlier = self._reanchor(pid, ts, px, lv, use, own, dev_each, k, band, outlier, masks)

        frozen = self._frozen(pid, ts, px, bid, ask, in_order & ~outlier, masks, own, fresh,
                              lvm, disp_before)

        if n_prov:
            self._outlier_total += np.bincount(pid[outlier], minlength=n_prov)
            self._frozen_total += np.bincount(pid[frozen], minlength=n_prov)
        out = np.zeros(n, dtype=np.uint8)
        out[outlier] = TickStatus.OUTLIER
        out[frozen] = TickStatus.FROZEN
        return out

    def _reanchor(self, pid: np.ndarray, ts: np.ndarray, px: np.ndarray, lv: np.ndarray,
                  use: np.ndarray, own: np.ndarray, dev_each: np.ndarray, k: np.ndarray,
                  band: np.ndarray, outlier: np.ndarray, masks: dict[int, np.ndarray]) -> np.ndarray:
        """Outlier mask after the plausibility rule of self-confirmation; updates the anchors.

        Where fewer than ``majority_min`` fresh levels judge a tick (the *lone* regime), its
        own level (median of its last prices, flagged ones included) is a reference only when
        it is *plausible*: within ``max(reanchor_max_bp, reanchor_vol_k x sigma_1m)`` bp of the
        provider's anchor (price of its last accepted tick), or when it has stayed implausible
        for ``reanchor_persist_s`` (persistence: a venue that really re-priced keeps its new
        level). Otherwise the anchor stands in for the level. Other providers' levels keep
        confirming a move as before. ``sigma_1m`` is ``sqrt(60 s x v)``, ``v`` an EWMA over
        the provider's accepted lone-regime ticks of ``r^2 / max(dt, reanchor_vol_min_dt_s)``
        (``r`` the log change from its anchor); where a majority judges, neither the rule nor
        ``v`` is needed.

        Fast path: anchors and volatility are computed vectorized from the statuses of the
        band test; when no level of a lone-regime tick is implausible under them (and no
        implausible stretch is running), the rule changes nothing and those statuses stand.
        Otherwise the provider's ticks from the first implausible one are judged one by one.
        """
        cfg = self.outliers
        alpha = 1.0 - 0.5 ** (1.0 / cfg.reanchor_vol_halflife_ticks)
        min_dt = cfg.reanchor_vol_min_dt_s * NS_PER_S
        persist = round(cfg.reanchor_persist_s * NS_PER_S)
        lone = k < cfg.majority_min
        judged = k >= 1
        any_lone = bool(lone.any())
        if any_lone:
            rows = np.arange(len(pid))
            own_lv, own_use = lv[rows, pid], use[rows, pid]
            dev_others = np.where(own, np.inf, dev_each).min(axis=1)
        for p, is_p in masks.items():
            idx = np.flatnonzero(is_p)
            acc = ~outlier[idx]
            if not any_lone or not lone[idx].any():
                # A majority judged every tick: only the anchor moves (no stretch runs on).
                if acc.any():
                    last = int(idx[np.flatnonzero(acc)[-1]])
                    self._anchor[p], self._anchor_ts[p] = px[last], ts[last]
                self._away[p] = NEVER
                continue
            x, t, lvl = px[idx], ts[idx], own_lv[idx]
            prev = _prev_index(acc)
            has = prev >= 0
            pi = np.maximum(prev, 0)
            anc = np.where(has, x[pi], self._anchor[p])
            anc_ts = np.where(has, t[pi], self._anchor_ts[p])
            samp = acc & np.isfinite(anc) & lone[idx]
            var_before = np.full(len(idx), self._var[p])
            var_end = float(self._var[p])
            if samp.any():
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = np.log(x[samp] / anc[samp])
                dt = np.maximum((t[samp] - anc_ts[samp]).astype(np.float64), min_dt) / NS_PER_S
                y = lfilter([alpha], [1.0, alpha - 1.0], r * r / dt, zi=[(1.0 - alpha) * var_end])[0]
                after = np.empty(len(idx))
                after[samp] = y
                ps = _prev_index(samp)
                var_before = np.where(ps >= 0, after[np.maximum(ps, 0)], var_end)
                var_end = float(y[-1])
            cap = np.maximum(cfg.reanchor_max_bp, cfg.reanchor_vol_k * np.sqrt(60.0 * var_before) * _BP)
            with np.errstate(invalid="ignore", divide="ignore"):
                far = np.abs(np.log(lvl / anc)) * _BP > cap  # NaN (no anchor, no level): False
            far &= lone[idx]
            if self._away[p] == NEVER and not far.any():
                if acc.any():
                    last = int(np.flatnonzero(acc)[-1])
                    self._anchor[p], self._anchor_ts[p] = x[last], t[last]
                self._var[p] = var_end
                continue
            j0 = 0 if self._away[p] != NEVER else int(np.argmax(far))
            anchor = float(anc[j0]) if j0 else float(self._anchor[p])
            anchor_ts = int(anc_ts[j0]) if j0 else int(self._anchor_ts[p])
            var = float(var_before[j0]) if j0 else float(self._var[p])
            away = int(self._away[p]) if j0 == 0 else int(NEVER)
            for j in range(j0, len(idx)):
                i = int(idx[j])
                xi, ti, li = float(x[j]), int(t[j]), float(lvl[j])
                if lone[i]:
                    cap_j = max(cfg.reanchor_max_bp, cfg.reanchor_vol_k * math.sqrt(60.0 * var) * _BP)
                    far_j = (math.isfinite(anchor) and math.isfinite(li)
                             and abs(math.log(li / anchor)) * _BP > cap_j)
                    if not far_j:
                        away = int(NEVER)
                    elif away == NEVER:
                        away = ti
                    if own_use[i]:
                        own_ok = not far_j or ti - away >= persist
                        ref = li if own_ok else anchor
                        d_own = abs(xi - ref) / ref * _BP
                    else:
                        d_own = math.inf
                    outlier[i] = bool(judged[i]) and min(d_own, float(dev_others[i])) > band[i]
                else:
                    away = int(NEVER)  # others judge by their median: no stretch of its own
                if not outlier[i]:
                    if math.isfinite(anchor) and lone[i]:
                        dt = max(float(ti - anchor_ts), min_dt) / NS_PER_S
                        var += alpha * (math.log(xi / anchor) ** 2 / dt - var)
                    anchor, anchor_ts = xi, ti
            self._anchor[p], self._anchor_ts[p], self._var[p], self._away[p] = anchor, anchor_ts, var, away
        return outlier

    def _frozen(self, pid: np.ndarray, ts: np.ndarray, px: np.ndarray, bid: np.ndarray,
                ask: np.ndarray, elig: np.ndarray, masks: dict[int, np.ndarray],
                own: np.ndarray, fresh: np.ndarray, lvm: np.ndarray,
                disp_before: np.ndarray) -> np.ndarray:
        """Frozen-feed mask of the candidate ticks (sorted by event time); updates run state.

        Only ``elig`` ticks (in order, not outliers) make, extend or end a provider's runs: a
        late tick or a bad print of a stale feed is no sign of life, and is never ``FROZEN``
        itself. A run is a stretch of ticks with the same price; a tick is frozen when its run
        has lasted more than ``frozen_after_s``, a fresh other provider's price moved since the
        run began, and at some tick of the run after its first the median level of the other
        fresh providers was more than ``floor + frozen_dispersion_k x dispersion`` bp away from
        the unchanged price (floor: ``frozen_quote_move_bp`` at a tick that repeats the previous
        two-sided quote, bid and ask included, exactly; ``frozen_move_bp`` otherwise).
        """
        ccfg = self.consensus
        n, n_prov = len(pid), len(self._names)
        change0 = self._last_change.copy()
        run_start = np.full(n, NEVER, dtype=np.int64)
        last_change = np.full(n, NEVER, dtype=np.int64)
        changed = np.ones(n, dtype=bool)
        repeat = np.zeros(n, dtype=bool)  # the tick repeats its previous two-sided quote exactly
        runs: list[tuple[int, np.ndarray, np.ndarray, bool]] = []
        for p, is_p in masks.items():
            idx = np.flatnonzero(is_p & elig)
            if not len(idx):
                continue
            x, t = px[idx], ts[idx]
            prev = _shift(x, self._last_quote[p, 0])
            ch = x != prev  # the first tick ever compares with NaN: a change
            same = ~ch
            if same.any():  # NaN bid/ask never repeat
                b, a = bid[idx], ask[idx]
                repeat[idx] = (same & (b == _shift(b, self._last_quote[p, 1]))
                               & (a == _shift(a, self._last_quote[p, 2])))
            pos = np.arange(len(idx))
            start = np.maximum.accumulate(np.where(ch, pos, -1))
            run_start[idx] = np.where(start >= 0, t[np.maximum(start, 0)], self._run_start[p])
            # A move is a change from a known price (a provider's first tick is not a move).
            if np.isnan(prev[0]):
                ch[0] = False
            moved = np.maximum.accumulate(np.where(ch, pos, -1))
            last_change[idx] = np.where(moved >= 0, t[np.maximum(moved, 0)], self._last_change[p])
            changed[idx] = ~same
            self._last_quote[p] = (x[-1], bid[idx[-1]], ask[idx[-1]])
            self._run_start[p] = run_start[idx[-1]]
            self._last_change[p] = last_change[idx[-1]]
            runs.append((p, idx, start, bool(self._diverged[p])))

        # Divergence, measured at the ticks that repeat their provider's price (elsewhere a
        # run has just begun at a price of the provider's own): the other fresh providers'
        # median level against the unchanged price, beyond their usual disagreement. A venue
        # can print trades at one price for minutes while the market wanders a few bp around
        # it, so a repeated price needs frozen_move_bp; a live book moves its touch with the
        # market, so a tick repeating a whole two-sided quote needs only frozen_quote_move_bp.
        cont = elig & ~changed
        hit = np.zeros(n, dtype=bool)
        if cont.any():
            ref_other = _row_median(np.where(own[cont], np.nan, lvm[cont]))
            floor = np.where(repeat[cont], ccfg.frozen_quote_move_bp, ccfg.frozen_move_bp)
            with np.errstate(invalid="ignore"):
                move = np.abs(ref_other - px[cont]) / px[cont] * _BP
                hit[cont] = move > floor + ccfg.frozen_dispersion_k * disp_before[cont]
        diverged = np.zeros(n, dtype=bool)
        for p, idx, start, carried in runs:
            last_hit = np.maximum.accumulate(np.where(hit[idx], np.arange(len(idx)), -1))
            # A hit in the current run (after its start), or a run carried over that had one.
            diverged[idx] = (last_hit > start) | ((start < 0) & carried)
            self._diverged[p] = bool(diverged[idx[-1]])

        after = int(ccfg.frozen_after_s * NS_PER_S)
        rows = np.flatnonzero(cont & diverged & (ts - run_start > after))
        frozen = np.zeros(n, dtype=bool)
        if len(rows):
            # Some fresh other provider's price moved since the run began.
            latest = np.full(len(rows), NEVER, dtype=np.int64)
            for q in range(n_prov):
                before = _prev_index(masks[q] & elig)[rows] if q in masks else np.full(len(rows), -1)
                lc = np.where(before >= 0, last_change[np.maximum(before, 0)], change0[q])
                use = fresh[rows, q] & (pid[rows] != q)
                latest = np.maximum(latest, np.where(use, lc, NEVER))
            frozen[rows] = latest > run_start[rows]
        return frozen

    def _update_reliability(self, gp: np.ndarray, status: np.ndarray, valid: np.ndarray) -> None:
        """EWMA of good quotes per provider in arrival order (vectorized with ``lfilter``)."""
        a = self.consensus.reliability_alpha
        counts = valid & ~np.isin(status, _NEUTRAL)
        good = (status == TickStatus.OK).astype(np.float64)
        rel_tick = self.last_tick_reliability
        present = np.flatnonzero(np.bincount(gp[counts], minlength=len(self._names)))
        for p in present.tolist():
            sel = np.flatnonzero(counts & (gp == p))
            y = lfilter([a], [1.0, a - 1.0], good[sel], zi=[(1.0 - a) * self._rel[p]])[0]
            rel_tick[sel] = y
            self._rel[p] = y[-1]
