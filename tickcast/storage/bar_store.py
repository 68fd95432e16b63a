"""Offline bar history on disk: Parquet files partitioned by asset, source and UTC day.

Layout::

    <root>/<asset>/<source>/<YYYY-MM-DD>.parquet     bars (BarStore)
    <gap root>/<asset>.parquet                       gap audit (GapAuditStore)
    <late root>/<asset>/<YYYY-MM-DD>.parquet         late ticks (LateTickStore)

``source`` is ``"consensus"`` or a provider name. Every write goes to a temporary file in the
same directory, is flushed (``fsync``) and then renamed over the old file with ``os.replace``,
which POSIX makes atomic: a reader, or a process restarted after a crash mid-write, sees either
the old file or the new one, never a torn one. Temporary files left by a crash start with a dot
and end in ``.tmp``; readers ignore them.

Upserts are idempotent on ``(asset, source, ts)``: a row whose ``ts`` is already stored
replaces it (new rows win), so replaying a tick log after a crash rewrites the same bars and
never doubles one. Replaying identical bars does not even rewrite the file.

Why Parquet files rather than DuckDB or SQLite: each asset has exactly one writer (its actor,
which may run on any node of a cluster) and many readers (training jobs, CLI). An embedded
database file takes a single-writer lock across processes and lives on one node; per-asset
day files need no lock (one owner per asset), are read by column for training, and are
shipped or listed with ordinary file tools.

One owner per asset: the store keeps the current day of each ``(asset, source)`` in memory so
that the actor's frequent small upserts (a few bars each) do not re-read the day file. The
cache is checked against the file's inode, size and modification time before use (one
``stat``), so a file replaced by another process is re-read rather than overwritten with stale
rows; two processes writing the same asset at the same moment would still race (last rename
wins), which is why an asset has one writer.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tickcast.errors import InvalidInput
from tickcast.ticks import TICK_COLUMNS, TickBatch

NS_PER_DAY = 86_400 * 1_000_000_000
CONSENSUS = "consensus"

# Column -> numpy dtype of the bar schema shared by consensus bars, provider bars and the store.
BAR_COLUMNS: dict[str, np.dtype] = {
    "ts": np.dtype(np.int64),  # UNIX ns of the bar open, UTC
    "open": np.dtype(np.float64),
    "high": np.dtype(np.float64),
    "low": np.dtype(np.float64),
    "close": np.dtype(np.float64),
    "volume": np.dtype(np.float64),
    "vwap": np.dtype(np.float64),
    "ticks": np.dtype(np.int64),
    "providers": np.dtype(np.int64),
    "confidence": np.dtype(np.float64),  # consensus confidence, bp of price; 0 for provider bars
    "imputed": np.dtype(object),  # "" for real bars, else the gap-fill method
}
FLOAT_COLUMNS = ("open", "high", "low", "close", "volume", "vwap", "confidence")
INT_COLUMNS = ("ts", "ticks", "providers")
PROVIDER_COLUMN = "provider"

BAR_ARROW_SCHEMA = pa.schema(
    [(name, pa.string() if name == "imputed" else pa.from_numpy_dtype(dt)) for name, dt in BAR_COLUMNS.items()]
)

AUDIT_COLUMNS: dict[str, np.dtype] = {
    "start": np.dtype(np.int64),  # first missing bar open (ns)
    "end": np.dtype(np.int64),  # last missing bar open (ns)
    "missing_minutes": np.dtype(np.float64),
    "method": np.dtype(object),  # ffill | interpolate | provider:<name> | excluded
    "filled": np.dtype(bool),
}
AUDIT_ARROW_SCHEMA = pa.schema(
    [("start", pa.int64()), ("end", pa.int64()), ("missing_minutes", pa.float64()),
     ("method", pa.string()), ("filled", pa.bool_())]
)

LATE_ARROW_SCHEMA = pa.schema(
    [("provider", pa.string())]
    + [(name, pa.from_numpy_dtype(dt)) for name, dt in TICK_COLUMNS.items() if name != "provider"]
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_DAY_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.parquet$")


# --------------------------------------------------------------------------------------------
# Validation at the edge
# --------------------------------------------------------------------------------------------


def check_name(value: object, field: str) -> str:
    """Return ``value`` if it is a safe path component (asset, source, provider name).

    Raises
    ------
    InvalidInput
        Not a string, empty, longer than 128 characters, or containing anything other than
        letters, digits, ``_``, ``.`` and ``-`` (a leading dot is refused too), so a name can
        never escape the store's directory.

    Examples
    --------
    >>> check_name("BTC-USD", "asset")
    'BTC-USD'
    >>> check_name("../etc", "asset")
    Traceback (most recent call last):
    ...
    tickcast.errors.InvalidInput: asset '../etc' is not a valid name (letters, digits, _ . -)
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidInput(f"{field} {value!r} is not a valid name (letters, digits, _ . -)", field=field)
    return value


