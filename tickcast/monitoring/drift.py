"""Distribution, label, concept and performance drift of a live model against its reference.

Pieces (all pure numpy, cheap enough to feed every event):

* :class:`Reference` -- a training sample (features, or predictions on the validation set),
  sorted once per column, with its PSI bins and spread.
* :class:`WindowDrift` -- the last ``window`` live events per column, against a reference:
  Kolmogorov-Smirnov statistic, PSI, Wasserstein-1 distance scaled by the reference IQR, total
  variation distance (TVD) and KL divergence ``D_KL(P_ref || P_live)`` on the PSI bins.
* :class:`BaselineWindow` -- a :class:`WindowDrift` whose reference is given, or else made of
  the first live values (labels and residuals, which a model may not ship a sample of).
* :class:`PerformanceDrift` -- rolling pinball loss and MAE of realized forecasts, as ratios to
  the model's validation figures.
* :class:`DriftMonitor` -- all of the above plus a streaming change detector per stream
  (:mod:`tickcast.monitoring.detectors`), label drift (P(Y): realized returns) and concept
  drift (P(Y|X): standardized residuals, :mod:`tickcast.monitoring.concept`), combined into
  one score, an alert level, a retrain flag, a drift kind and transition events.

Cost per event
--------------
:class:`WindowDrift` keeps a ring buffer (arrival order), a *sorted* copy of the window per
column and the window's PSI bin counts. An event evicts the oldest value and inserts the new
one: per column two ``np.searchsorted`` calls on the sorted window and one in-place shift of
the values between the two positions (a memmove of at most ``window`` floats); the PSI bin
counts change by -1/+1. A batch of ``b`` events does the same with one ``np.delete`` /
``np.insert`` per column (O(window + b log b)). Nothing is re-sorted from scratch and nothing
loops over events in Python.

The statistics themselves need a merge of the sorted reference (``n`` values) with the sorted
window (``m`` values): one stable ``argsort`` of the concatenated rows (two pre-sorted runs, so
timsort merges them in O(n + m)) for every column at once, then cumulative counts give both
empirical CDFs at every point -- KS is their largest gap and Wasserstein-1 the area between
them, exactly as :func:`scipy.stats.ks_2samp` and :func:`scipy.stats.wasserstein_distance`
compute them. PSI, TVD and KL are read from the maintained bin counts in O(bins) (TVD between
two raw samples of a continuous variable is always 1, so binned is the meaningful form). The
monitor refreshes them every ``drift.eval_every`` accepted events -- a batch is cut where an
evaluation falls due, so a batch of 500 gets ten evaluations -- and at once when a change
detector alarms; the streaming detector covers the time between refreshes.

Overall score
-------------
Every statistic is mapped onto one scale, the scale of the KS statistic, by
:func:`to_score`: piecewise linear through (0, 0), (warning level, ``warning_score``) and
(critical level, ``critical_score``), extrapolated beyond. KS is used as is (its thresholds
define the scale); PSI maps ``psi_warning -> warning_score`` and ``psi_critical ->
critical_score``; W1/IQR maps ``w1_warning`` and ``w1_critical`` likewise (0.3 and 0.6 are
where a normal location shift of 0.4 and 0.8 sigma puts both W1/IQR and KS at 0.15 and 0.3);
TVD and KL likewise with the levels of those two shifts on ten equiprobable bins (TVD 0.158 /
0.309 -- it tracks KS --, KL 0.077 / 0.307); the worse of the two performance ratios maps
``1 -> 0``, ``performance_ratio_warning -> warning_score`` and ``performance_ratio_critical ->
critical_score``. Then

* column score = weighted mean (``weight_ks``, ``weight_psi``, ``weight_w1``, ``weight_tvd``,
  ``weight_kl``) of KS and the mapped PSI, W1/IQR, TVD and KL, each capped at 1 first (PSI and
  KL grow without bound);
* feature score = mean of the top ``ceil(feature_top_fraction * F)`` column scores (default
  fraction 1: the mean over all features -- one odd feature does not alone make the model
  stale, a broad shift does; it still shows in ``drifted_features``, KS > ``ks_threshold``);
* prediction score = max over prediction columns (every prediction column matters);
* performance score = mapped worst ratio, capped at 1 (once ``performance_min_labels`` labels
  exist);
* label score = column score of the realized labels against the model's reference labels
  (the ``label`` column of its reference frame) or, without them, the first
  ``live_reference_labels`` live labels;
* concept score = column score of the standardized residuals against the first
  ``live_reference_labels`` live ones;
* overall score = max over the components named in ``score_components`` (default: features,
  predictions, performance, concept) -- any one kind of drift suffices. Label drift is
  reported but does not count by default: a volatility regime moves P(Y) of returns, the
  volatility features already show it, and the intervals are recalibrated for it.

Level: CRITICAL when score >= ``critical_score``, WARNING when >= ``warning_score``, else
NORMAL; a change-detector alarm within the last ``alarm_hold_events`` events raises NORMAL to
WARNING (the window statistics lag a fresh change). Retrain flag: score > ``retrain_score``.
Drift kind (:class:`~tickcast.monitoring.concept.DriftKind`): which of the feature score and
the concept score reach ``warning_score``. A component whose window holds fewer than
``min_window`` events (or labels) is ``None`` and does not count.

Why KS keeps half the weight (1 against 0.25 for each of the four others): the binned and
tail-sensitive measures react more than KS to the autocorrelation of rolling features (a
window of 500 autocorrelated values holds far fewer independent ones, and squared measures
like PSI and KL grow with the inverse of that number, KS with its square root). On the real
BTC/USD consensus bars, replaying the reference's own three days, the share of evaluations at
WARNING or above rises from KS alone to the default weights, and more with equal weights; the
figures are in the README (``python -m bench.drift``, ``real_data``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from tickcast.config import DriftConfig
from tickcast.errors import InvalidInput
from tickcast.monitoring.concept import DriftKind, classify_drift, standardized_residuals
from tickcast.monitoring.detectors import Alarm, CusumDetector, PageHinkleyDetector, make_detector

LEVELS: tuple[str, ...] = ("NORMAL", "WARNING", "CRITICAL")

# Normal IQR in standard deviations: used only to explain the W1 scale (W1 / IQR of a
# 1-sigma location shift of a normal is 1 / 1.349 = 0.74).
_NORMAL_IQR_SD = 1.3489795003921634


# ----------------------------------------------------------------------------------------
# statistics on sorted samples
# ----------------------------------------------------------------------------------------
def two_sample_ks_w1(ref_sorted: np.ndarray, win_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KS statistic and Wasserstein-1 distance of each row pair of two sorted samples.

    Parameters
    ----------
    ref_sorted
        Shape ``(F, n)``, each row sorted ascending, finite.
    win_sorted
        Shape ``(F, m)``, each row sorted ascending, finite.

    Returns
    -------
    ks, w1
        Arrays of shape ``(F,)``; equal to ``scipy.stats.ks_2samp(r, w).statistic`` and
        ``scipy.stats.wasserstein_distance(r, w)`` row by row.

    Examples
    --------
    >>> r = np.array([[0.0, 1.0, 2.0, 3.0]])
    >>> w = np.array([[1.0, 2.0, 3.0, 4.0]])
    >>> ks, w1 = two_sample_ks_w1(r, w)
    >>> float(ks[0]), float(w1[0])
    (0.25, 1.0)
    """
    n = ref_sorted.shape[1]
    m = win_sorted.shape[1]
    vals = np.concatenate([ref_sorted, win_sorted], axis=1)
    # Two sorted runs per row: stable argsort (timsort) merges them in linear time.
    order = np.argsort(vals, axis=1, kind="stable")
    merged = np.take_along_axis(vals, order, axis=1)
    cnt_ref = np.cumsum(order < n, axis=1)
    cnt_win = np.arange(1, n + m + 1) - cnt_ref
    gap = cnt_ref / n - cnt_win / m
    np.abs(gap, out=gap)
    # Within a run of tied values only the last position carries the right-continuous CDFs.
    last = np.ones_like(merged, dtype=bool)
    last[:, :-1] = merged[:, 1:] != merged[:, :-1]
    ks = np.where(last, gap, 0.0).max(axis=1)
    w1 = np.sum(gap[:, :-1] * np.diff(merged, axis=1), axis=1)
    return ks, w1


