"""Replay of recorded 1-minute multi-venue bar files as tick streams.

The file format is the one of the shared market data
(``timestamp_utc, venue, symbol, open, high, low, close, volume, trades``; gzip or plain CSV).
Each venue is a provider; a symbol ``BTC/USD`` becomes the asset ``BTC-USD``.

Reading never crashes on bad rows and never drops good ones: every row that cannot be used is
counted under a reason (see :data:`REJECT_REASONS`) in :attr:`ReplayFile.rejected`, so that
``rows_in == len(bars) + sum(rejected.values()) - rejected.get("truncated", 0)``.

The fast path hands the decompressed bytes to ``pyarrow.csv`` with every column read as text and
converts columns vectorized; only when Arrow refuses the file as a whole (invalid UTF-8, say)
does a line-by-line parser take over, so one bad byte costs speed, not rows.

Bars become ticks deterministically (:func:`expand_bars_to_ticks`): four ticks per bar at fixed
offsets inside its minute, so that rebuilding 1-minute bars from one venue's ticks gives back
that venue's bars exactly.
"""

from __future__ import annotations

import csv
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tickcast.errors import InvalidInput
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch

REQUIRED_COLUMNS: tuple[str, ...] = (
    "timestamp_utc", "venue", "symbol", "open", "high", "low", "close", "volume",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("trades",)
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")

REJECT_REASONS: tuple[str, ...] = (
    "malformed", "null", "non_finite", "non_positive", "unknown_asset", "duplicate", "truncated",
)
"""Reasons a row is not kept.

``malformed``: wrong column count, undecodable text, unparseable timestamp or number, timestamp
not on a minute boundary, empty venue/symbol, negative volume, non-integer trade count, or OHLC
inconsistent (high below max(open, close), low above min(open, close)). ``null``: a price or the
volume is missing. ``non_finite``: NaN or infinity. ``non_positive``: a price <= 0.
``unknown_asset``: the symbol's asset is not among the requested assets. ``duplicate``: a second
row for the same (minute, venue, asset); the first is kept. ``truncated``: 1 when the
compressed stream ends (or breaks) before its end; every complete row read before is kept.
"""

BAR_COLUMNS: tuple[str, ...] = (
    "ts", "venue", "asset", "open", "high", "low", "close", "volume", "trades",
)

# Offsets of the four ticks a bar becomes, inside its minute: open, first extreme, second
# extreme, close. The close sits at +59 s so that it is the last tick of the minute.
TICK_OFFSETS_NS: np.ndarray = np.array([0, 20, 40, 59], dtype=np.int64) * NS_PER_S

# Text cells read as missing values. "NaN" is deliberately not among them: a NaN price is a
# non-finite number (its own reason), not a missing one.
_NULL_TEXT: list[str] = ["", "null", "NULL", "None", "none"]
_NAN_TEXT: frozenset[str] = frozenset({"nan", "+nan", "-nan"})
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_CHUNK = 1 << 20  # compressed bytes fed to zlib per step
_GZIP_STEP = 64  # step when re-reading a damaged chunk


@dataclass
class ReplayFile:
    """A bar file read into memory.

    Attributes
    ----------
    bars
        One row per usable bar, sorted by (ts, venue, asset): ``ts`` int64 UNIX ns of the
        minute open (UTC), ``venue`` and ``asset`` str, ``open high low close volume`` float64,
        ``trades`` float64 (NaN where the venue does not report it).
    rejected
        Rows not kept, by reason (see :data:`REJECT_REASONS`); reasons with no row are omitted.
    rows_in
        Data rows seen (header and blank lines excluded).
    path
        The file read.
    """

    bars: pd.DataFrame
    rejected: dict[str, int] = field(default_factory=dict)
    rows_in: int = 0
    path: str = ""

    @property
    def assets(self) -> tuple[str, ...]:
        """Assets present, sorted."""
        return tuple(sorted(self.bars["asset"].unique().tolist()))

    def venues(self, asset: str) -> tuple[str, ...]:
        """Venues quoting ``asset``, sorted."""
        return tuple(sorted(self.bars.loc[self.bars["asset"] == asset, "venue"].unique().tolist()))


def symbol_to_asset(symbol: str) -> str:
    """Map a venue symbol to an asset id.

    >>> symbol_to_asset("BTC/USD")
    'BTC-USD'
    """
    return symbol.strip().replace("/", "-")


def read_bar_file(path: str | Path, assets: tuple[str, ...] | None = None) -> ReplayFile:
    """Read a 1-minute multi-venue bar file (gzip or plain CSV).

    Parameters
    ----------
    path
        The file.
    assets
        Keep only these assets (others are counted as ``unknown_asset``); ``None`` keeps all.

    Returns
    -------
    ReplayFile
        Usable bars and the count of rejected rows by reason.

    Raises
    ------
    InvalidInput
        The file is missing or unreadable, is empty, or its header lacks a required column;
        the message names the path (and the missing columns).
    """
    p = Path(path)
    raw, truncated = _read_bytes(p)
    header_end = raw.find(b"\n")
    if header_end < 0:
        raise InvalidInput(f"bar file {p} has no complete header line", field="path")
    header = _parse_header(raw[:header_end], p)
    body = raw[header_end + 1:]

    cols, rows_in, malformed_rows = _parse_body(body, header)
    rejected: dict[str, int] = {}
    if malformed_rows:
        rejected["malformed"] = malformed_rows
    if truncated:
        rejected["truncated"] = 1
    bars = _convert(cols, assets, rejected)
    rejected = {k: v for k, v in rejected.items() if v}
    return ReplayFile(bars=bars, rejected=rejected, rows_in=rows_in, path=str(p))


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """File contents, decompressed when gzip; ``truncated`` when the gzip stream is cut/broken."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read bar file {path}: {exc.strerror or exc}", field="path"
        ) from None
    if not data.startswith(_GZIP_MAGIC):
        return data, False
    out: list[bytes] = []
    rest = data
    truncated = False
    # Loop over gzip members (concatenated gzip files are valid gzip).
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        for start in range(0, len(rest), _GZIP_CHUNK):
            chunk = rest[start:start + _GZIP_CHUNK]
            saved = d.copy()
            try:
                out.append(d.decompress(chunk))
            except zlib.error:
                # A corrupt block or CRC: redo this chunk in small steps to keep what came
                # before the damage.
                d = saved
                for i in range(0, len(chunk), _GZIP_STEP):
                    try:
                        out.append(d.decompress(chunk[i:i + _GZIP_STEP]))
                    except zlib.error:
                        break
                truncated = True
                break
            if d.eof:
                break
        if truncated:
            break
        if not d.eof:
            truncated = True  # stream cut before its end marker
            break
        rest = d.unused_data
        if rest and not rest.startswith(_GZIP_MAGIC):
            break  # trailing garbage after the last member is ignored, like gzip(1)
    text = b"".join(out)
    if truncated:
        # The bytes after the last newline are a partial row: a cut number would still parse.
        text = text[: text.rfind(b"\n") + 1]
    return text, truncated


def _parse_header(line: bytes, path: Path) -> list[str]:
    try:
        names = next(csv.reader([line.decode("utf-8-sig").rstrip("\r")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        raise InvalidInput(f"bar file {path} has an unreadable header", field="header") from None
    names = [n.strip() for n in names]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InvalidInput(
            f"bar file {path} lacks column(s) {', '.join(missing)}", field=missing[0]
        )
    if len(set(names)) != len(names):
        raise InvalidInput(f"bar file {path} repeats a column name in its header", field="header")
    return names


def _parse_body(body: bytes, header: list[str]) -> tuple[dict[str, pa.Array], int, int]:
    """Text columns of every well-shaped row, rows seen, and rows of the wrong shape."""
    bad_shape = 0

    def on_invalid(_row: pacsv.InvalidRow) -> str:
        nonlocal bad_shape
        bad_shape += 1
        return "skip"

    wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in header]
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=header, use_threads=True),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                include_columns=wanted,
                null_values=_NULL_TEXT,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        cols = {c: table.column(c).combine_chunks() for c in wanted}
        return cols, table.num_rows + bad_shape, bad_shape
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _parse_body_by_line(body, header, wanted)


def _parse_body_by_line(
    body: bytes, header: list[str], wanted: list[str]
) -> tuple[dict[str, pa.Array], int, int]:
    """Slow, forgiving parser for files Arrow refuses as a whole: bad lines only cost themselves."""
    index = [header.index(c) for c in wanted]
    values: dict[str, list[str | None]] = {c: [] for c in wanted}
    rows_in = 0
    bad = 0
    nulls = set(_NULL_TEXT)
    for line in body.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        rows_in += 1
        try:
            cells = next(csv.reader([line.decode("utf-8")]))
        except (UnicodeDecodeError, StopIteration, csv.Error):
            bad += 1
            continue
        if len(cells) != len(header):
            bad += 1
            continue
        for c, i in zip(wanted, index):
            cell = cells[i]
            values[c].append(None if cell in nulls else cell)
    cols = {c: pa.array(v, type=pa.string()) for c, v in values.items()}
    return cols, rows_in, bad


def _to_float(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text column -> (values, is_null, is_unparseable)."""
    is_null = col.is_null().to_numpy(zero_copy_only=False)
    try:
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        return values, is_null, np.zeros(len(col), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Some cell is not a plain number (padding, words): coerce cell by cell.
    text = pd.Series(col.to_pandas(), dtype=object)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    nan_literal = text.str.strip().str.lower().isin(_NAN_TEXT).to_numpy()
    bad = np.isnan(values) & ~is_null & ~nan_literal
    return values, is_null, bad


def _to_ns(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """ISO-8601 text column -> (UNIX ns, is_unparseable)."""
    fast = pc.strptime(col, format="%Y-%m-%dT%H:%M:%SZ", unit="ns", error_is_null=True)
    missing = fast.is_null().to_numpy(zero_copy_only=False)
    ns = pc.fill_null(pc.cast(fast, pa.int64()), 0).to_numpy(zero_copy_only=False).copy()
    if missing.any():
        # Other ISO-8601 spellings (offsets, fractions, a space separator); naive means UTC.
        idx = np.flatnonzero(missing)
        slow = pd.to_datetime(
            pd.Series(col.take(pa.array(idx)).to_pandas(), dtype=object),
            format="ISO8601", utc=True, errors="coerce",
        )
        ok = slow.notna().to_numpy()
        ns[idx[ok]] = slow[ok].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        missing[idx[ok]] = False
    return ns.astype(np.int64), missing


def _convert(
    cols: dict[str, pa.Array], assets: tuple[str, ...] | None, rejected: dict[str, int]
) -> pd.DataFrame:
    """Vectorized conversion and reason-coded filtering of text columns into the bar frame."""
    n = len(cols["timestamp_utc"])
    ts, bad_ts = _to_ns(cols["timestamp_utc"])
    malformed = bad_ts | (ts % NS_PER_MIN != 0)

    venue = pc.utf8_trim_whitespace(cols["venue"])
    symbol = pc.utf8_trim_whitespace(cols["symbol"])
    malformed |= pc.fill_null(pc.equal(venue, ""), True).to_numpy(zero_copy_only=False)
    malformed |= pc.fill_null(pc.equal(symbol, ""), True).to_numpy(zero_copy_only=False)
    asset = pc.replace_substring(symbol, "/", "-")

    num: dict[str, np.ndarray] = {}
    null = np.zeros(n, dtype=bool)
    for c in (*PRICE_COLUMNS, "volume"):
        values, is_null, bad = _to_float(cols[c])
        num[c] = values
        null |= is_null
        malformed |= bad
    if "trades" in cols:
        trades, _, bad = _to_float(cols["trades"])
        bad |= np.isfinite(trades) & ((trades < 0) | (trades != np.round(trades)))
        bad |= np.isinf(trades)
        malformed |= bad
    else:
        trades = np.full(n, np.nan)
    o, h, lo, c, v = (num[k] for k in (*PRICE_COLUMNS, "volume"))

    # Precedence: each row is counted once, under the first reason that applies.
    unknown = np.zeros(n, dtype=bool)
    if assets is not None:
        known = pc.is_in(asset, value_set=pa.array(list(assets), type=pa.string()))
        unknown = ~pc.fill_null(known, False).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        prices = np.stack([o, h, lo, c])
        non_finite = ~np.isfinite(prices).all(axis=0) | ~np.isfinite(v)
        non_positive = (prices <= 0).any(axis=0)
        inconsistent = (h < np.maximum(o, c)) | (lo > np.minimum(o, c)) | (v < 0)

    reasons = (
        ("malformed", malformed),
        ("unknown_asset", unknown),
        ("null", null),
        ("non_finite", non_finite),
        ("non_positive", non_positive),
        ("malformed", inconsistent),
    )
    keep = np.ones(n, dtype=bool)
    for reason, mask in reasons:
        hit = keep & mask
        if hit.any():
            rejected[reason] = rejected.get(reason, 0) + int(hit.sum())
        keep &= ~mask

    idx = np.flatnonzero(keep)
    frame = pd.DataFrame({
        "ts": ts[idx],
        "venue": venue.take(pa.array(idx)).to_numpy(zero_copy_only=False).astype(object),
        "asset": asset.take(pa.array(idx)).to_numpy(zero_copy_only=False).astype(object),
        "open": o[idx], "high": h[idx], "low": lo[idx], "close": c[idx], "volume": v[idx],
        "trades": trades[idx],
    })
    dup = frame.duplicated(subset=["ts", "venue", "asset"], keep="first").to_numpy()
    if dup.any():
        rejected["duplicate"] = rejected.get("duplicate", 0) + int(dup.sum())
        frame = frame.loc[~dup]
    frame = frame.sort_values(["ts", "venue", "asset"], kind="mergesort").reset_index(drop=True)
    return frame.astype({"ts": np.int64, "venue": object, "asset": object})


def expand_bars_to_ticks(bars: pd.DataFrame, asset: str) -> TickBatch:
    """Turn the bars of one asset (all its venues) into ticks, deterministically.

    Each bar becomes four ticks inside its minute: the open at +0 s, then the high and the
    low (the one nearer the open first; the high on a tie) at +20 s and +40 s, the close at
    +59 s. The volume is split into four near-equal parts that are all integer multiples of
    ``ulp(v)``: ``a, a, a, v - 3a`` with ``a = floor(v / 4 / ulp(v)) * ulp(v)``. Every partial sum
    is then an integer multiple of ``ulp(v)`` no larger than ``v``, hence exactly representable,
    so the ticks' sizes add back to ``v`` exactly in *any* summation order (pairwise, reduceat,
    or merged across batches); a zero-volume bar gives four zero-size ticks. Sequence numbers count each venue's ticks
    from 0; ``ts_init`` equals ``ts_event``; bid and ask are NaN.

    Parameters
    ----------
    bars
        A bar frame as in :attr:`ReplayFile.bars` (columns ts, venue, asset, OHLCV).
    asset
        The asset whose bars are expanded; rows of other assets are ignored.

    Returns
    -------
    TickBatch
        Ticks in event-time order (ties: venue order), providers = the venues sorted.

    Raises
    ------
    ValueError
        A required column is missing (named).

    Examples
    --------
    >>> bars = pd.DataFrame({"ts": [0], "venue": ["kraken"], "asset": ["BTC-USD"],
    ...                      "open": [10.0], "high": [12.0], "low": [9.5], "close": [11.0],
    ...                      "volume": [2.0]})
    >>> t = expand_bars_to_ticks(bars, "BTC-USD")
    >>> t.price.tolist(), t.size.tolist(), (t.ts_event // 10**9).tolist(), t.seq.tolist()
    ([10.0, 9.5, 12.0, 11.0], [0.5, 0.5, 0.5, 0.5], [0, 20, 40, 59], [0, 1, 2, 3])
    """
    missing = [c for c in ("ts", "venue", "asset", *PRICE_COLUMNS, "volume") if c not in bars.columns]
    if missing:
        raise ValueError(f"bars lack column(s) {', '.join(missing)}")
    sel = bars.loc[bars["asset"].to_numpy() == asset]
    if sel.empty:
        return TickBatch.empty(asset)
    venue_names = sel["venue"].to_numpy(dtype=object).astype(str)
    providers, vcode = np.unique(venue_names, return_inverse=True)
    n = len(sel)
    ts = sel["ts"].to_numpy(dtype=np.int64)
    o, h, lo, c, v = (sel[k].to_numpy(dtype=np.float64) for k in (*PRICE_COLUMNS, "volume"))

    high_first = (h - o) <= (o - lo)
    price = np.column_stack([o, np.where(high_first, h, lo), np.where(high_first, lo, h), c]).ravel()
    ulp = np.spacing(np.abs(v))
    quarter = np.where(v > 0, np.floor((v / 4.0) / ulp) * ulp, 0.0)
    rest = v - 3.0 * quarter  # exact: 3 * quarter is a multiple of ulp(v) below v
    size = np.column_stack([quarter, quarter, quarter, rest]).ravel()
    ts_event = (ts[:, None] + TICK_OFFSETS_NS[None, :]).ravel()
    provider = np.repeat(vcode.astype(np.int16), 4)

    order = np.lexsort((provider, ts_event))
    provider, ts_event, price, size = provider[order], ts_event[order], price[order], size[order]
    # Sequence number = rank of the tick among its venue's ticks (in event-time order).
    by_venue = np.argsort(provider, kind="stable")
    starts = np.searchsorted(provider[by_venue], np.arange(len(providers)))
    seq = np.empty(4 * n, dtype=np.int64)
    seq[by_venue] = np.arange(4 * n, dtype=np.int64) - starts[provider[by_venue]]
    nan = np.full(4 * n, np.nan)
    return TickBatch(
        asset=asset, providers=tuple(str(p) for p in providers), provider=provider,
        ts_event=ts_event, ts_init=ts_event.copy(), price=price, size=size, bid=nan,
        ask=nan.copy(), seq=seq, status=np.zeros(4 * n, dtype=np.uint8),
    )


def iter_replay_batches(
    replay: ReplayFile, asset: str, batch_max_ticks: int
) -> Iterator[TickBatch]:
    """All venues of ``asset`` merged in event-time order, in batches of at most ``batch_max_ticks``.

    Raises
    ------
    ValueError
        ``batch_max_ticks`` < 1.
    """
    if batch_max_ticks < 1:
        raise ValueError(f"batch_max_ticks must be >= 1, got {batch_max_ticks}")
    ticks = expand_bars_to_ticks(replay.bars, asset)
    for start in range(0, len(ticks), batch_max_ticks):
        yield ticks.take(np.arange(start, min(start + batch_max_ticks, len(ticks))))