def _string_array(series: pd.Series, column: str) -> np.ndarray:
    if isinstance(series.dtype, pd.StringDtype):
        # A string dtype holds only str or NA: checking for NA is enough (and vectorized).
        if series.isna().any():
            raise InvalidInput(f"column '{column}' must hold strings, found a missing value", field=column)
        return series.to_numpy(dtype=object)
    values = series.to_numpy(dtype=object)
    ok = np.fromiter((isinstance(v, str) for v in values), dtype=bool, count=len(values))
    if not ok.all():
        bad = values[~ok][0]
        raise InvalidInput(f"column '{column}' must hold strings, found {bad!r}", field=column)
    return values


def bar_columns(df: object, *, name: str = "bars") -> dict[str, np.ndarray]:
    """Validate a bar frame and return its schema columns as numpy arrays (coerced dtypes).

    Integer columns accept any integer dtype (and floats holding whole numbers for ``ticks`` /
    ``providers``); float columns accept any integer or float dtype. ``ts`` must be an integer
    dtype (a float cannot hold nanoseconds exactly) and non-negative. Extra columns are ignored.

    Raises
    ------
    InvalidInput
        Not a DataFrame, a missing column, or a column of the wrong dtype; ``field`` names the
        column.

    Examples
    --------
    >>> import pandas as pd
    >>> bar_columns(pd.DataFrame({"ts": [0.5]}))
    Traceback (most recent call last):
    ...
    tickcast.errors.InvalidInput: bar frame is missing column 'open'
    """
    if not isinstance(df, pd.DataFrame):
        raise InvalidInput(f"{name} must be a pandas DataFrame, got {type(df).__name__}", field=name)
    for column in BAR_COLUMNS:
        if column not in df.columns:
            raise InvalidInput(f"bar frame is missing column '{column}'", field=column)
    out: dict[str, np.ndarray] = {}
    for column in BAR_COLUMNS:
        series = df[column]
        kind = series.dtype.kind
        if column == "imputed":
            out[column] = _string_array(series, column)
        elif column == "ts":
            if kind not in "iu":
                raise InvalidInput(f"column 'ts' must be int64 UNIX ns, got {series.dtype}", field="ts")
            ts = series.to_numpy()
            if kind == "u" and len(ts) and ts.max() > np.iinfo(np.int64).max:
                raise InvalidInput("column 'ts' overflows int64", field="ts")
            ts = ts.astype(np.int64)
            if len(ts) and ts.min() < 0:
                raise InvalidInput("column 'ts' must be >= 0 (UNIX ns)", field="ts")
            out[column] = ts
        elif column in INT_COLUMNS:
            values = series.to_numpy()
            if kind == "f":
                if not (np.isfinite(values).all() and (values == np.round(values)).all()):
                    raise InvalidInput(f"column '{column}' must be int64, got non-integral floats", field=column)
            elif kind not in "iu":
                raise InvalidInput(f"column '{column}' must be int64, got {series.dtype}", field=column)
            out[column] = values.astype(np.int64)
        else:
            if kind not in "iuf":
                raise InvalidInput(f"column '{column}' must be float64, got {series.dtype}", field=column)
            out[column] = series.to_numpy().astype(np.float64)
    return out


def empty_bars(provider: str | None = None) -> pd.DataFrame:
    """An empty bar frame with the schema (plus ``provider`` for a provider source)."""
    df = _to_frame(BAR_ARROW_SCHEMA.empty_table())
    if provider is not None:
        df[PROVIDER_COLUMN] = pd.Series([], dtype="str")
    return df


def _to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas()


def _day_name(day: int) -> str:
    return str(np.datetime64(int(day), "D"))


def _day_of(name: str) -> int:
    return int(np.datetime64(name, "D").astype(np.int64))


