"""The one feature definition: offline (vectorized over history) and its shared kernels.

Every feature of a bar ``t`` uses only bars ``<= t``. The serving path
(:class:`tickcast.features.online.OnlineFeatures`) calls the very same kernels defined here on
one window at a time, so training and serving agree to the last bit, not by luck.

Gaps and imputed bars
---------------------
Bars are placed on the full time grid (one slot per ``freq_ns``). A slot is *valid* when a
bar is present, is not imputed (``imputed == ""``) and has a finite positive close. Then:

* a log return is NaN when either end is invalid;
* a window containing an invalid slot gives NaN (XGBoost treats NaN as missing);
* the recursive indicators (RSI, MACD) restart after an invalid slot and stay NaN until they
  have seen as many valid inputs as their seed needs;
* labels are NaN when the bar itself or any bar in ``(t, t + h]`` is invalid, so imputed bars
  and bars inside gaps never become training targets.

The time before the first bar counts as a gap: features warm up from the first bar on.

Trading sessions
----------------
A market closure is a run of grid slots with no bar, so it cuts every window exactly as a gap
does: a return across a close (Friday's last bar to Sunday's first) is NaN, not a one-bar
return; a label never spans a closure; the first bar after an open warms up like the first bar
after a gap (``minutes_since_gap`` restarts at 1). Given the asset's
:class:`~tickcast.market.calendar.TradingCalendar`, a bar whose slot lies outside every session
(a stray print during a closure, or history stored before the calendar was configured) is
invalid, like an imputed bar, so it cannot bridge a closure either. The online path takes the
same calendar and treats such a bar the same way.

Features (``feature_names(cfg)``, in this order)
------------------------------------------------
``ret_<k>``
    log(close_t / close_{t-k}) for each ``k`` in ``return_lags``.
``rv_short``, ``rv_long``
    realized volatility sqrt(mean(r^2)) of the one-bar log returns r over ``vol_short`` /
    ``vol_long`` bars (per-bar scale, not annualized).
``rv_ratio``
    rv_short / rv_long (1.0 when both are 0: no movement at all).
``momentum``
    sum(r) / sqrt(sum(r^2)) over ``momentum`` bars: the trend's signed strength in units of
    its own noise, bounded by +-sqrt(momentum) (0.0 when the price did not move).
``rsi``
    Wilder's RSI (0..100) of the one-bar log returns; averages seeded by the simple mean of
    the first ``rsi`` gains/losses, then smoothed with step 1/rsi; 50 when nothing moved.
``macd``, ``macd_signal``, ``macd_hist``
    (EMA_fast(close) - EMA_slow(close)) / close, its EMA_signal, and their difference; EMAs
    step 2/(n+1), seeded by the simple mean of their first n inputs.
``volume_z``
    z-score of log(1 + volume) of the bar against the ``volume_z`` bars ending at it
    (sample std, ddof=1; 0.0 when all volumes are equal).
``vwap_dev``
    log(close / vwap) of the bar.
``confidence_bp``, ``providers``
    the consensus bar's confidence (bp of price) and provider count.
``minutes_since_gap``
    consecutive valid bars ending at t (0 on an invalid bar), capped at ``gap_age_cap``
    (counted in bars; one bar is one minute on the default grid).
``tod_sin``, ``tod_cos``
    time of day of the bar's open on a 1440-minute circle.

A bar's "current value" features (``vwap_dev``, ``confidence_bp``, ``providers``) are NaN on
an imputed bar: an imputed bar is treated as missing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter

from tickcast.config import FeatureConfig, Settings
from tickcast.errors import InvalidInput
from tickcast.ticks import NS_PER_MIN

if TYPE_CHECKING:  # the calendar module imports config only; kept out of import time here
    from tickcast.market.calendar import TradingCalendar

# Bump when the meaning of a feature changes without its name or config changing.
FEATURE_VERSION = 1
MINUTES_PER_DAY = 1440
REQUIRED_COLUMNS: tuple[str, ...] = ("ts", "close")
OPTIONAL_COLUMNS: tuple[str, ...] = ("volume", "vwap", "confidence", "providers", "imputed")
# Rows of windows gathered at once by the offline path (bounds memory on long histories).
_CHUNK_ROWS = 1 << 16
# Config keys that do not change any feature value (kept out of the schema hash).
_OPERATIONAL_KEYS = frozenset({"amend_depth"})

# Time-of-day lookup tables: both paths index the same precomputed values (bit-identical).
_TOD_ANGLE = 2.0 * np.pi * np.arange(MINUTES_PER_DAY, dtype=np.float64) / MINUTES_PER_DAY
TOD_SIN: np.ndarray = np.sin(_TOD_ANGLE)
TOD_COS: np.ndarray = np.cos(_TOD_ANGLE)


def resolve_config(cfg: FeatureConfig | Settings | None) -> FeatureConfig:
    """Accept a :class:`FeatureConfig`, a whole :class:`Settings` or None (defaults)."""
    if cfg is None:
        return FeatureConfig()
    if isinstance(cfg, Settings):
        return cfg.features
    if isinstance(cfg, FeatureConfig):
        return cfg
    raise InvalidInput(f"feature config must be FeatureConfig or Settings, got {type(cfg).__name__}",
                       field="cfg")


def feature_names(cfg: FeatureConfig | Settings | None = None) -> tuple[str, ...]:
    """Ordered feature names for a config.

    Examples
    --------
    >>> feature_names()[:3], len(feature_names())
    (('ret_1', 'ret_2', 'ret_3'), 22)
    """
    c = resolve_config(cfg)
    return (
        *(f"ret_{k}" for k in c.return_lags),
        "rv_short", "rv_long", "rv_ratio", "momentum", "rsi",
        "macd", "macd_signal", "macd_hist", "volume_z", "vwap_dev",
        "confidence_bp", "providers", "minutes_since_gap", "tod_sin", "tod_cos",
    )


FEATURE_NAMES: tuple[str, ...] = feature_names()
"""Names under the default config. Use :func:`feature_names` for a non-default config."""


def schema_hash(cfg: FeatureConfig | Settings | None = None) -> str:
    """Stable 16-hex-digit hash of the names, their order, the value-affecting config and
    :data:`FEATURE_VERSION`. A model trained on one schema must not be served another."""
    c = resolve_config(cfg)
    params = {k: v for k, v in c.model_dump(mode="json").items() if k not in _OPERATIONAL_KEYS}
    blob = json.dumps({"version": FEATURE_VERSION, "names": list(feature_names(c)),
                       "config": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lookback(cfg: FeatureConfig) -> int:
    """Grid slots a feature row can depend on (buffer length of the online path)."""
    return max(max(cfg.return_lags) + 1, cfg.vol_long + 1, cfg.momentum + 1, cfg.volume_z)


# --------------------------------------------------------------------------------------------
# Kernels shared by the offline and online paths. They take 2-D windows (rows x window) and
# return one value per row; the online path passes a single (1, n) row. Sums run strictly left
# to right over the window so both paths round identically.
# --------------------------------------------------------------------------------------------

def seq_sum(w: np.ndarray) -> np.ndarray:
    """Row sums accumulated column by column, left to right (deterministic rounding).

    A single row (the online path) is summed with Python floats: the same IEEE-754 double
    additions in the same order, without the per-call overhead of 1-element numpy arrays.
    """
    if w.shape[0] == 1:
        vals = w[0].tolist()
        total = vals[0]
        for v in vals[1:]:
            total += v
        return np.array([total], dtype=np.float64)
    acc = np.array(w[:, 0], dtype=np.float64, copy=True)
    for j in range(1, w.shape[1]):
        acc = acc + w[:, j]
    return acc


def k_realized_vol(r: np.ndarray) -> np.ndarray:
    """sqrt(mean(r^2)) per row."""
    return np.sqrt(seq_sum(r * r) / r.shape[1])


def k_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den; 1.0 where both are 0 (no movement in either window)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where((num == 0.0) & (den == 0.0), 1.0, out)


def k_momentum(r: np.ndarray) -> np.ndarray:
    """sum(r) / sqrt(sum(r^2)) per row; 0.0 where nothing moved."""
    s = seq_sum(r)
    q = seq_sum(r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = s / np.sqrt(q)
    return np.where(q == 0.0, 0.0, out)


def k_zscore_last(x: np.ndarray) -> np.ndarray:
    """z-score of each row's last value against the row (two-pass mean/var, ddof=1)."""
    n = x.shape[1]
    mean = seq_sum(x) / n
    d = x - mean[:, None]
    var = seq_sum(d * d) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (x[:, -1] - mean) / np.sqrt(var)
    return np.where(var == 0.0, 0.0, out)