def psi_from_counts(win_counts: np.ndarray, ref_fractions: np.ndarray, epsilon: float) -> np.ndarray:
    """Population stability index per row from window bin counts and reference fractions.

    ``PSI = sum((p_w - p_r) * ln(p_w / p_r))`` with both proportions floored at ``epsilon`` so an
    empty bin costs a large but finite amount.

    Examples
    --------
    >>> round(float(psi_from_counts(np.array([[50, 50]]), np.array([[0.5, 0.5]]), 1e-4)[0]), 6)
    0.0
    >>> round(float(psi_from_counts(np.array([[90, 10]]), np.array([[0.5, 0.5]]), 1e-4)[0]), 4)
    0.8789
    """
    total = win_counts.sum(axis=1, keepdims=True)
    pw = np.maximum(win_counts / np.maximum(total, 1), epsilon)
    pr = np.maximum(ref_fractions, epsilon)
    return np.sum((pw - pr) * np.log(pw / pr), axis=1)


def tvd_kl_from_counts(win_counts: np.ndarray, ref_counts: np.ndarray,
                       pseudocount: float) -> tuple[np.ndarray, np.ndarray]:
    """Total variation distance and KL divergence per row from two histograms on one binning.

    ``TVD = sum(|p_w - p_r|) / 2`` on the raw proportions, in [0, 1]. ``KL = D_KL(P_ref || P_live)
    = sum(p_r * ln(p_r / p_w))`` on proportions smoothed by adding ``pseudocount`` to every bin
    of both histograms, so a live bin left empty costs a large but finite amount.

    Parameters
    ----------
    win_counts, ref_counts
        Shape ``(F, bins)``: counts of the live window and of the reference.
    pseudocount
        Added to each bin before the KL proportions are taken (> 0).

    Examples
    --------
    >>> tvd, kl = tvd_kl_from_counts(np.array([[90, 10]]), np.array([[50, 50]]), 0.5)
    >>> round(float(tvd[0]), 4), round(float(kl[0]), 4)
    (0.4, 0.4936)
    >>> tvd, kl = tvd_kl_from_counts(np.array([[100, 0]]), np.array([[50, 50]]), 0.5)
    >>> round(float(tvd[0]), 4), round(float(kl[0]), 4)
    (0.5, 1.9635)
    """
    w = np.asarray(win_counts, dtype=np.float64)
    r = np.asarray(ref_counts, dtype=np.float64)
    bins = w.shape[1]
    pw = w / np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    pr = r / np.maximum(r.sum(axis=1, keepdims=True), 1.0)
    tvd = 0.5 * np.abs(pw - pr).sum(axis=1)
    sw = (w + pseudocount) / (w.sum(axis=1, keepdims=True) + pseudocount * bins)
    sr = (r + pseudocount) / (r.sum(axis=1, keepdims=True) + pseudocount * bins)
    kl = np.sum(sr * np.log(sr / sw), axis=1)
    return tvd, kl


def to_score(value: ArrayLike, warning_level: float, critical_level: float,
             warning_score: float, critical_score: float, origin: float = 0.0) -> np.ndarray:
    """Map a statistic onto the drift-score scale (piecewise linear, extrapolated, >= 0).

    Passes through ``(origin, 0)``, ``(warning_level, warning_score)`` and
    ``(critical_level, critical_score)``.

    Examples
    --------
    >>> [round(float(v), 3) for v in to_score([0.05, 0.1, 0.25, 0.4], 0.1, 0.25, 0.15, 0.3)]
    [0.075, 0.15, 0.3, 0.45]
    >>> float(to_score(1.0, 1.25, 1.6, 0.15, 0.3, origin=1.0))
    0.0
    """
    v = np.asarray(value, dtype=np.float64)
    low = (v - origin) * (warning_score / (warning_level - origin))
    high = warning_score + (v - warning_level) * (
        (critical_score - warning_score) / (critical_level - warning_level))
    return np.maximum(np.where(v <= warning_level, low, high), 0.0)


def level_of(score: float, cfg: DriftConfig) -> str:
    """Alert level of a score: ``CRITICAL`` >= critical_score, ``WARNING`` >= warning_score."""
    if score >= cfg.critical_score:
        return "CRITICAL"
    if score >= cfg.warning_score:
        return "WARNING"
    return "NORMAL"