def _atomic_write(table: pa.Table, path: Path, fsync: bool) -> None:
    """Write ``table`` to ``path`` so that a crash leaves the old file or the new one, intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression="snappy")
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        # The rename itself lives in the directory: flush it so it survives a power loss too.
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _day_files(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    out = []
    with os.scandir(directory) as it:
        for entry in it:
            m = _DAY_FILE_RE.match(entry.name)
            if m:
                out.append((_day_of(m.group(1)), Path(entry.path)))
    out.sort()
    return out


def _same_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return (a == b) | (np.isnan(a) & np.isnan(b))
    return a == b


def _merge_sorted(existing: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Upsert ``new`` (ts unique, sorted) into ``existing`` (ts unique, sorted).

    Returns the merged columns and how many rows of ``new`` were absent or different.
    """
    old_ts, new_ts = existing["ts"], new["ts"]
    pos = np.searchsorted(old_ts, new_ts)
    found = pos < len(old_ts)
    found[found] = old_ts[pos[found]] == new_ts[found]
    same = found.copy()
    if found.any():
        at = pos[found]
        eq = np.ones(int(found.sum()), dtype=bool)
        for column in BAR_COLUMNS:
            eq &= _same_values(existing[column][at], new[column][found])
        same[found] = eq
    changed = int((~same).sum())
    if changed == 0:
        return existing, 0
    keep = np.ones(len(old_ts), dtype=bool)
    keep[pos[found]] = False
    merged_ts = np.concatenate([old_ts[keep], new_ts])
    order = np.argsort(merged_ts, kind="stable")
    merged = {c: np.concatenate([existing[c][keep], new[c]])[order] for c in BAR_COLUMNS}
    return merged, changed


