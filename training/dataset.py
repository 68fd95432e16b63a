"""Bars → labeled feature rows, and the time splits training uses.

Rows are never shuffled. Every split is by time, and a *purge* of ``model.purge_bars`` bars
separates what a model learns from what it is judged on: a training row at ``t`` is kept only if
``t + (horizon + purge_bars) * freq <= first judged bar``. The horizon term keeps a training
label (which looks ``horizon`` bars ahead) out of the judged range; the purge term keeps the
features of judged rows (which look back up to an hour) from overlapping the last training
labels, so serial correlation cannot leak either way.

Walk-forward validation uses expanding windows: the fit range is cut into ``folds + 1``
consecutive chunks; fold ``k`` trains on chunks ``0..k`` (purged) and validates on chunk ``k+1``.
With expanding windows no training row ever comes after its validation rows, so an embargo
after the validation chunk is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tickcast.config import Settings
from tickcast.errors import InvalidInput
from tickcast.features.definitions import compute_features, feature_names, lookback, make_labels
from tickcast.features.definitions import schema_hash as feature_schema_hash
from tickcast.market.calendar import trading_calendar
from tickcast.storage.bar_store import BarStore


@dataclass(frozen=True)
class Dataset:
    """Labeled feature rows of one asset in time order.

    Attributes
    ----------
    ts
        Bar open time of each row (int64 UNIX ns), strictly increasing.
    features
        float32 ``[N, F]`` (NaN = missing; XGBoost and the ONNX model treat it so).
    labels
        float64 ``[N]``: log return over the next ``horizon`` bars.
    close
        float64 ``[N]``: close of the row's bar (for price-level reporting).
    feature_names
        Column names of ``features``, in order.
    schema_hash
        Feature schema hash the rows were computed with.
    """

    ts: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    close: np.ndarray
    feature_names: tuple[str, ...]
    schema_hash: str

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, idx: np.ndarray) -> "Dataset":
        """Rows ``idx`` (an index or boolean array) as a new dataset."""
        return Dataset(self.ts[idx], self.features[idx], self.labels[idx], self.close[idx],
                       self.feature_names, self.schema_hash)

    def frame(self) -> pd.DataFrame:
        """Features as a DataFrame indexed by ``ts``."""
        return pd.DataFrame(self.features, columns=list(self.feature_names),
                            index=pd.Index(self.ts, name="ts"))

    @property
    def span(self) -> tuple[int, int]:
        """(first, last) row ts; (0, 0) when empty."""
        return (int(self.ts[0]), int(self.ts[-1])) if len(self) else (0, 0)


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold: row indices into a dataset."""

    train: np.ndarray
    val: np.ndarray


def freq_ns(settings: Settings) -> int:
    """Bar spacing in nanoseconds."""
    return int(settings.bars.freq_s) * 1_000_000_000