# ----------------------------------------------------------------------------------------
# reference sample
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Reference:
    """A reference sample, one column per feature, prepared for drift tests.

    Build with :meth:`from_frame` or :meth:`from_array`. Rows holding a NaN or infinite value
    are dropped (training frames start with warm-up rows).

    Attributes
    ----------
    names
        Column names, in the order live values must follow.
    sorted
        Shape ``(F, n)``: each column's values sorted ascending.
    mean, std
        Per column (``std`` is the population std; 0 where the column is constant).
    scale
        Spread used to scale Wasserstein-1: the interquartile range; where it is 0 (a column
        with more than half its values equal) the std; where that is 0 too, 1.
    psi_edges
        Shape ``(F, bins - 1)``: inner bin edges at the reference quantiles ``k / bins``.
    psi_fractions
        Shape ``(F, bins)``: share of reference values in each bin (not exactly ``1 / bins``
        when values tie at an edge).
    """

    names: tuple[str, ...]
    sorted: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    scale: np.ndarray
    psi_edges: np.ndarray
    psi_fractions: np.ndarray

    @property
    def n_features(self) -> int:
        """Number of columns."""
        return len(self.names)

    @property
    def n_rows(self) -> int:
        """Rows in the sample (after dropping non-finite rows)."""
        return int(self.sorted.shape[1])

    @property
    def psi_bins(self) -> int:
        """Number of PSI bins."""
        return int(self.psi_fractions.shape[1])

    @property
    def bin_counts(self) -> np.ndarray:
        """Reference values per PSI bin, shape ``(F, bins)`` (integers, as float)."""
        return np.rint(self.psi_fractions * self.n_rows)

    @classmethod
    def from_array(cls, values: ArrayLike, names: Sequence[str], psi_bins: int = 10) -> "Reference":
        """Build from an ``(n, F)`` array and its column names.

        Raises
        ------
        InvalidInput
            Wrong shape, non-numeric values, duplicate names, or fewer than
            ``max(10, psi_bins)`` finite rows (field ``reference``).
        """
        if psi_bins < 2:
            raise ValueError(f"psi_bins must be >= 2, got {psi_bins}")
        names_t = tuple(str(n) for n in names)
        try:
            x = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput("reference values must be numeric", field="reference") from None
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != len(names_t) or not names_t:
            raise InvalidInput(f"reference must have shape (n, {len(names_t)}) for names "
                               f"{list(names_t)}, got {x.shape}", field="reference")
        if len(set(names_t)) != len(names_t):
            raise InvalidInput("reference column names must be distinct", field="reference")
        x = x[np.isfinite(x).all(axis=1)]
        need = max(10, psi_bins)
        if x.shape[0] < need:
            raise InvalidInput(f"reference needs at least {need} finite rows, got {x.shape[0]}",
                               field="reference")
        srt = np.sort(x.T, axis=1)
        q25, q75 = np.quantile(x, [0.25, 0.75], axis=0)
        std = x.std(axis=0)
        scale = np.where(q75 - q25 > 0, q75 - q25, np.where(std > 0, std, 1.0))
        edges = np.quantile(x, np.arange(1, psi_bins) / psi_bins, axis=0).T.copy()
        bins = _bin_index(srt.T, edges)  # (n, F)
        counts = _bin_counts(bins, psi_bins)
        fractions = counts / x.shape[0]
        return cls(names_t, np.ascontiguousarray(srt), x.mean(axis=0), std, scale, edges, fractions)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, psi_bins: int = 10,
                   columns: Sequence[str] | None = None) -> "Reference":
        """Build from a DataFrame (e.g. the registry's ``reference.parquet``).

        ``columns`` selects and orders the columns (default: every numeric column).

        Raises
        ------
        InvalidInput
            A named column is missing, or the checks of :meth:`from_array` fail.
        """
        if columns is None:
            columns = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise InvalidInput(f"reference lacks columns {missing}", field="reference")
        return cls.from_array(frame[list(columns)].to_numpy(dtype=np.float64), columns, psi_bins)

    @classmethod
    def read_parquet(cls, path: str | Path, psi_bins: int = 10,
                     columns: Sequence[str] | None = None) -> "Reference":
        """Read a reference sample stored as Parquet (see :meth:`from_frame`)."""
        return cls.from_frame(pd.read_parquet(path), psi_bins=psi_bins, columns=columns)


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """PSI bin of each value: ``x`` (b, F), ``edges`` (F, bins-1) -> (b, F) in [0, bins)."""
    # Counting edges <= x equals searchsorted(edges[f], x, "right") for every column at once.
    return (edges[None, :, :] <= x[:, :, None]).sum(axis=2)