def _unique_sorted(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sort by ts; of rows sharing a ts keep the last one given (new rows win)."""
    ts = cols["ts"]
    order = np.argsort(ts, kind="stable")
    ts_sorted = ts[order]
    last = np.ones(len(ts_sorted), dtype=bool)
    if len(ts_sorted) > 1:
        last[:-1] = ts_sorted[1:] != ts_sorted[:-1]
    idx = order[last]
    return {c: v[idx] for c, v in cols.items()}


def _table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for column in BAR_COLUMNS:
        arr = table.column(column).to_numpy(zero_copy_only=False)
        out[column] = arr.astype(object) if column == "imputed" else np.asarray(arr, dtype=BAR_COLUMNS[column])
    return out


def _columns_table(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table(
        [pa.array(cols[c], type=BAR_ARROW_SCHEMA.field(c).type) for c in BAR_COLUMNS], schema=BAR_ARROW_SCHEMA
    )


@dataclass
class _DayCache:
    day: int
    signature: tuple[int, int, int]  # (inode, size, mtime_ns) of the file it mirrors
    columns: dict[str, np.ndarray]


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# BarStore
# --------------------------------------------------------------------------------------------


class BarStore:
    """Bars per asset / source / UTC day in Parquet, idempotent on ``(asset, source, ts)``.

    Parameters
    ----------
    root
        Directory of the store, conventionally ``<data_dir>/bars``; created on first write.
    fsync
        Flush each file and its directory before returning from a write (durable across a
        power loss). ``False`` keeps atomicity (rename) and survives a process crash; it is for
        tests and bulk rebuilds.

    Notes
    -----
    Thread-safe (one lock per store). Pickles without its day cache (rebuilt on demand), so an
    actor can carry it in a checkpoint.

    Examples
    --------
    >>> import tempfile, pandas as pd
    >>> store = BarStore(tempfile.mkdtemp(), fsync=False)
    >>> bars = pd.DataFrame({"ts": [0, 60_000_000_000], "open": [1.0, 2.0], "high": [1.0, 2.0],
    ...     "low": [1.0, 2.0], "close": [1.0, 2.0], "volume": [3.0, 4.0], "vwap": [1.0, 2.0],
    ...     "ticks": [1, 1], "providers": [1, 1], "confidence": [0.0, 0.0], "imputed": ["", ""]})
    >>> store.upsert("BTC-USD", "consensus", bars), store.upsert("BTC-USD", "consensus", bars)
    (2, 0)
    >>> store.read("BTC-USD")["close"].tolist()
    [1.0, 2.0]
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = bool(fsync)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], _DayCache] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "fsync": self.fsync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], fsync=state["fsync"])  # type: ignore[misc]

    def _dir(self, asset: str, source: str) -> Path:
        return self.root / check_name(asset, "asset") / check_name(source, "source")

    def upsert(self, asset: str, source: str, bars_df: pd.DataFrame) -> int:
        """Insert or replace bars; return how many rows were new or different.

        Parameters
        ----------
        asset
            Asset id such as ``"BTC-USD"``.
        source
            ``"consensus"`` or a provider name. A ``provider`` column, if present, must equal
            ``source`` on every row (split a multi-provider frame with :meth:`upsert_providers`).
        bars_df
            Bar frame with the schema of :data:`BAR_COLUMNS`; extra columns are ignored. Rows
            sharing a ``ts`` keep the last one.

        Returns
        -------
        int
            Rows that were not stored before or differed from the stored row. Replaying bars
            already stored returns 0 and writes nothing.

        Raises
        ------
        InvalidInput
            Bad asset/source name, missing column, wrong dtype, or a ``provider`` column that
            disagrees with ``source``.
        """
        directory = self._dir(asset, source)
        cols = bar_columns(bars_df)
        if PROVIDER_COLUMN in bars_df.columns and len(bars_df):
            providers = bars_df[PROVIDER_COLUMN].to_numpy(dtype=object)
            if source == CONSENSUS or not (providers == source).all():
                raise InvalidInput(
                    f"provider column holds {sorted(set(map(str, providers)))[:5]} but source is '{source}'",
                    field=PROVIDER_COLUMN,
                )
        if len(cols["ts"]) == 0:
            return 0
        cols = _unique_sorted(cols)
        days = cols["ts"] // NS_PER_DAY
        bounds = np.flatnonzero(np.diff(days)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(days)]])
        changed = 0
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            for s, e in zip(starts, ends):
                day = int(days[s])
                part = {c: v[s:e] for c, v in cols.items()}
                changed += self._upsert_day(asset, source, directory, day, part)
        return changed

    def _upsert_day(self, asset: str, source: str, directory: Path, day: int, new: dict[str, np.ndarray]) -> int:
        path = directory / f"{_day_name(day)}.parquet"
        key = (asset, source)
        cached = self._cache.get(key)
        sig = _signature(path)
        if cached is not None and cached.day == day and sig == cached.signature:
            existing = cached.columns
        elif sig is None:
            existing = {c: np.empty(0, dtype=dt) for c, dt in BAR_COLUMNS.items()}
        else:
            existing = _table_columns(pq.read_table(path, schema=BAR_ARROW_SCHEMA))
        merged, changed = _merge_sorted(existing, new)
        if changed:
            _atomic_write(_columns_table(merged), path, self.fsync)
            sig = _signature(path)
        # Only the latest day is worth keeping: live upserts hit it over and over, while a
        # backfill of older days touches each day once.
        if sig is not None and (cached is None or day >= cached.day):
            self._cache[key] = _DayCache(day=day, signature=sig, columns=merged)
        return changed

    def upsert_providers(self, asset: str, provider_bars: pd.DataFrame) -> int:
        """Upsert a frame mixing several providers (``provider`` column) under each provider.

        Returns the total of :meth:`upsert` over providers.

        Raises
        ------
        InvalidInput
            Missing ``provider`` column or any bar-schema violation.
        """
        if not isinstance(provider_bars, pd.DataFrame):
            raise InvalidInput("provider_bars must be a pandas DataFrame", field="provider_bars")
        if PROVIDER_COLUMN not in provider_bars.columns:
            raise InvalidInput("provider bar frame is missing column 'provider'", field=PROVIDER_COLUMN)
        total = 0
        names = _string_array(provider_bars[PROVIDER_COLUMN], PROVIDER_COLUMN)
        for name in sorted(set(names)):
            total += self.upsert(asset, name, provider_bars.loc[names == name])
        return total

    def read(
        self,
        asset: str,
        source: str = CONSENSUS,
        start_ns: int | None = None,
        end_ns: int | None = None,
    ) -> pd.DataFrame:
        """Bars of one asset and source with ``start_ns <= ts < end_ns``, sorted by ``ts``.

        Only the day files overlapping the range are opened. Returns an empty frame with the
        schema when nothing is stored. Provider sources carry a ``provider`` column.

        Raises
        ------
        InvalidInput
            Bad asset/source name or non-integer bounds.
        """
        directory = self._dir(asset, source)
        lo = _bound(start_ns, "start_ns")
        hi = _bound(end_ns, "end_ns")
        files = _day_files(directory)
        if lo is not None:
            files = [(d, p) for d, p in files if d >= lo // NS_PER_DAY]
        if hi is not None:
            files = [(d, p) for d, p in files if d <= (hi - 1) // NS_PER_DAY]
        provider = None if source == CONSENSUS else source
        if not files:
            return empty_bars(provider)
        table = pa.concat_tables([pq.read_table(p, schema=BAR_ARROW_SCHEMA) for _, p in files])
        if lo is not None or hi is not None:
            ts = table.column("ts").to_numpy()
            mask = np.ones(len(ts), dtype=bool)
            if lo is not None:
                mask &= ts >= lo
            if hi is not None:
                mask &= ts < hi
            if not mask.all():
                table = table.filter(pa.array(mask))
        df = _to_frame(table)
        if provider is not None:
            df[PROVIDER_COLUMN] = pd.Series(np.full(len(df), provider, dtype=object), dtype="str")
        return df

    def last_ts(self, asset: str, source: str = CONSENSUS) -> int | None:
        """Open time of the newest stored bar, reading only the newest day file (None if none)."""
        files = _day_files(self._dir(asset, source))
        for _, path in reversed(files):
            ts = pq.read_table(path, columns=["ts"]).column("ts").to_numpy()
            if len(ts):
                return int(ts.max())
        return None

    def sources(self, asset: str) -> list[str]:
        """Sources stored for ``asset`` (``"consensus"`` and provider names), sorted."""
        directory = self.root / check_name(asset, "asset")
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def providers(self, asset: str) -> list[str]:
        """Provider sources of ``asset`` (every source but ``"consensus"``), sorted."""
        return [s for s in self.sources(asset) if s != CONSENSUS]

    def assets(self) -> list[str]:
        """Assets with at least one stored source, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))


def _bound(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{field} must be an integer UNIX ns or None, got {type(value).__name__}", field=field)
    return int(value)


# --------------------------------------------------------------------------------------------
# GapAuditStore
# --------------------------------------------------------------------------------------------


def audit_columns(df: object) -> dict[str, np.ndarray]:
    """Validate a gap-audit frame (see :data:`AUDIT_COLUMNS`) and return its columns.

    Raises
    ------
    InvalidInput
        Missing column or wrong dtype, naming the column.
    """
    if not isinstance(df, pd.DataFrame):
        raise InvalidInput(f"audit must be a pandas DataFrame, got {type(df).__name__}", field="audit")
    out: dict[str, np.ndarray] = {}
    for column, dtype in AUDIT_COLUMNS.items():
        if column not in df.columns:
            raise InvalidInput(f"audit frame is missing column '{column}'", field=column)
        series = df[column]
        kind = series.dtype.kind
        if column == "method":
            out[column] = _string_array(series, column)
        elif column == "filled":
            if kind != "b":
                raise InvalidInput(f"column 'filled' must be bool, got {series.dtype}", field=column)
            out[column] = series.to_numpy().astype(bool)
        elif dtype.kind == "i":
            if kind not in "iu":
                raise InvalidInput(f"column '{column}' must be int64 UNIX ns, got {series.dtype}", field=column)
            out[column] = series.to_numpy().astype(np.int64)
        else:
            if kind not in "iuf":
                raise InvalidInput(f"column '{column}' must be float64, got {series.dtype}", field=column)
            out[column] = series.to_numpy().astype(np.float64)
    return out


class _SideFileStore:
    """What the gap-audit and late-tick stores share: a root, an fsync policy, a lock, and
    pickling that keeps only the first two (the lock is rebuilt)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = bool(fsync)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "fsync": self.fsync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], fsync=state["fsync"])  # type: ignore[misc]


