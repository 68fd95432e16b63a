"""Streaming mean-change detectors, vectorized over features.

Two criteria, both two-sided and both run on values standardized by a reference mean and
standard deviation (the training sample), so one threshold fits every feature:

* :class:`CusumDetector` -- Page's tabular CUSUM against the *reference* mean: it answers "does
  the live stream differ from what the model was trained on?". It keeps alarming (after each
  reset) while a shift persists.
* :class:`PageHinkleyDetector` -- the Page-Hinkley test against the stream's own *running* mean
  since the last reset (as in Hinkley 1971 and river's ``PageHinkley``): it answers "did the
  live stream just change?". It is insensitive to a constant offset between the reference and
  the live level, and re-learns the level after each alarm.

Both keep, per feature and side, the Lindley recursion ``S_t = max(0, S_{t-1} + y_t)`` with
``y_t = z_t - mu_t - delta`` (upward side) and ``y_t = mu_t - z_t - delta`` (downward side),
where ``mu_t`` is 0 for CUSUM and the running mean for Page-Hinkley, and alarm when
``S_t > threshold``. A batch of ``b`` events is processed without a Python loop over events,
using the closed form of the recursion: with ``C_t = S_0 + sum_{i<=t} y_i``,
``S_t = C_t - min(0, min_{s<=t} C_s)`` (a cumulative sum and a cumulative minimum). After an
alarm the alarming feature's state is reset and the rest of the batch is processed from there,
so a batch gives exactly the alarms of the same events fed one at a time.

False-alarm rate
----------------
For i.i.d. standardized normal values, Siegmund's approximation of a one-sided CUSUM's
average run length (ARL) with allowance ``k`` and threshold ``h`` for a mean ``mu`` is

    ARL(mu) ~ (exp(-2 D b) + 2 D b - 1) / (2 D^2),  D = mu - k,  b = h + 1.166

(:func:`cusum_arl`). In control (``mu = 0``) with the defaults ``k = 0.5, h = 16``: ARL0 ~
5.7e7 events per side and feature, so five features (ten one-sided tests) give one false alarm
per ~5.7e6 events (about 1.7 % chance over 100,000 events; 108 years of 1-minute bars per
feature and side); for a 1-sigma shift, ARL1 ~ 32 events. ``k = 0.5`` is the optimal allowance
for a 1-sigma shift (half of it); ``h`` trades ARL0 against delay. Page-Hinkley with
``delta = 0.5, threshold = 16`` has the same figures once its running mean has settled
(its increments have mean ``-delta`` and unit variance in control). Raising the threshold by
one multiplies ARL0 by ~e (2k = 1) and adds ~2 events of delay (1 / (mu - k)).

These figures assume independent values. Rolling features are strongly autocorrelated (lag-1
autocorrelation 0.9-0.997 for 1-minute volatility, momentum or MACD), so their partial sums
wander ~ (1 + rho) / (1 - rho) times more and an uncorrected detector alarms dozens of times a
day on calm data. With ``warmup > 0`` the detector first watches ``warmup`` live events without
alarming, estimates each feature's lag-1 autocorrelation rho, and divides its standardized
values by sqrt((1 + rho) / (1 - rho)) (the AR(1) long-run variance, capped at
``max_inflation``; only for rho beyond three standard errors of zero, 3 / sqrt(warmup)), so the
ARL reasoning holds for the long-run variance. The price: a mean shift of a persistent
feature is detected only once it is large against that feature's own wandering -- the window
tests catch the slow ones.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from tickcast.errors import InvalidInput

_EMPTY: tuple["Alarm", ...] = ()
_SIGNS = np.array([[1.0], [-1.0]])  # upward and downward sides as rows of a (2, F) state
_CHUNK = 2048  # rows per vectorized scan: after an alarm at most this many are recomputed


class Alarm(NamedTuple):
    """One detection: which event, which feature, which direction and how far over."""

    index: int  # event index since the detector was built (accepted events, 0-based)
    feature: int
    side: str  # "up" (mean rose) or "down" (mean fell)
    statistic: float
    threshold: float


def cusum_arl(k: float, h: float, shift: float = 0.0) -> float:
    """Siegmund's approximation of a one-sided CUSUM's average run length.

    Parameters
    ----------
    k
        Allowance, in standard deviations.
    h
        Decision threshold, in standard deviations.
    shift
        True mean of the standardized values (0: in control, ARL0; else ARL1, the mean delay).

    Examples
    --------
    >>> round(cusum_arl(0.5, 16.0))
    57033339
    >>> round(cusum_arl(0.5, 16.0, shift=1.0), 1)
    32.3
    """
    if k < 0 or h <= 0:
        raise ValueError("cusum_arl needs k >= 0 and h > 0")
    d = shift - k
    b = h + 1.166
    if abs(d) < 1e-12:
        return b * b
    return (math.exp(-2.0 * d * b) + 2.0 * d * b - 1.0) / (2.0 * d * d)


def _lindley(start: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``S_t = max(0, S_{t-1} + y_t)`` for every row of ``y`` at once (closed form)."""
    c = np.cumsum(y, axis=0)
    c += start
    low = np.minimum.accumulate(c, axis=0)
    np.minimum(low, 0.0, out=low)
    c -= low
    return c