def _bin_counts(bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Histogram (F, n_bins) of a (b, F) matrix of bin indices, one bincount for all columns."""
    f = bins.shape[1]
    flat = bins + np.arange(f) * n_bins
    return np.bincount(flat.ravel(), minlength=f * n_bins).reshape(f, n_bins)


# ----------------------------------------------------------------------------------------
# sliding window against the reference
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowStats:
    """Drift statistics of the current window, one value per column."""

    names: tuple[str, ...]
    n: int  # events in the window
    ks: np.ndarray
    psi: np.ndarray
    wasserstein: np.ndarray  # W1 / reference IQR (see Reference.scale)
    wasserstein_raw: np.ndarray  # W1 in the column's own units
    tvd: np.ndarray  # total variation distance on the PSI bins
    kl: np.ndarray  # D_KL(P_ref || P_live) on the PSI bins, smoothed

    def column_scores(self, cfg: DriftConfig) -> np.ndarray:
        """Per-column score: weighted mean of KS and the mapped PSI, W1/IQR, TVD, KL (module notes)."""
        ws, cs = cfg.warning_score, cfg.critical_score
        parts = (
            (cfg.weight_ks, self.ks),
            (cfg.weight_psi, to_score(self.psi, cfg.psi_warning, cfg.psi_critical, ws, cs)),
            (cfg.weight_w1, to_score(self.wasserstein, cfg.w1_warning, cfg.w1_critical, ws, cs)),
            (cfg.weight_tvd, to_score(self.tvd, cfg.tvd_warning, cfg.tvd_critical, ws, cs)),
            (cfg.weight_kl, to_score(self.kl, cfg.kl_warning, cfg.kl_critical, ws, cs)),
        )
        total = sum(w for w, _ in parts)
        # Each part capped at 1, the top of the KS scale, so one wild PSI or KL (they grow
        # without bound) cannot dwarf the rest.
        return sum(w * np.minimum(v, 1.0) for w, v in parts if w > 0) / total

    def to_dict(self, cfg: DriftConfig | None = None,
                scores: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """``{name: {"ks", "psi", "wasserstein", "tvd", "kl"[, "score"]}}`` with plain floats.

        The score is included when ``cfg`` (or the already computed ``scores``) is given.
        """
        if scores is None and cfg is not None:
            scores = self.column_scores(cfg)
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.names):
            row = {"ks": float(self.ks[i]), "psi": float(self.psi[i]),
                   "wasserstein": float(self.wasserstein[i]), "tvd": float(self.tvd[i]),
                   "kl": float(self.kl[i])}
            if scores is not None:
                row["score"] = float(scores[i])
            out[name] = row
        return out


class WindowDrift:
    """KS, PSI, scaled Wasserstein-1, TVD and KL of a sliding window of live values vs a reference.

    Parameters
    ----------
    reference
        The reference sample; live values follow its column order.
    window
        Events kept (the newest ``window``).
    psi_epsilon
        Floor of bin proportions in PSI.
    kl_pseudocount
        Added to every bin of both histograms before KL (see :func:`tvd_kl_from_counts`).

    Raises
    ------
    ValueError
        ``window < 2``, ``psi_epsilon`` outside (0, 0.1) or ``kl_pseudocount <= 0``.

    Examples
    --------
    >>> rng = np.random.default_rng(7)
    >>> ref = Reference.from_array(rng.normal(size=(2000, 2)), ["a", "b"], psi_bins=10)
    >>> wd = WindowDrift(ref, window=500)
    >>> wd.update(rng.normal(size=(500, 2)) + [0.0, 1.0])
    500
    >>> st = wd.stats()
    >>> [round(float(v), 3) for v in st.ks], [round(float(v), 2) for v in st.wasserstein]
    ([0.047, 0.442], [0.09, 0.8])
    """

    def __init__(self, reference: Reference, window: int, psi_epsilon: float = 1e-4,
                 kl_pseudocount: float = 0.5) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0 < psi_epsilon < 0.1:
            raise ValueError(f"psi_epsilon must be in (0, 0.1), got {psi_epsilon}")
        if not (math.isfinite(kl_pseudocount) and kl_pseudocount > 0):
            raise ValueError(f"kl_pseudocount must be finite and > 0, got {kl_pseudocount}")
        self.reference = reference
        self.window = int(window)
        self.psi_epsilon = float(psi_epsilon)
        self.kl_pseudocount = float(kl_pseudocount)
        self._ref_counts = reference.bin_counts
        f = reference.n_features
        self._ring = np.zeros((self.window, f))
        self._ring_bins = np.zeros((self.window, f), dtype=np.int64)
        self._sorted = np.zeros((f, self.window))
        self._bin_counts = np.zeros((f, reference.psi_bins), dtype=np.int64)
        self._head = 0  # next ring slot to write
        self._count = 0  # valid events in the window
        self._n_seen = 0
        self._rejected = 0
        self._stats: WindowStats | None = None

    @property
    def n_features(self) -> int:
        """Number of columns."""
        return self.reference.n_features

    @property
    def count(self) -> int:
        """Events currently in the window."""
        return self._count

    @property
    def n_seen(self) -> int:
        """Events accepted since construction."""
        return self._n_seen

    @property
    def rejected(self) -> int:
        """Rows rejected because a value was NaN or infinite."""
        return self._rejected

    def values(self) -> np.ndarray:
        """The window in arrival order, shape ``(count, F)`` (a copy)."""
        idx = (self._head - self._count + np.arange(self._count)) % self.window
        return self._ring[idx].copy()

    def sorted_values(self) -> np.ndarray:
        """The window sorted per column, shape ``(F, count)`` (a copy)."""
        return self._sorted[:, : self._count].copy()

    def bin_counts(self) -> np.ndarray:
        """Window counts per PSI bin, shape ``(F, bins)`` (a copy)."""
        return self._bin_counts.copy()

    def update(self, values: ArrayLike) -> int:
        """Add one event ``(F,)`` or a batch ``(b, F)`` in time order.

        Returns
        -------
        int
            Events accepted (rows with a NaN or infinite value are rejected and counted in
            :attr:`rejected`).

        Raises
        ------
        InvalidInput
            Non-numeric values or a column count other than ``n_features``.
        """
        x = _as_rows(values, self.n_features, "values")
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            self._rejected += int((~ok).sum())
            x = x[ok]
        b = x.shape[0]
        if b == 0:
            return 0
        self._n_seen += b
        self._stats = None
        if b >= self.window:
            self._refill(x[-self.window:])
            return b
        w = self.window
        n_evict = max(0, self._count + b - w)
        old_idx = (self._head - self._count + np.arange(n_evict)) % w
        new_idx = (self._head + np.arange(b)) % w
        new_bins = _bin_index(x, self.reference.psi_edges)
        if n_evict:
            old = self._ring[old_idx]  # fancy indexing copies: safe to overwrite the ring next
            self._bin_counts -= _bin_counts(self._ring_bins[old_idx], self.reference.psi_bins)
        else:
            old = x[:0]
        self._bin_counts += _bin_counts(new_bins, self.reference.psi_bins)
        self._ring[new_idx] = x
        self._ring_bins[new_idx] = new_bins
        if b == 1:
            self._replace_one(old[0] if n_evict else None, x[0])
        else:
            self._replace_batch(old, x)
        self._head = (self._head + b) % w
        self._count = min(w, self._count + b)
        return b

    def _refill(self, x: np.ndarray) -> None:
        """Replace the whole window by ``x`` (a batch at least as long as the window)."""
        bins = _bin_index(x, self.reference.psi_edges)
        self._ring[:] = x
        self._ring_bins[:] = bins
        self._sorted[:] = np.sort(x.T, axis=1)
        self._bin_counts = _bin_counts(bins, self.reference.psi_bins)
        self._head = 0
        self._count = self.window

    def _replace_one(self, old: np.ndarray | None, new: np.ndarray) -> None:
        """Evict ``old`` (or nothing) and insert ``new`` in every sorted column, in place."""
        c = self._count
        for j in range(self.n_features):
            row = self._sorted[j]
            v = new[j]
            if old is None:  # filling: shift the tail right by one
                q = int(np.searchsorted(row[:c], v))
                row[q + 1: c + 1] = row[q:c]
                row[q] = v
                continue
            p = int(np.searchsorted(row[:c], old[j]))  # an occurrence of the evicted value
            q = int(np.searchsorted(row[:c], v))
            if q <= p:  # values in [q, p) move right, over the evicted one
                row[q + 1: p + 1] = row[q:p]
                row[q] = v
            else:  # values in (p, q) move left, over the evicted one
                row[p: q - 1] = row[p + 1: q]
                row[q - 1] = v

    def _replace_batch(self, old: np.ndarray, new: np.ndarray) -> None:
        """Evict the rows ``old`` and insert the rows ``new`` in every sorted column."""
        c = self._count
        k = old.shape[0]
        c_new = c - k + new.shape[0]
        for j in range(self.n_features):
            row = self._sorted[j, :c]
            if k:
                gone = np.sort(old[:, j])
                pos = np.searchsorted(row, gone)
                # Equal evicted values map to the same first position: step over each copy.
                pos += np.arange(k) - np.searchsorted(gone, gone)
                row = np.delete(row, pos)
            add = np.sort(new[:, j])
            self._sorted[j, :c_new] = np.insert(row, np.searchsorted(row, add), add)

    def stats(self) -> WindowStats:
        """Statistics of the current window (cached until the next update).

        Raises
        ------
        InvalidInput
            The window is empty (field ``window``).
        """
        if self._stats is not None:
            return self._stats
        m = self._count
        if m == 0:
            raise InvalidInput("no live values in the window yet", field="window")
        ref = self.reference
        ks, w1 = two_sample_ks_w1(ref.sorted, self._sorted[:, :m])
        psi = psi_from_counts(self._bin_counts, ref.psi_fractions, self.psi_epsilon)
        tvd, kl = tvd_kl_from_counts(self._bin_counts, self._ref_counts, self.kl_pseudocount)
        self._stats = WindowStats(ref.names, m, ks, psi, w1 / ref.scale, w1, tvd, kl)
        return self._stats


class ReferenceSource(str, Enum):
    """Where a window's reference sample came from."""

    MODEL = "model"  # shipped with the model (training or validation sample)
    LIVE = "live"  # the first live values the monitor saw


class BaselineWindow:
    """A :class:`WindowDrift` whose reference is given, or else the first live values.

    Until ``baseline`` finite rows have arrived (and only when no reference was given), rows
    are kept as the reference sample; the sliding window starts with the next row, so the
    window never overlaps its reference.

    Parameters
    ----------
    names
        Column names.
    window, psi_bins, psi_epsilon, kl_pseudocount
        As for :class:`WindowDrift` and :class:`Reference`.
    baseline
        Live rows that make the reference when ``reference`` is ``None`` (>= ``max(10,
        psi_bins)``).
    reference
        A reference sample with columns ``names``, or ``None``.

    Raises
    ------
    ValueError
        ``baseline`` too small, or ``reference`` has other columns.

    Examples
    --------
    >>> rng = np.random.default_rng(4)
    >>> bw = BaselineWindow(("y",), window=200, baseline=300)
    >>> bw.update(rng.normal(size=(400, 1))), bw.ready, bw.source.value, bw.drift.count
    (400, True, 'live', 100)
    >>> _ = bw.update(rng.normal(size=(200, 1)) + 1.0)
    >>> round(float(bw.drift.stats().ks[0]), 2)
    0.35
    """

    def __init__(self, names: Sequence[str], window: int, psi_bins: int = 10,
                 psi_epsilon: float = 1e-4, kl_pseudocount: float = 0.5, baseline: int = 500,
                 reference: Reference | None = None) -> None:
        self.names = tuple(str(n) for n in names)
        if baseline < max(10, psi_bins):
            raise ValueError(f"baseline must be >= {max(10, psi_bins)}, got {baseline}")
        if reference is not None and reference.names != self.names:
            raise ValueError(f"reference columns {reference.names} differ from {self.names}")
        self.window = int(window)
        self.psi_bins = int(psi_bins)
        self.psi_epsilon = float(psi_epsilon)
        self.kl_pseudocount = float(kl_pseudocount)
        self.baseline = int(baseline)
        self.source = ReferenceSource.LIVE if reference is None else ReferenceSource.MODEL
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._rejected = 0
        self.drift: WindowDrift | None = None
        if reference is not None:
            self.drift = self._window(reference)

    def _window(self, reference: Reference) -> WindowDrift:
        return WindowDrift(reference, self.window, self.psi_epsilon, self.kl_pseudocount)

    @property
    def ready(self) -> bool:
        """Whether the reference exists (the window is then being filled)."""
        return self.drift is not None

    @property
    def n_baseline(self) -> int:
        """Rows of the reference: collected so far towards a live one, or the given one's."""
        if self.drift is None:
            return self._n_pending
        return self.drift.reference.n_rows

    @property
    def rejected(self) -> int:
        """Rows rejected (a NaN or infinite value), before and after the reference was built."""
        return self._rejected + (self.drift.rejected if self.drift is not None else 0)

    def update(self, values: ArrayLike) -> int:
        """Add rows ``(F,)`` or ``(b, F)`` in time order; returns the rows accepted."""
        x = _as_rows(values, len(self.names), "values")
        if self.drift is None:
            ok = np.isfinite(x).all(axis=1)
            self._rejected += int((~ok).sum())
            x = x[ok]
            take = min(self.baseline - self._n_pending, x.shape[0])
            if take:
                self._pending.append(x[:take].copy())
                self._n_pending += take
            x = x[take:]
            if self._n_pending >= self.baseline:
                ref = Reference.from_array(np.vstack(self._pending), self.names, self.psi_bins)
                self._pending = []
                self.drift = self._window(ref)
            if x.shape[0] == 0:
                return take
            return take + self.drift.update(x)
        return self.drift.update(x)

    def stats(self, min_window: int) -> WindowStats | None:
        """The window's statistics once it holds ``min_window`` rows, else ``None``."""
        if self.drift is None or self.drift.count < min_window:
            return None
        return self.drift.stats()


def _as_rows(values: ArrayLike, f: int, field_name: str) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field_name} must be numeric", field=field_name) from None
    if x.ndim == 1 and x.shape[0] == f:
        return x[None, :]
    if x.ndim != 2 or x.shape[1] != f:
        raise InvalidInput(f"{field_name} must have shape ({f},) or (n, {f}), got {x.shape}",
                           field=field_name)
    return x