class GapAuditStore(_SideFileStore):
    """The gap audit per asset (one Parquet file each), idempotent on the gap segment ``start``.

    Re-auditing a range (after late bars or a refill) replaces the rows with the same ``start``.

    Parameters
    ----------
    root
        Directory, conventionally ``<data_dir>/gaps``.
    fsync
        As for :class:`BarStore`.
    """

    def upsert(self, asset: str, audit_df: pd.DataFrame) -> int:
        """Insert or replace audit rows keyed by ``start``; return rows written (new or changed).

        Raises
        ------
        InvalidInput
            Bad asset name, missing column or wrong dtype.
        """
        path = self.root / f"{check_name(asset, 'asset')}.parquet"
        new = pd.DataFrame(audit_columns(audit_df))
        if new.empty:
            return 0
        new = new.drop_duplicates("start", keep="last")
        with self._lock:
            old = self.read(asset)
            merged = pd.concat([old[~old["start"].isin(new["start"])], new], ignore_index=True)
            merged = merged.sort_values("start", kind="stable").reset_index(drop=True)
            both = old.merge(new, on=list(AUDIT_COLUMNS), how="inner")
            changed = len(new) - len(both)
            if changed == 0:
                return 0
            self.root.mkdir(parents=True, exist_ok=True)
            table = pa.table(
                [pa.array(merged[c].to_numpy(dtype=object if c == "method" else AUDIT_COLUMNS[c]),
                          type=AUDIT_ARROW_SCHEMA.field(c).type) for c in AUDIT_COLUMNS],
                schema=AUDIT_ARROW_SCHEMA,
            )
            _atomic_write(table, path, self.fsync)
        return changed

    def read(self, asset: str) -> pd.DataFrame:
        """The audit of ``asset`` sorted by ``start`` (empty frame with the columns if none)."""
        path = self.root / f"{check_name(asset, 'asset')}.parquet"
        if not path.exists():
            return _to_frame(AUDIT_ARROW_SCHEMA.empty_table())
        return _to_frame(pq.read_table(path, schema=AUDIT_ARROW_SCHEMA))