class _MeanShiftDetector(ABC):
    """Shared machinery: input checks, standardization, alarm splitting and bookkeeping."""

    name = "detector"

    def __init__(self, mean: ArrayLike, std: ArrayLike, threshold: float, min_events: int,
                 warmup: int = 0, max_inflation: float = 400.0) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if warmup and warmup < 30:
            raise ValueError(f"warmup must be 0 or >= 30 (to estimate autocorrelation), got {warmup}")
        if not max_inflation >= 1:
            raise ValueError(f"max_inflation must be >= 1, got {max_inflation}")
        mean_a = np.atleast_1d(np.asarray(mean, dtype=np.float64)).copy()
        std_a = np.atleast_1d(np.asarray(std, dtype=np.float64)).copy()
        if mean_a.ndim != 1 or mean_a.shape != std_a.shape or mean_a.size == 0:
            raise ValueError("mean and std must be 1-D arrays of the same non-zero length")
        if not (np.isfinite(mean_a).all() and np.isfinite(std_a).all()):
            raise ValueError("mean and std must be finite")
        if (std_a < 0).any():
            raise ValueError("std must be >= 0")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if min_events < 1:
            raise ValueError(f"min_events must be >= 1, got {min_events}")
        # A constant reference feature has std 0: scale 1 keeps any live variation visible.
        std_a[std_a == 0] = 1.0
        self._mean = mean_a
        self._inv_std = 1.0 / std_a
        self.threshold = float(threshold)
        self.min_events = int(min_events)
        self.warmup = int(warmup)
        self.max_inflation = float(max_inflation)
        self._inflation = np.ones(mean_a.size)
        # Standardized warm-up rows, kept until `warmup` of them estimate the autocorrelation.
        self._warm: np.ndarray | None = np.empty((0, mean_a.size)) if warmup else None
        self._n_seen = 0
        self._rejected = 0
        self._alarms_total = 0
        self._last: tuple[Alarm, ...] = _EMPTY
        self._reset(np.ones(mean_a.size, dtype=bool))

    # -- state -------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Number of features (columns) watched."""
        return int(self._mean.size)

    @property
    def n_seen(self) -> int:
        """Accepted events so far (rows with a non-finite value are rejected, not counted)."""
        return self._n_seen

    @property
    def rejected(self) -> int:
        """Rows rejected because a value was NaN or infinite."""
        return self._rejected

    @property
    def alarms_total(self) -> int:
        """Alarms raised since the detector was built."""
        return self._alarms_total

    @property
    def drift_detected(self) -> bool:
        """Whether the last :meth:`update` raised at least one alarm."""
        return bool(self._last)

    @property
    def warming_up(self) -> bool:
        """Whether the detector is still collecting its warm-up events (no alarms yet)."""
        return self._warm is not None

    @property
    def inflation(self) -> np.ndarray:
        """Long-run variance inflation per feature from the warm-up (1 = independent values)."""
        return self._inflation.copy()

    @property
    def statistic(self) -> np.ndarray:
        """Current test statistic per feature (the larger of both sides)."""
        return self._s.max(axis=0)

    def reset(self) -> None:
        """Forget the accumulated evidence of every feature (counters are kept)."""
        self._reset(np.ones(self.n_features, dtype=bool))

    def _reset(self, mask: np.ndarray) -> None:
        if not hasattr(self, "_s"):
            f = self.n_features
            self._s = np.zeros((2, f))  # row 0: upward side, row 1: downward side
            self._since = np.zeros(f, dtype=np.int64)
        self._s[:, mask] = 0.0
        self._since[mask] = 0

    # -- update ------------------------------------------------------------------------
    def update(self, values: ArrayLike) -> tuple[Alarm, ...]:
        """Feed one event (shape ``(F,)``) or a batch (shape ``(b, F)``) in time order.

        Rows holding a NaN or infinite value are rejected (counted in :attr:`rejected`) so
        they cannot poison the running sums.

        Returns
        -------
        tuple of Alarm
            Alarms raised by these events, in event order (empty when none).

        Raises
        ------
        InvalidInput
            ``values`` is not numeric or does not have ``n_features`` columns.
        """
        try:
            x = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput("values must be numeric", field="values") from None
        f = self.n_features
        if x.ndim == 1 and x.shape[0] == f and self._warm is None:
            if not np.isfinite(x).all():
                self._rejected += 1
                self._last = _EMPTY
                return _EMPTY
            z = (x - self._mean) * self._inv_std
            self._last = self._update_one(z)
            return self._last
        if x.ndim == 1 and x.shape[0] == f:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != f:
            raise InvalidInput(f"values must have shape ({f},) or (n, {f}), got {x.shape}",
                               field="values")
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            self._rejected += int((~ok).sum())
            x = x[ok]
        z = (x - self._mean) * self._inv_std
        if self._warm is not None:
            z = self._warm_up(z)
        alarms: list[Alarm] = []
        start = 0
        b = z.shape[0]
        while start < b:
            # _scan commits state up to its first alarm row (or the end of the chunk) and
            # reports it; chunks bound the rows recomputed after an alarm.
            used, found = self._scan(z[start: start + _CHUNK])
            alarms.extend(found)
            start += used
        self._last = tuple(alarms)
        return self._last

    def _warm_up(self, z: np.ndarray) -> np.ndarray:
        """Collect warm-up rows; once complete, rescale by the long-run variance.

        Returns the rows left to process (already rescaled), empty while warming up.
        """
        assert self._warm is not None
        take = min(self.warmup - self._warm.shape[0], z.shape[0])
        self._warm = np.concatenate([self._warm, z[:take]])
        self._n_seen += take  # warm-up events count in the event index, without alarms
        if self._warm.shape[0] < self.warmup:
            return z[:0]
        w = self._warm - self._warm.mean(axis=0)
        var = (w * w).mean(axis=0)
        cov = (w[1:] * w[:-1]).sum(axis=0) / w.shape[0]
        rho = np.divide(cov, var, out=np.zeros_like(var), where=var > 0)
        # Correct only a clearly positive lag-1 autocorrelation (beyond 3 standard errors of
        # an estimate from independent values, so independent features are left alone with
        # 99.9 % probability): AR(1) long-run variance (1+rho)/(1-rho).
        rho = np.where(rho > 3.0 / np.sqrt(self.warmup), np.minimum(rho, 0.999999), 0.0)
        self._inflation = np.clip((1.0 + rho) / (1.0 - rho), 1.0, self.max_inflation)
        scale = 1.0 / np.sqrt(self._inflation)
        self._inv_std = self._inv_std * scale
        self._warm = None
        return z[take:] * scale

    def _alarm_rows(self, stat: np.ndarray, since: np.ndarray | None) -> np.ndarray:
        """Boolean (b, F) matrix of threshold crossings (stat: (b, 2, F)) allowed to alarm."""
        fire = stat.max(axis=1) > self.threshold
        if self.min_events > 1 and since is not None:
            fire &= since >= self.min_events
        return fire

    def _commit_alarms(self, row_index: int, fire: np.ndarray, s: np.ndarray) -> tuple[Alarm, ...]:
        """Record alarms of one event (``fire`` over features, ``s`` (2, F)) and reset them."""
        out = []
        for j in np.flatnonzero(fire):
            up, dn = float(s[0, j]), float(s[1, j])
            out.append(Alarm(row_index, int(j), "up" if up >= dn else "down", max(up, dn),
                             self.threshold))
        self._alarms_total += len(out)
        self._reset(fire)
        return tuple(out)

    @abstractmethod
    def _update_one(self, z: np.ndarray) -> tuple[Alarm, ...]:
        """Advance by one standardized event; return its alarms."""

    @abstractmethod
    def _scan(self, z: np.ndarray) -> tuple[int, tuple[Alarm, ...]]:
        """Advance over a chunk up to its first alarm row; return (rows used, alarms)."""