def parse_time(value: str | int | None, field: str) -> int | None:
    """ISO-8601 (``2023-03-08``, ``2023-03-08T00:00:00Z``; naive means UTC) or int ns → ns.

    Raises
    ------
    InvalidInput
        Unparseable value, naming ``field``.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        stamp = pd.Timestamp(str(value))
    except (ValueError, TypeError):
        raise InvalidInput(f"{field} {value!r} is not an ISO-8601 time", field=field) from None
    if pd.isna(stamp):
        raise InvalidInput(f"{field} {value!r} is not an ISO-8601 time", field=field)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.tz_convert("UTC").value)


def iso(ns: int) -> str:
    """UTC ISO-8601 of a ns timestamp (seconds precision)."""
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def bar_store(settings: Settings) -> BarStore:
    """The offline bar store of ``settings.data_dir`` (read-only use here)."""
    return BarStore(Path(settings.data_dir) / "bars", fsync=False)


def load_bars(settings: Settings, asset: str, start_ns: int | None = None,
              end_ns: int | None = None, realize_labels: bool = False) -> pd.DataFrame:
    """Consensus bars needed to build rows with ``start_ns <= ts < end_ns``.

    Reads ``lookback`` extra bars before ``start_ns`` so that the first rows have warm features
    and, with ``realize_labels``, ``horizon`` bars after ``end_ns`` so that the last rows have
    labels (used when judging a model on a range; never when training, where labels must stay
    inside the range).

    Raises
    ------
    InvalidInput
        Bad asset name or bounds (from the store).
    """
    f = freq_ns(settings)
    lo = None if start_ns is None else start_ns - (lookback(settings.features) + 1) * f
    hi = end_ns
    if end_ns is not None and realize_labels:
        hi = end_ns + settings.model.horizon * f
    return bar_store(settings).read(asset, "consensus", lo, hi)


def build_dataset(bars: pd.DataFrame, settings: Settings, start_ns: int | None = None,
                  end_ns: int | None = None, *, asset: str | None = None) -> Dataset:
    """Features (H5a's one definition) and labels for bars, rows restricted to the range.

    Rows without a finite label (last bars, imputed bars, bars next to gaps, and bars whose
    label would span a market closure) are dropped; rows whose features are partly NaN
    (warm-up, e.g. after an open) are kept. With ``asset``, its trading calendar
    (``calendars.<ASSET>``) marks bars outside its sessions invalid, as the features do.

    Raises
    ------
    InvalidInput
        No labeled rows in the range (``field="bars"``, with the counts).
    """
    f = freq_ns(settings)
    calendar = None if asset is None else trading_calendar(settings, asset)
    feats = compute_features(bars, settings.features, freq_ns=f, calendar=calendar)
    labels = make_labels(bars, settings.model.horizon, freq_ns=f, calendar=calendar)
    ts = feats.index.to_numpy(dtype=np.int64)
    keep = np.isfinite(labels.to_numpy(dtype=np.float64))
    if start_ns is not None:
        keep &= ts >= start_ns
    if end_ns is not None:
        keep &= ts < end_ns
    if not keep.any():
        where = f" in [{iso(start_ns) if start_ns else '-inf'}, {iso(end_ns) if end_ns else 'inf'})"
        raise InvalidInput(f"no labeled bars{where}: {len(bars)} bars read", field="bars")
    close_by_ts = bars.set_index("ts")["close"]
    names = feature_names(settings.features)
    return Dataset(
        ts=ts[keep],
        features=feats.to_numpy(dtype=np.float32)[keep],
        labels=labels.to_numpy(dtype=np.float64)[keep],
        close=close_by_ts.reindex(ts[keep]).to_numpy(dtype=np.float64),
        feature_names=tuple(names),
        schema_hash=feature_schema_hash(settings.features),
    )


def purge_before(train_ts: np.ndarray, first_judged_ts: int, horizon: int, purge_bars: int,
                 freq: int) -> np.ndarray:
    """Mask of training rows far enough before ``first_judged_ts`` (see module notes).

    Examples
    --------
    >>> purge_before(np.arange(10) * 60, 600, horizon=1, purge_bars=2, freq=60).tolist()
    [True, True, True, True, True, True, True, True, False, False]
    """
    return train_ts + (horizon + purge_bars) * freq <= first_judged_ts


def split_calibration(ds: Dataset, fraction: float, horizon: int, purge_bars: int,
                      freq: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, calibration rows): the last ``fraction`` of rows calibrate, the rest (purged)
    fit.

    Raises
    ------
    InvalidInput
        Too few rows for a calibration slice and a purged fit range.
    """
    n = len(ds)
    n_cal = int(round(n * fraction))
    if n_cal < 1 or n_cal >= n:
        raise InvalidInput(f"{n} rows cannot be split with calibration_fraction={fraction}",
                           field="model.calibration_fraction")
    cal = np.arange(n - n_cal, n)
    fit_mask = purge_before(ds.ts[: n - n_cal], int(ds.ts[n - n_cal]), horizon, purge_bars, freq)
    fit = np.flatnonzero(fit_mask)
    if len(fit) == 0:
        raise InvalidInput(f"no rows left to fit after purging {purge_bars} bars before the "
                           f"calibration slice ({n} rows)", field="model.purge_bars")
    return fit, cal


def walk_forward_folds(ts: np.ndarray, n_folds: int, horizon: int, purge_bars: int, freq: int,
                       min_rows: int = 50) -> list[Fold]:
    """Expanding-window folds over rows with times ``ts`` (sorted), purged.

    Parameters
    ----------
    ts
        Row times, increasing.
    n_folds
        Number of folds (``model.walk_forward_folds``).
    horizon, purge_bars, freq
        Label horizon (bars), purge (bars), bar spacing (ns).
    min_rows
        Smallest training or validation fold accepted.

    Raises
    ------
    InvalidInput
        Too few rows for the folds.

    Examples
    --------
    >>> folds = walk_forward_folds(np.arange(400) * 60, 3, 1, 5, 60, min_rows=10)
    >>> [(int(f.train[-1]), int(f.val[0]), int(f.val[-1])) for f in folds]
    [(94, 100, 199), (194, 200, 299), (294, 300, 399)]
    """
    n = len(ts)
    if n_folds < 1:
        raise InvalidInput("walk_forward_folds must be >= 1", field="model.walk_forward_folds")
    edges = np.linspace(0, n, n_folds + 2).round().astype(int)
    folds: list[Fold] = []
    for k in range(n_folds):
        val = np.arange(edges[k + 1], edges[k + 2])
        if len(val) < min_rows:
            raise InvalidInput(f"{n} rows are too few for {n_folds} walk-forward folds "
                               f"(validation fold of {len(val)} rows < {min_rows})",
                               field="model.walk_forward_folds")
        cand = np.arange(0, edges[k + 1])
        train = cand[purge_before(ts[cand], int(ts[val[0]]), horizon, purge_bars, freq)]
        if len(train) < min_rows:
            raise InvalidInput(f"fold {k}: {len(train)} training rows after purging "
                               f"{purge_bars} bars (< {min_rows})", field="model.purge_bars")
        folds.append(Fold(train=train, val=val))
    return folds