def k_rsi(avg_gain: np.ndarray, avg_loss: np.ndarray) -> np.ndarray:
    """100 * gain / (gain + loss); 50 where both are 0."""
    tot = avg_gain + avg_loss
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 100.0 * avg_gain / tot
    return np.where(tot == 0.0, 50.0, out)


def ema_alpha(n: int) -> float:
    """EMA step of an n-period EMA (2 / (n + 1))."""
    return 2.0 / (n + 1.0)


def wilder_alpha(n: int) -> float:
    """Wilder's smoothing step (1 / n)."""
    return 1.0 / n


def seeded_ema(x: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """EMA restarted at every non-finite input, seeded by the mean of its first ``n`` inputs.

    ``y = alpha * x + (1 - alpha) * y_prev`` after the seed; NaN before it. Runs of finite
    values are filtered with :func:`scipy.signal.lfilter`, whose first-order recursion performs
    the same two products and one sum as :class:`tickcast.features.online.SeededEMA`.

    Examples
    --------
    >>> seeded_ema(np.array([1.0, 2.0, 3.0, np.nan, 4.0, 5.0, 6.0]), 2, 0.5).tolist()
    [nan, 1.5, 2.25, nan, nan, 4.5, 5.25]
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape[0], np.nan)
    fin = np.isfinite(x).astype(np.int8)
    edges = np.diff(np.concatenate(([0], fin, [0])))
    c = 1.0 - alpha
    for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        if e - s < n:
            continue
        seed = math.fsum(x[s:s + n].tolist()) / n
        out[s + n - 1] = seed
        if e > s + n:
            out[s + n:e] = lfilter([alpha], [1.0, -c], x[s + n:e], zi=[c * seed])[0]
    return out


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------

def is_imputed(value: Any) -> bool:
    """True when an ``imputed`` value names a method (None/NaN/"" mean a real bar)."""
    return isinstance(value, str) and value != ""


def imputed_mask(values: Any) -> np.ndarray:
    """:func:`is_imputed` over a column."""
    return np.fromiter((is_imputed(v) for v in values), dtype=bool, count=len(values))


def off_session(ts: np.ndarray, freq_ns: int, calendar: "TradingCalendar | None") -> np.ndarray:
    """Bars whose slot lies outside every session of ``calendar`` (none without one)."""
    if calendar is None or calendar.always_open:
        return np.zeros(len(ts), dtype=bool)
    return ~calendar.expected_bars(np.asarray(ts, dtype=np.int64), int(freq_ns))


def _prepare(bars: pd.DataFrame, freq_ns: int,
             calendar: "TradingCalendar | None" = None) -> dict[str, np.ndarray]:
    """Validate a bar frame and return sorted numpy columns (optional columns NaN-filled).

    ``imputed`` is True for every bar that is not a real in-session bar (imputed, or outside
    the calendar's sessions)."""
    if not isinstance(bars, pd.DataFrame):
        raise InvalidInput(f"bars must be a pandas DataFrame, got {type(bars).__name__}", field="bars")
    if not isinstance(freq_ns, (int, np.integer)) or freq_ns <= 0:
        raise InvalidInput(f"freq_ns must be a positive integer, got {freq_ns!r}", field="freq_ns")
    for col in REQUIRED_COLUMNS:
        if col not in bars.columns:
            raise InvalidInput(f"bars lacks column '{col}'", field=col)
    ts_raw = bars["ts"]
    if not pd.api.types.is_integer_dtype(ts_raw.dtype) or bool(ts_raw.isna().any()):
        raise InvalidInput(f"bars.ts must be int64 UNIX ns without nulls, got dtype {ts_raw.dtype}",
                           field="ts")
    ts = ts_raw.to_numpy(dtype=np.int64)
    if len(ts) and np.any(ts % freq_ns != 0):
        bad = int(ts[np.flatnonzero(ts % freq_ns != 0)[0]])
        raise InvalidInput(f"bars.ts {bad} is not on the {freq_ns} ns grid", field="ts")
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    if len(ts) > 1 and np.any(np.diff(ts) == 0):
        dup = int(ts[np.flatnonzero(np.diff(ts) == 0)[0]])
        raise InvalidInput(f"bars.ts {dup} appears more than once", field="ts")
    out: dict[str, np.ndarray] = {"ts": ts}
    for col in ("close", "volume", "vwap", "confidence", "providers"):
        if col not in bars.columns:
            out[col] = np.full(len(ts), np.nan)
            continue
        try:
            out[col] = pd.to_numeric(bars[col], errors="raise").to_numpy(dtype=np.float64)[order]
        except (TypeError, ValueError):
            raise InvalidInput(f"bars.{col} must be numeric", field=col) from None
    out["imputed"] = (imputed_mask(bars["imputed"].to_numpy())[order] if "imputed" in bars.columns
                      else np.zeros(len(ts), dtype=bool))
    out["imputed"] |= off_session(ts, freq_ns, calendar)
    return out


def _grid_positions(ts: np.ndarray, freq_ns: int, max_missing: int) -> np.ndarray:
    """Grid slot of each (sorted) bar; gaps longer than ``max_missing`` slots are shortened to
    ``max_missing`` because nothing can look further back (keeps memory bounded)."""
    if len(ts) == 0:
        return np.zeros(0, dtype=np.int64)
    steps = np.minimum(np.diff(ts) // freq_ns, max_missing + 1)
    return np.concatenate(([0], np.cumsum(steps))).astype(np.int64)


def _valid_run(valid: np.ndarray) -> np.ndarray:
    """Consecutive valid slots ending at each slot (0 on an invalid slot; before start = gap)."""
    idx = np.arange(valid.shape[0], dtype=np.int64)
    last_invalid = np.maximum.accumulate(np.where(valid, -1, idx))
    return idx - last_invalid


def _windows(x: np.ndarray, n: int) -> tuple[np.ndarray, slice]:
    """Sliding windows of length n (rows x n) and the slice of slots they end at."""
    if x.shape[0] < n:
        return np.empty((0, n)), slice(0, 0)
    return sliding_window_view(x, n), slice(n - 1, x.shape[0])


def compute_features(bars: pd.DataFrame, cfg: FeatureConfig | Settings | None = None,
                     freq_ns: int = NS_PER_MIN,
                     calendar: "TradingCalendar | None" = None) -> pd.DataFrame:
    """Features of every bar, vectorized over the whole history.

    Parameters
    ----------
    bars
        Consensus bars (bar schema; ``ts`` and ``close`` required, ``volume vwap confidence
        providers imputed`` optional). Any order; gaps allowed.
    cfg
        Feature config (or whole Settings).
    freq_ns
        Bar spacing (``bars.freq_s`` in ns).
    calendar
        The asset's trading calendar: bars outside its sessions count as invalid (see the
        module notes). None: every slot is in session.

    Returns
    -------
    pandas.DataFrame
        Index ``ts`` (the input bars' ts, sorted), columns :func:`feature_names`, float64.

    Raises
    ------
    InvalidInput
        Missing column, non-integer or off-grid or duplicate ``ts``, non-numeric values.
    """
    c = resolve_config(cfg)
    names = feature_names(c)
    col = _prepare(bars, freq_ns, calendar)
    ts = col["ts"]
    n_bars = ts.shape[0]
    if n_bars == 0:
        return pd.DataFrame(np.empty((0, len(names))), columns=list(names),
                            index=pd.Index(ts, name="ts"))
    W = lookback(c)
    pos = _grid_positions(ts, freq_ns, W)
    G = int(pos[-1]) + 1

    close = col["close"]
    valid_bar = ~col["imputed"] & np.isfinite(close) & (close > 0)
    valid = np.zeros(G, dtype=bool)
    valid[pos] = valid_bar
    close_g = np.full(G, np.nan)
    close_g[pos[valid_bar]] = close[valid_bar]
    logc = np.full(G, np.nan)
    logc[pos[valid_bar]] = np.log(close[valid_bar])
    vol = col["volume"]
    vol_ok = valid_bar & np.isfinite(vol) & (vol >= 0)
    lvol = np.full(G, np.nan)
    lvol[pos[vol_ok]] = np.log1p(vol[vol_ok])
    r1 = np.full(G, np.nan)
    r1[1:] = logc[1:] - logc[:-1]
    run = _valid_run(valid)

    # One output block, filled column by column (no per-feature grid arrays kept alive).
    block = np.empty((n_bars, len(names)), dtype=np.float64)
    col_index = {name: j for j, name in enumerate(names)}

    def put(name: str, grid_values: np.ndarray) -> None:
        block[:, col_index[name]] = grid_values[pos]

    for k in c.return_lags:
        out = np.full(G, np.nan)
        if G > k:
            out[k:] = logc[k:] - logc[:-k]
        put(f"ret_{k}", np.where(run >= k + 1, out, np.nan))

    def windowed(x: np.ndarray, n: int, need: int, kernel: Any) -> np.ndarray:
        out = np.full(G, np.nan)
        w, sl = _windows(x, n)
        ok = run[sl] >= need
        vals = np.full(w.shape[0], np.nan)
        # Compute only where the window is fully valid (the kernel never sees a gap), in row
        # chunks so the gathered windows stay small on long histories.
        for start in range(0, w.shape[0], _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            sel = ok[part]
            if sel.any():
                chunk = vals[part]
                chunk[sel] = kernel(w[part][sel])
        out[sl] = vals
        return out

    rv_s = windowed(r1, c.vol_short, c.vol_short + 1, k_realized_vol)
    rv_l = windowed(r1, c.vol_long, c.vol_long + 1, k_realized_vol)
    put("rv_short", rv_s)
    put("rv_long", rv_l)
    put("rv_ratio", k_ratio(rv_s, rv_l))
    put("momentum", windowed(r1, c.momentum, c.momentum + 1, k_momentum))

    gain = np.maximum(r1, 0.0)
    loss = np.maximum(-r1, 0.0)
    a = wilder_alpha(c.rsi)
    put("rsi", k_rsi(seeded_ema(gain, c.rsi, a), seeded_ema(loss, c.rsi, a)))

    fast, slow, sig = c.macd
    ema_f = seeded_ema(close_g, fast, ema_alpha(fast))
    ema_s = seeded_ema(close_g, slow, ema_alpha(slow))
    line = (ema_f - ema_s) / close_g
    signal = seeded_ema(line, sig, ema_alpha(sig))
    put("macd", line)
    put("macd_signal", signal)
    put("macd_hist", line - signal)

    put("volume_z", windowed(lvol, c.volume_z, c.volume_z, k_zscore_last))

    # Per-bar features are computed on the bars themselves, not on the grid.
    vwap = col["vwap"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_vwap = np.where(np.isfinite(vwap) & (vwap > 0), np.log(np.where(vwap > 0, vwap, 1.0)), np.nan)
    per_bar = {
        "vwap_dev": np.where(valid_bar, logc[pos] - log_vwap, np.nan),
        "confidence_bp": np.where(valid_bar, col["confidence"], np.nan),
        "providers": np.where(valid_bar, col["providers"], np.nan),
        "minutes_since_gap": np.minimum(run[pos], c.gap_age_cap).astype(np.float64),
    }
    minute = (ts // NS_PER_MIN) % MINUTES_PER_DAY
    per_bar["tod_sin"] = TOD_SIN[minute]
    per_bar["tod_cos"] = TOD_COS[minute]
    for name, values in per_bar.items():
        block[:, col_index[name]] = values
    return pd.DataFrame(block, columns=list(names), index=pd.Index(ts, name="ts"), copy=False)


def make_labels(bars: pd.DataFrame, horizon: int, freq_ns: int = NS_PER_MIN,
                calendar: "TradingCalendar | None" = None) -> pd.Series:
    """Log return of the next ``horizon`` bars: log(close_{t+h} / close_t).

    NaN when bar t or any bar in ``(t, t + h]`` is missing, imputed, outside the calendar's
    sessions or has a bad close, and for the last ``horizon`` bars (not realized yet). So a
    label never spans a market closure: the slots of a closure hold no bar.

    Parameters
    ----------
    bars
        Bar frame as for :func:`compute_features`.
    horizon
        Bars ahead (>= 1).
    freq_ns
        Bar spacing in ns.
    calendar
        The asset's trading calendar (None: every slot is in session).

    Returns
    -------
    pandas.Series
        Index ``ts`` (input bars, sorted), name ``label``.

    Examples
    --------
    >>> ts = np.arange(5, dtype=np.int64) * NS_PER_MIN
    >>> bars = pd.DataFrame({"ts": ts, "close": [100.0, 101.0, 102.0, 103.0, 104.0],
    ...                      "imputed": ["", "", "ffill", "", ""]})
    >>> make_labels(bars, 1).round(6).tolist()
    [0.00995, nan, nan, 0.009662, nan]
    """
    if not isinstance(horizon, (int, np.integer)) or isinstance(horizon, bool) or horizon < 1:
        raise InvalidInput(f"horizon must be an integer >= 1, got {horizon!r}", field="horizon")
    h = int(horizon)
    col = _prepare(bars, freq_ns, calendar)
    ts = col["ts"]
    if ts.shape[0] == 0:
        return pd.Series(np.empty(0), index=pd.Index(ts, name="ts"), name="label")
    pos = _grid_positions(ts, freq_ns, h + 1)
    G = int(pos[-1]) + 1
    close = col["close"]
    valid_bar = ~col["imputed"] & np.isfinite(close) & (close > 0)
    valid = np.zeros(G, dtype=bool)
    valid[pos] = valid_bar
    logc = np.full(G, np.nan)
    logc[pos[valid_bar]] = np.log(close[valid_bar])
    run = _valid_run(valid)
    lab = np.full(G, np.nan)
    if G > h:
        fwd = logc[h:] - logc[:-h]
        lab[:-h] = np.where(run[h:] >= h + 1, fwd, np.nan)
    return pd.Series(lab[pos], index=pd.Index(ts, name="ts"), name="label")