class CusumDetector(_MeanShiftDetector):
    """Two-sided tabular CUSUM of standardized values against the reference mean.

    Parameters
    ----------
    mean, std
        Reference mean and standard deviation per feature (std 0 is treated as 1).
    k
        Allowance in standard deviations (half the shift to detect fastest).
    h
        Decision threshold in standard deviations; see the module notes for the ARL.
    warmup
        Live events used first to estimate autocorrelation (0: assume independence); see
        the module notes.
    max_inflation
        Cap of the long-run variance inflation applied after the warm-up.

    Raises
    ------
    ValueError
        Shapes differ, non-finite reference, ``k < 0``, ``h <= 0``, ``0 < warmup < 30`` or
        ``max_inflation < 1``.

    Examples
    --------
    >>> rng = np.random.default_rng(12345)
    >>> det = CusumDetector(mean=[0.0, 0.0], std=[1.0, 1.0], k=0.5, h=16.0)
    >>> calm = rng.normal(size=(5000, 2))
    >>> det.update(calm)
    ()
    >>> shifted = rng.normal(size=(200, 2)) + [0.0, 1.0]
    >>> alarm = det.update(shifted)[0]
    >>> alarm.feature, alarm.side, alarm.index - 5000 + 1
    (1, 'up', 13)
    """

    name = "cusum"

    def __init__(self, mean: ArrayLike, std: ArrayLike, k: float = 0.5, h: float = 16.0,
                 warmup: int = 0, max_inflation: float = 400.0) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = float(k)
        super().__init__(mean, std, threshold=h, min_events=1, warmup=warmup,
                         max_inflation=max_inflation)

    def _update_one(self, z: np.ndarray) -> tuple[Alarm, ...]:
        s = self._s
        s += z * _SIGNS
        s -= self.k
        np.maximum(s, 0.0, out=s)
        self._since += 1
        index = self._n_seen
        self._n_seen += 1
        if s.max() > self.threshold:
            return self._commit_alarms(index, s.max(axis=0) > self.threshold, s.copy())
        return _EMPTY

    def _scan(self, z: np.ndarray) -> tuple[int, tuple[Alarm, ...]]:
        y = z[:, None, :] * _SIGNS
        y -= self.k
        s = _lindley(self._s, y)  # (b, 2, F)
        fire = self._alarm_rows(s, None)  # min_events is 1: no gating
        any_row = fire.any(axis=1)
        b = z.shape[0]
        r = int(any_row.argmax()) if any_row.any() else b - 1
        self._s = s[r].copy()
        self._since += r + 1
        index = self._n_seen + r
        self._n_seen += r + 1
        if not any_row[r]:
            return b, _EMPTY
        return r + 1, self._commit_alarms(index, fire[r], s[r])