# ----------------------------------------------------------------------------------------
# performance drift
# ----------------------------------------------------------------------------------------
class PerformanceDrift:
    """Rolling pinball loss and MAE of realized forecasts against validation figures.

    Parameters
    ----------
    validation_pinball
        Mean pinball loss (averaged over the quantiles) on the validation set.
    validation_mae
        Mean absolute error of the median forecast on the validation set.
    quantiles
        Quantile levels of the forecast columns (must include 0.5).
    window
        Realized labels kept.

    Raises
    ------
    InvalidInput
        A validation figure is not finite and > 0 (field ``validation_pinball`` /
        ``validation_mae``).
    ValueError
        Quantiles outside (0, 1), without 0.5, or ``window < 1``.

    Examples
    --------
    >>> perf = PerformanceDrift(validation_pinball=0.5, validation_mae=1.0,
    ...                         quantiles=(0.05, 0.5, 0.95), window=100)
    >>> perf.update([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]], [2.0, -2.0])
    2
    >>> perf.mae(), round(perf.pinball(), 4), perf.ratios()[1]
    (2.0, 0.7, 2.0)
    """

    def __init__(self, validation_pinball: float, validation_mae: float,
                 quantiles: Sequence[float] = (0.05, 0.5, 0.95), window: int = 200) -> None:
        for name, v in (("validation_pinball", validation_pinball), ("validation_mae", validation_mae)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidInput(f"{name} must be a finite number > 0, got {v!r}", field=name)
        q = np.asarray(quantiles, dtype=np.float64)
        if q.ndim != 1 or q.size == 0 or not ((q > 0) & (q < 1)).all():
            raise ValueError("quantiles must be levels in (0, 1)")
        hits = np.flatnonzero(np.isclose(q, 0.5))
        if hits.size != 1:
            raise ValueError("quantiles must include 0.5 exactly once (the median forecast)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.validation_pinball = float(validation_pinball)
        self.validation_mae = float(validation_mae)
        self.quantiles = q
        self._median = int(hits[0])
        self.window = int(window)
        self._pinball = np.zeros(self.window)
        self._abs = np.zeros(self.window)
        self._head = 0
        self._count = 0
        self._n_seen = 0
        self._rejected = 0

    @property
    def count(self) -> int:
        """Labels in the rolling window."""
        return self._count

    @property
    def n_seen(self) -> int:
        """Labels accepted since construction."""
        return self._n_seen

    @property
    def rejected(self) -> int:
        """Rows rejected because a forecast or a realized value was NaN or infinite."""
        return self._rejected

    def update(self, forecasts: ArrayLike, realized: ArrayLike) -> int:
        """Add realized labels with the forecasts that were made for them.

        Parameters
        ----------
        forecasts
            Shape ``(Q,)`` or ``(b, Q)``: one column per quantile level.
        realized
            Scalar or shape ``(b,)``.

        Returns
        -------
        int
            Labels accepted.

        Raises
        ------
        InvalidInput
            Shapes disagree (field ``forecasts`` / ``realized``).
        """
        f = _as_rows(forecasts, self.quantiles.size, "forecasts")
        try:
            y = np.atleast_1d(np.asarray(realized, dtype=np.float64))
        except (TypeError, ValueError):
            raise InvalidInput("realized must be numeric", field="realized") from None
        if y.ndim != 1 or y.shape[0] != f.shape[0]:
            raise InvalidInput(f"realized must hold {f.shape[0]} values, got shape {y.shape}",
                               field="realized")
        ok = np.isfinite(f).all(axis=1) & np.isfinite(y)
        if not ok.all():
            self._rejected += int((~ok).sum())
            f, y = f[ok], y[ok]
        b = y.shape[0]
        if b == 0:
            return 0
        err = y[:, None] - f
        loss = np.maximum(self.quantiles * err, (self.quantiles - 1.0) * err).mean(axis=1)
        ae = np.abs(err[:, self._median])
        if b > self.window:
            loss, ae = loss[-self.window:], ae[-self.window:]
        idx = (self._head + np.arange(loss.shape[0])) % self.window
        self._pinball[idx] = loss
        self._abs[idx] = ae
        self._head = (self._head + loss.shape[0]) % self.window
        self._count = min(self.window, self._count + loss.shape[0])
        self._n_seen += b
        return b

    def pinball(self) -> float | None:
        """Rolling mean pinball loss (``None`` before the first label)."""
        return float(self._pinball[: self._count].mean()) if self._count else None

    def mae(self) -> float | None:
        """Rolling MAE of the median forecast (``None`` before the first label)."""
        return float(self._abs[: self._count].mean()) if self._count else None

    def ratios(self) -> tuple[float, float] | None:
        """``(pinball / validation_pinball, mae / validation_mae)`` or ``None``."""
        if not self._count:
            return None
        # The ring holds exactly the newest `count` labels (slots beyond count are unused).
        return (float(self._pinball[: self._count].mean()) / self.validation_pinball,
                float(self._abs[: self._count].mean()) / self.validation_mae)


# ----------------------------------------------------------------------------------------
# the combined monitor
# ----------------------------------------------------------------------------------------
class DriftComponent(str, Enum):
    """The parts of the overall score (``drift.score_components`` picks those that count)."""

    FEATURES = "features"  # P(X): the model's inputs
    PREDICTIONS = "predictions"  # the champion's median forecasts
    PERFORMANCE = "performance"  # pinball / MAE against the validation figures
    LABELS = "labels"  # P(Y): realized returns
    CONCEPT = "concept"  # P(Y|X): standardized residuals


# Column of a model's reference frame holding the training labels (label drift's reference).
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class DriftReport:
    """One evaluation of every drift component (see the module notes for the scoring)."""

    score: float
    level: str
    retrain: bool
    feature_score: float | None
    prediction_score: float | None
    performance_score: float | None
    features: dict[str, dict[str, float]]
    drifted_features: tuple[str, ...]
    predictions: dict[str, dict[str, float]]
    performance: dict[str, float | int | None]
    change_detected: bool
    last_alarm: dict[str, Any] | None
    events_seen: dict[str, int] = field(default_factory=dict)
    label_score: float | None = None
    concept_score: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    concept: dict[str, Any] = field(default_factory=dict)
    drift_kind: DriftKind = DriftKind.NONE
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "score": self.score, "level": self.level, "retrain": self.retrain,
            "feature_score": self.feature_score, "prediction_score": self.prediction_score,
            "performance_score": self.performance_score, "label_score": self.label_score,
            "concept_score": self.concept_score, "drift_kind": self.drift_kind.value,
            "features": self.features,
            "drifted_features": list(self.drifted_features), "predictions": self.predictions,
            "performance": self.performance, "labels": self.labels, "concept": self.concept,
            "change_detected": self.change_detected,
            "last_alarm": self.last_alarm, "events_seen": dict(self.events_seen),
            "evaluations": self.evaluations,
        }


class DriftMonitor:
    """Feature, prediction, performance, label and concept drift of one asset's champion model.

    Parameters
    ----------
    cfg
        The ``drift`` config section.
    features
        Training feature sample (the registry's ``reference.parquet``).
    predictions
        Predictions on the validation set (e.g. columns ``pred`` and ``width``), or ``None``.
    validation_pinball, validation_mae
        The model's validation figures; performance drift is off when either is ``None``.
    quantiles
        Quantile levels of the forecast columns passed to :meth:`update_outcomes` (must
        include 0.5; the lowest and highest are the outer quantiles of the concept residual).
    input_names
        Column names of the rows given to :meth:`update_features` when they are wider than the
        reference (e.g. every model feature, of which the reference keeps a subset); the
        monitor picks the reference's columns out of them. Default: the reference's names.
    labels
        Reference sample of the labels (one column, :data:`LABEL_COLUMN`), e.g. the training
        labels; ``None``: label drift compares with the first ``cfg.live_reference_labels``
        live labels.

    Raises
    ------
    InvalidInput
        ``input_names`` lacks a reference column (field ``input_names``).
    ValueError
        ``quantiles`` outside (0, 1), fewer than three, or without 0.5.

    Notes
    -----
    Each ``update_*`` call is cheap (see the module notes); window statistics are refreshed
    every ``cfg.eval_every`` accepted events of any stream -- within a batch too: a batch is
    processed in slices that end where an evaluation is due -- and at once after a detector
    alarm. Every call returns the events it caused, as dicts with a ``type``:

    * ``drift_change`` -- a change detector alarmed (stream, column, side, statistic, threshold);
    * ``drift_level`` -- the alert level changed (from, to, score and its components);
    * ``drift_retrain`` -- the retrain flag turned on (score, retrain_score, top columns);
    * ``drift_kind`` -- what moved changed (:class:`~tickcast.monitoring.concept.DriftKind`:
      none, covariate, concept, covariate_and_concept), with the scores behind it.

    Examples
    --------
    >>> from tickcast.config import DriftConfig
    >>> rng = np.random.default_rng(3)
    >>> ref = Reference.from_array(rng.normal(size=(2000, 4)), ["f0", "f1", "f2", "f3"])
    >>> mon = DriftMonitor(DriftConfig(), ref)
    >>> _ = mon.update_features(rng.normal(size=(1000, 4)))
    >>> mon.report.level, mon.report.retrain, mon.evaluations
    ('NORMAL', False, 20)
    >>> events = mon.update_features(rng.normal(size=(1000, 4)) + [1.5, 1.5, 1.5, 0.0])
    >>> [e["type"] for e in events][:4], [e["to"] for e in events if e["type"] == "drift_level"]
    (['drift_change', 'drift_change', 'drift_change', 'drift_level'], ['WARNING', 'CRITICAL'])
    >>> mon.report.level, mon.report.drifted_features, mon.report.drift_kind.value
    ('CRITICAL', ('f0', 'f1', 'f2'), 'covariate')
    """

    def __init__(self, cfg: DriftConfig, features: Reference, predictions: Reference | None = None,
                 validation_pinball: float | None = None, validation_mae: float | None = None,
                 quantiles: Sequence[float] = (0.05, 0.5, 0.95),
                 input_names: Sequence[str] | None = None,
                 labels: Reference | None = None) -> None:
        self.cfg = cfg
        self.input_names: tuple[str, ...] = features.names
        self._select: np.ndarray | None = None
        if input_names is not None:
            given = [str(n) for n in input_names]
            missing = [n for n in features.names if n not in given]
            if missing:
                raise InvalidInput(f"input_names lack reference columns {missing}",
                                   field="input_names")
            self.input_names = tuple(given)
            self._select = np.array([given.index(n) for n in features.names])
        q = np.asarray(quantiles, dtype=np.float64)
        if q.ndim != 1 or q.size < 3 or not ((q > 0) & (q < 1)).all() \
                or np.flatnonzero(np.isclose(q, 0.5)).size != 1:
            raise ValueError("quantiles must be at least three levels in (0, 1), 0.5 once")
        self.quantiles = q
        self._q_median = int(np.flatnonzero(np.isclose(q, 0.5))[0])
        self._q_lower, self._q_upper = int(np.argmin(q)), int(np.argmax(q))
        self.features = WindowDrift(features, cfg.window, cfg.psi_epsilon, cfg.kl_pseudocount)
        self.feature_detector = self._detector(features)
        self.predictions: WindowDrift | None = None
        self.prediction_detector: PageHinkleyDetector | CusumDetector | None = None
        if predictions is not None:
            self.predictions = WindowDrift(predictions, cfg.window, cfg.psi_epsilon,
                                           cfg.kl_pseudocount)
            self.prediction_detector = self._detector(predictions)
        self.performance: PerformanceDrift | None = None
        if validation_pinball is not None and validation_mae is not None:
            self.performance = PerformanceDrift(validation_pinball, validation_mae, quantiles,
                                                cfg.performance_window)
        if labels is not None and labels.names != (LABEL_COLUMN,):
            raise ValueError(f"the label reference must have the one column {LABEL_COLUMN!r}")
        self.labels = BaselineWindow((LABEL_COLUMN,), cfg.window, cfg.psi_bins, cfg.psi_epsilon,
                                     cfg.kl_pseudocount, cfg.live_reference_labels, labels)
        self.concept = BaselineWindow(("residual",), cfg.window, cfg.psi_bins, cfg.psi_epsilon,
                                      cfg.kl_pseudocount, cfg.live_reference_labels)
        self._counted = frozenset(DriftComponent(c) for c in cfg.score_components)
        self._labels_seen = 0
        self._since_eval = 0
        self._evaluations = 0
        self._alarm_index: dict[str, int] = {}  # stream -> detector index of its last alarm
        self._last_alarm: dict[str, Any] | None = None
        self._report: DriftReport | None = None
        self._level = "NORMAL"
        self._retrain = False
        self._kind = DriftKind.NONE

    @classmethod
    def from_frames(cls, cfg: DriftConfig, reference: pd.DataFrame, feature_names: Sequence[str],
                    predictions: pd.DataFrame | None = None,
                    validation_pinball: float | None = None, validation_mae: float | None = None,
                    quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> "DriftMonitor":
        """Build from a model's reference frames (the registry's ``reference.parquet``).

        Live feature rows follow ``feature_names`` (the model's input order); every feature
        except ``cfg.exclude_features`` is watched. ``predictions`` (validation-set predictions,
        every numeric column) enables prediction drift. A :data:`LABEL_COLUMN` column in
        ``reference`` (with enough finite values) becomes label drift's reference.

        Raises
        ------
        InvalidInput
            The reference lacks a watched feature, or too few finite rows.
        """
        watched = [n for n in feature_names if n not in cfg.exclude_features]
        feats = Reference.from_frame(reference, cfg.psi_bins, columns=watched)
        preds = Reference.from_frame(predictions, cfg.psi_bins) if predictions is not None else None
        labels = None
        if LABEL_COLUMN in reference.columns and \
                np.isfinite(reference[LABEL_COLUMN].to_numpy(np.float64)).sum() >= max(10, cfg.psi_bins):
            labels = Reference.from_frame(reference, cfg.psi_bins, columns=[LABEL_COLUMN])
        return cls(cfg, feats, preds, validation_pinball, validation_mae, quantiles,
                   input_names=feature_names, labels=labels)

    def _detector(self, ref: Reference) -> PageHinkleyDetector | CusumDetector:
        c = self.cfg
        return make_detector(c.detector, ref.mean, ref.std, ph_delta=c.ph_delta,
                             ph_threshold=c.ph_threshold, ph_min_events=c.ph_min_events,
                             cusum_k=c.cusum_k, cusum_h=c.cusum_h, warmup=c.detector_warmup,
                             max_inflation=c.detector_max_inflation)

    @property
    def report(self) -> DriftReport | None:
        """The latest evaluation (``None`` before the first)."""
        return self._report

    @property
    def level(self) -> str:
        """Current alert level."""
        return self._level

    @property
    def evaluations(self) -> int:
        """Evaluations (window statistics refreshed) since construction."""
        return self._evaluations

    # -- updates -----------------------------------------------------------------------
    def _cuts(self, ok: np.ndarray) -> Iterator[slice]:
        """Slices of a batch, each ending where an evaluation falls due (``ok``: accepted rows).

        Read lazily: an alarm's refresh inside the loop resets the counter the next cut uses.
        """
        cum = np.cumsum(ok)
        b = ok.shape[0]
        start = 0
        while start < b:
            done = int(cum[start - 1]) if start else 0
            need = max(1, self.cfg.eval_every - self._since_eval)
            end = min(b, int(np.searchsorted(cum, done + need)) + 1)
            yield slice(start, end)
            start = end

    def update_features(self, values: ArrayLike) -> list[dict[str, Any]]:
        """Feed live feature rows ``(F,)`` or ``(b, F)`` in :attr:`input_names` order."""
        if self._select is not None:
            values = _as_rows(values, len(self.input_names), "features")[:, self._select]
        return self._update_stream("features", self.features, self.feature_detector, values)

    def update_predictions(self, values: ArrayLike) -> list[dict[str, Any]]:
        """Feed live prediction rows in the prediction reference's column order.

        Raises
        ------
        InvalidInput
            No prediction reference was given (field ``predictions``).
        """
        if self.predictions is None or self.prediction_detector is None:
            raise InvalidInput("this monitor has no prediction reference", field="predictions")
        return self._update_stream("predictions", self.predictions, self.prediction_detector,
                                   values)

    def update_outcomes(self, forecasts: ArrayLike, realized: ArrayLike) -> list[dict[str, Any]]:
        """Feed realized labels with the quantile forecasts made for them.

        They feed label drift (the realized values), concept drift (the standardized
        residuals, :func:`~tickcast.monitoring.concept.standardized_residuals`) and, when the
        monitor has validation figures, performance drift. A label counts toward the
        evaluation rate when it is finite.

        Raises
        ------
        InvalidInput
            Shapes disagree (field ``forecasts`` / ``realized``).
        """
        f = _as_rows(forecasts, self.quantiles.size, "forecasts")
        try:
            y = np.atleast_1d(np.asarray(realized, dtype=np.float64))
        except (TypeError, ValueError):
            raise InvalidInput("realized must be numeric", field="realized") from None
        if y.ndim != 1 or y.shape[0] != f.shape[0]:
            raise InvalidInput(f"realized must hold {f.shape[0]} values, got shape {y.shape}",
                               field="realized")
        events: list[dict[str, Any]] = []
        for cut in self._cuts(np.isfinite(y)):
            fs, ys = f[cut], y[cut]
            if self.performance is not None:
                self.performance.update(fs, ys)
            n = self.labels.update(ys[:, None])
            self.concept.update(standardized_residuals(
                fs, ys, self._q_median, self._q_lower, self._q_upper)[:, None])
            self._labels_seen += n
            self._since_eval += n
            if self._since_eval >= self.cfg.eval_every:
                events.extend(self.refresh())
        return events

    def _update_stream(self, stream: str, window: WindowDrift,
                       detector: PageHinkleyDetector | CusumDetector,
                       values: ArrayLike) -> list[dict[str, Any]]:
        x = _as_rows(values, window.n_features, stream)
        events: list[dict[str, Any]] = []
        # Window and detector reject the same rows (any NaN/inf), so they count alike.
        for cut in self._cuts(np.isfinite(x).all(axis=1)):
            seg = x[cut]
            accepted = window.update(seg)
            alarms = detector.update(seg[0] if seg.shape[0] == 1 else seg)  # 1 row: per-event path
            self._since_eval += accepted
            new = [self._alarm_event(stream, window.reference, detector, a) for a in alarms]
            events.extend(new)
            if new or self._since_eval >= self.cfg.eval_every:
                events.extend(self.refresh())
        return events

    def _alarm_event(self, stream: str, ref: Reference,
                     detector: PageHinkleyDetector | CusumDetector, alarm: Alarm) -> dict[str, Any]:
        self._alarm_index[stream] = alarm.index
        ev = {"type": "drift_change", "stream": stream, "detector": detector.name,
              "column": ref.names[alarm.feature], "side": alarm.side,
              "statistic": alarm.statistic, "threshold": alarm.threshold,
              "event_index": alarm.index}
        self._last_alarm = ev
        return ev

    def _change_held(self) -> bool:
        """Whether a detector alarmed within the last ``alarm_hold_events`` of its stream."""
        hold = self.cfg.alarm_hold_events
        for stream, det in (("features", self.feature_detector),
                            ("predictions", self.prediction_detector)):
            at = self._alarm_index.get(stream)
            if det is not None and at is not None and det.n_seen - 1 - at < hold:
                return True
        return False

    # -- evaluation --------------------------------------------------------------------
    def _outcome_part(self, window: BaselineWindow) -> tuple[float | None, dict[str, Any], np.ndarray | None]:
        """Score, JSON evidence and sorted window values of a label / residual window."""
        c = self.cfg
        info: dict[str, Any] = {"reference": window.source.value,
                                "reference_rows": window.n_baseline, "rejected": window.rejected,
                                "window": window.drift.count if window.drift is not None else 0}
        st = window.stats(c.min_window)
        if st is None:
            return None, info, None
        col = st.column_scores(c)
        score = float(col[0])
        info.update(st.to_dict(scores=col)[window.names[0]])
        assert window.drift is not None
        return score, info, window.drift.sorted_values()[0]

    def refresh(self) -> list[dict[str, Any]]:
        """Recompute the report now; returns the level / retrain / kind transition events."""
        c = self.cfg
        self._since_eval = 0
        self._evaluations += 1
        feat_stats = self.features.stats() if self.features.count >= c.min_window else None
        feature_score = None
        features: dict[str, dict[str, float]] = {}
        drifted: tuple[str, ...] = ()
        if feat_stats is not None:
            scores = feat_stats.column_scores(c)
            top = max(1, math.ceil(c.feature_top_fraction * scores.size))
            feature_score = float(np.sort(scores)[-top:].mean())
            features = feat_stats.to_dict(scores=scores)
            drifted = tuple(n for n, k in zip(feat_stats.names, feat_stats.ks) if k > c.ks_threshold)
        prediction_score = None
        predictions: dict[str, dict[str, float]] = {}
        if self.predictions is not None and self.predictions.count >= c.min_window:
            pst = self.predictions.stats()
            pred_scores = pst.column_scores(c)
            prediction_score = float(pred_scores.max())
            predictions = pst.to_dict(scores=pred_scores)
        performance_score = None
        performance: dict[str, float | int | None] = {}
        if self.performance is not None:
            perf = self.performance
            ratios = perf.ratios()
            performance = {"labels": perf.count, "pinball": perf.pinball(), "mae": perf.mae(),
                           "pinball_ratio": ratios[0] if ratios else None,
                           "mae_ratio": ratios[1] if ratios else None,
                           "validation_pinball": perf.validation_pinball,
                           "validation_mae": perf.validation_mae}
            if ratios is not None and perf.count >= c.performance_min_labels:
                performance_score = min(1.0, float(to_score(
                    max(ratios), c.performance_ratio_warning, c.performance_ratio_critical,
                    c.warning_score, c.critical_score, origin=1.0)))
        label_score, labels, _ = self._outcome_part(self.labels)
        concept_score, concept, z = self._outcome_part(self.concept)
        if z is not None:
            # Where the realized values fell against the forecast quantiles (a correct model:
            # the levels of the lower quantile, the median and the upper quantile).
            n = z.size
            concept["share_below_lower"] = float(np.searchsorted(z, -1.0, side="right") / n)
            concept["share_below_median"] = float(np.searchsorted(z, 0.0, side="right") / n)
            concept["share_below_upper"] = float(np.searchsorted(z, 1.0, side="right") / n)
            concept["levels"] = [float(self.quantiles[self._q_lower]), 0.5,
                                 float(self.quantiles[self._q_upper])]
        components = {DriftComponent.FEATURES: feature_score,
                      DriftComponent.PREDICTIONS: prediction_score,
                      DriftComponent.PERFORMANCE: performance_score,
                      DriftComponent.LABELS: label_score, DriftComponent.CONCEPT: concept_score}
        parts = [s for k, s in components.items() if k in self._counted and s is not None]
        score = max(parts) if parts else 0.0
        kind = classify_drift(feature_score, concept_score, c.warning_score)
        change = self._change_held()
        level = level_of(score, c)
        if change and level == "NORMAL":
            level = "WARNING"
        retrain = score > c.retrain_score
        seen = {"features": self.features.n_seen,
                "predictions": self.predictions.n_seen if self.predictions else 0,
                "labels": self._labels_seen,
                "rejected": self.features.rejected + (self.predictions.rejected if self.predictions else 0)
                + (self.performance.rejected if self.performance else 0) + self.labels.rejected}
        self._report = DriftReport(
            score=score, level=level, retrain=retrain, feature_score=feature_score,
            prediction_score=prediction_score, performance_score=performance_score,
            features=features, drifted_features=drifted, predictions=predictions,
            performance=performance, change_detected=change, last_alarm=self._last_alarm,
            events_seen=seen, label_score=label_score, concept_score=concept_score,
            labels=labels, concept=concept, drift_kind=kind, evaluations=self._evaluations)
        events: list[dict[str, Any]] = []
        scores: dict[str, Any] = {
            "feature_score": feature_score, "prediction_score": prediction_score,
            "performance_score": performance_score, "label_score": label_score,
            "concept_score": concept_score, "drift_kind": kind.value}
        if level != self._level:
            events.append({"type": "drift_level", "from": self._level, "to": level,
                           "score": score, **scores, "change_detected": change,
                           "drifted_features": list(drifted),
                           "warning_score": c.warning_score, "critical_score": c.critical_score})
            self._level = level
        if retrain and not self._retrain:
            top_cols = sorted(features.items(), key=lambda kv: -kv[1]["score"])[:5]
            events.append({"type": "drift_retrain", "score": score, "retrain_score": c.retrain_score,
                           **scores, "top_features": {k: v for k, v in top_cols},
                           "performance": performance})
        self._retrain = retrain
        if kind is not self._kind:
            events.append({"type": "drift_kind", "from": self._kind.value, "to": kind.value,
                           **scores, "threshold": c.warning_score, "concept": concept})
            self._kind = kind
        return events