# --------------------------------------------------------------------------------------------
# LateTickStore
# --------------------------------------------------------------------------------------------


class LateTickStore(_SideFileStore):
    """Ticks that arrived after their bar was closed, kept aside per asset and UTC day.

    Appends are idempotent: rows identical in every column (provider, both timestamps, price,
    size, quote, sequence, status) are stored once, so a replayed batch is not doubled. Late
    ticks are rare, so each append rewrites the affected day file (atomically).

    Parameters
    ----------
    root
        Directory, conventionally ``<data_dir>/late``.
    fsync
        As for :class:`BarStore`.
    """

    def append(self, batch: TickBatch) -> int:
        """Store the ticks of ``batch``; return how many were not stored before.

        Raises
        ------
        InvalidInput
            ``batch`` is not a :class:`TickBatch` or has an invalid asset name.
        """
        if not isinstance(batch, TickBatch):
            raise InvalidInput(f"batch must be a TickBatch, got {type(batch).__name__}", field="batch")
        directory = self.root / check_name(batch.asset, "asset")
        if len(batch) == 0:
            return 0
        frame = pd.DataFrame({"provider": batch.provider_names().astype(str),
                              **{c: v for c, v in batch.columns().items() if c != "provider"}})
        frame["provider"] = frame["provider"].astype(object)
        days = frame["ts_event"].to_numpy() // NS_PER_DAY
        added = 0
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            for day in np.unique(days):
                path = directory / f"{_day_name(int(day))}.parquet"
                new = frame.loc[days == day]
                old = self._read_file(path)
                merged = pd.concat([old, new], ignore_index=True).drop_duplicates(keep="first")
                grown = len(merged) - len(old)
                if grown == 0:
                    continue
                merged = merged.sort_values("ts_event", kind="stable").reset_index(drop=True)
                _atomic_write(pa.Table.from_pandas(merged, schema=LATE_ARROW_SCHEMA, preserve_index=False),
                              path, self.fsync)
                added += grown
        return added

    @staticmethod
    def _read_file(path: Path) -> pd.DataFrame:
        if not path.exists():
            frame = LATE_ARROW_SCHEMA.empty_table().to_pandas()
        else:
            frame = pq.read_table(path, schema=LATE_ARROW_SCHEMA).to_pandas()
        frame["provider"] = frame["provider"].astype(object)
        return frame

    def read(self, asset: str, start_ns: int | None = None, end_ns: int | None = None) -> TickBatch:
        """Late ticks of ``asset`` with ``start_ns <= ts_event < end_ns``, in event-time order."""
        directory = self.root / check_name(asset, "asset")
        lo = _bound(start_ns, "start_ns")
        hi = _bound(end_ns, "end_ns")
        files = [p for d, p in _day_files(directory)
                 if (lo is None or d >= lo // NS_PER_DAY) and (hi is None or d <= (hi - 1) // NS_PER_DAY)]
        if not files:
            return TickBatch.empty(asset)
        frame = pd.concat([self._read_file(p) for p in files], ignore_index=True)
        ts = frame["ts_event"].to_numpy()
        mask = np.ones(len(frame), dtype=bool)
        if lo is not None:
            mask &= ts >= lo
        if hi is not None:
            mask &= ts < hi
        frame = frame.loc[mask]
        names = frame["provider"].to_numpy(dtype=object).astype(str)
        vocab, codes = np.unique(names, return_inverse=True)
        return TickBatch(
            asset=asset,
            providers=tuple(str(v) for v in vocab),
            provider=codes.astype(np.int16),
            **{c: frame[c].to_numpy() for c in TICK_COLUMNS if c != "provider"},
        )