class PageHinkleyDetector(_MeanShiftDetector):
    """Two-sided Page-Hinkley test of standardized values against their running mean.

    Per feature, since the last reset: running mean ``mu_t`` of the standardized values,
    ``S_up = max(0, S_up + z_t - mu_t - delta)`` and ``S_down = max(0, S_down + mu_t - z_t -
    delta)`` (equivalently ``m_t - min_s m_s`` with ``m_t`` the cumulative deviation); alarm
    when either exceeds ``threshold`` once ``min_events`` values were seen, then reset.

    Parameters
    ----------
    mean, std
        Reference mean and standard deviation per feature, used to standardize (std 0 -> 1).
    delta
        Allowance (magnitude of tolerated change) in reference standard deviations.
    threshold
        Decision threshold (lambda) in reference standard deviations.
    min_events
        Events since the last reset before an alarm may be raised (the running mean needs a
        few values to mean anything).
    warmup, max_inflation
        As for :class:`CusumDetector`.

    Raises
    ------
    ValueError
        Shapes differ, non-finite reference, ``delta < 0``, ``threshold <= 0``,
        ``min_events < 1``, ``0 < warmup < 30`` or ``max_inflation < 1``.

    Examples
    --------
    >>> rng = np.random.default_rng(12345)
    >>> det = PageHinkleyDetector(mean=[0.0] * 5, std=[1.0] * 5, delta=0.5, threshold=16.0)
    >>> stream = rng.normal(size=(20_000, 5))
    >>> stream[10_000:, 2] += 1.0  # 1-sigma shift of feature 2 at event 10,000
    >>> alarms = det.update(stream)
    >>> [(a.index, a.feature, a.side) for a in alarms][:1]
    [(10030, 2, 'up')]
    """

    name = "page_hinkley"

    def __init__(self, mean: ArrayLike, std: ArrayLike, delta: float = 0.5,
                 threshold: float = 16.0, min_events: int = 30, warmup: int = 0,
                 max_inflation: float = 400.0) -> None:
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        self.delta = float(delta)
        super().__init__(mean, std, threshold=threshold, min_events=min_events, warmup=warmup,
                         max_inflation=max_inflation)

    def _reset(self, mask: np.ndarray) -> None:
        super()._reset(mask)
        if not hasattr(self, "_total"):
            self._total = np.zeros(self.n_features)
        self._total[mask] = 0.0  # sum of standardized values since the reset

    @property
    def running_mean(self) -> np.ndarray:
        """Running mean of the standardized values since each feature's last reset."""
        return np.where(self._since > 0, self._total / np.maximum(self._since, 1), 0.0)

    def _update_one(self, z: np.ndarray) -> tuple[Alarm, ...]:
        self._since += 1
        self._total += z
        s = self._s
        s += (z - self._total / self._since) * _SIGNS
        s -= self.delta
        np.maximum(s, 0.0, out=s)
        index = self._n_seen
        self._n_seen += 1
        if s.max() > self.threshold:
            fire = (s.max(axis=0) > self.threshold) & (self._since >= self.min_events)
            if fire.any():
                return self._commit_alarms(index, fire, s.copy())
        return _EMPTY

    def _scan(self, z: np.ndarray) -> tuple[int, tuple[Alarm, ...]]:
        b = z.shape[0]
        since = self._since + np.arange(1, b + 1, dtype=np.int64)[:, None]
        total = np.cumsum(z, axis=0)
        total += self._total
        y = (z - total / since)[:, None, :] * _SIGNS
        y -= self.delta
        s = _lindley(self._s, y)  # (b, 2, F)
        fire = self._alarm_rows(s, since)
        any_row = fire.any(axis=1)
        r = int(any_row.argmax()) if any_row.any() else b - 1
        self._s = s[r].copy()
        self._since = since[r].copy()
        self._total = total[r].copy()
        index = self._n_seen + r
        self._n_seen += r + 1
        if not any_row[r]:
            return b, _EMPTY
        return r + 1, self._commit_alarms(index, fire[r], s[r])


def make_detector(kind: str, mean: ArrayLike, std: ArrayLike, *, ph_delta: float,
                  ph_threshold: float, ph_min_events: int, cusum_k: float, cusum_h: float,
                  warmup: int = 0, max_inflation: float = 400.0
                  ) -> PageHinkleyDetector | CusumDetector:
    """Build the detector named by ``drift.detector`` with its configured parameters.

    Raises
    ------
    ValueError
        ``kind`` is neither ``"page_hinkley"`` nor ``"cusum"``.
    """
    if kind == "page_hinkley":
        return PageHinkleyDetector(mean, std, delta=ph_delta, threshold=ph_threshold,
                                   min_events=ph_min_events, warmup=warmup,
                                   max_inflation=max_inflation)
    if kind == "cusum":
        return CusumDetector(mean, std, k=cusum_k, h=cusum_h, warmup=warmup,
                             max_inflation=max_inflation)
    raise ValueError(f"unknown detector {kind!r}: expected 'page_hinkley' or 'cusum'")
