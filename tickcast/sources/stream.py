"""The public ingress schema: one Redis stream entry per tick batch.

Any feed handler, in any language, publishes ticks by adding entries to the Redis stream
``ticks:<ASSET>`` (``ingest.stream_prefix`` + asset). An entry has these fields:

=======  ==================================================================================
field    value
=======  ==================================================================================
v        schema version, ``1``
fmt      ``arrow`` (Arrow IPC stream bytes) or ``json`` (UTF-8 JSON array)
asset    asset id, e.g. ``BTC-USD``
n        number of ticks (a check; the data is authoritative)
data     the ticks
=======  ==================================================================================

``arrow``: one or more record batches with columns ``provider`` (string), ``ts_event``
(int64 UNIX ns, or an Arrow timestamp), ``ts_init`` (same, optional), ``price`` (float64,
nullable: null = price missing), ``size`` (float64), ``bid``, ``ask`` (float64, optional,
null = no quote), ``seq`` (int64, optional, null = none). Other integer/float widths are cast.

``json``: an array of objects ``{"provider": str, "ts_event": int ns | ISO-8601 str,
"price": number | numeric str | null, "size": number | numeric str, "bid"?, "ask"?, "seq"?,
"ts_init"?}``.

Decoding never raises on bad input (:func:`decode_entry`): an entry that cannot be read at all
(unknown version or format, undecodable data) becomes a one-row batch with status
``MALFORMED`` and the reason in ``batch.meta["error"]``; rows that can be told apart are judged
one by one (``MALFORMED`` for a missing/invalid provider, time, size, bid, ask or seq, ``NULL``
for a missing price) and the reasons, naming the field, are listed in ``batch.meta["errors"]``
(JSON). Good rows are always kept.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tickcast.errors import TickStatus
from tickcast.ticks import TickBatch

SCHEMA_VERSION = "1"
FORMATS: tuple[str, ...] = ("arrow", "json")
UNKNOWN_PROVIDER = ""
"""Provider name given to rows whose provider is missing or invalid (always ``MALFORMED``)."""

ARROW_SCHEMA = pa.schema([
    ("provider", pa.string()),
    ("ts_event", pa.int64()),
    ("ts_init", pa.int64()),
    ("price", pa.float64()),
    ("size", pa.float64()),
    ("bid", pa.float64()),
    ("ask", pa.float64()),
    ("seq", pa.int64()),
])
REQUIRED: tuple[str, ...] = ("provider", "ts_event", "price", "size")
_MAX_ERRORS = 20  # row errors listed in meta["errors"]; the count of the rest is appended
_MAX_PROVIDERS = int(np.iinfo(np.int16).max)


def stream_key(asset: str, prefix: str = "ticks:") -> str:
    """Name of the stream carrying ``asset``'s ticks.

    >>> stream_key("BTC-USD")
    'ticks:BTC-USD'
    """
    return f"{prefix}{asset}"


# ---------------------------------------------------------------------- encoding


def encode_batch(batch: TickBatch, fmt: str = "arrow") -> dict[str, bytes]:
    """Encode a batch as the fields of one stream entry.

    A tick with status ``NULL`` is sent with a null price; other statuses are pipeline
    verdicts and are not sent.

    Parameters
    ----------
    batch
        Ticks of one asset.
    fmt
        ``"arrow"`` (default, compact and fast) or ``"json"``.

    Raises
    ------
    ValueError
        Unknown ``fmt``.

    Examples
    --------
    >>> b = TickBatch.from_columns("BTC-USD", ["kraken"], ts_event=[1], price=[100.0], size=[2.0])
    >>> sorted(encode_batch(b)), encode_batch(b)["n"]
    (['asset', 'data', 'fmt', 'n', 'v'], b'1')
    >>> decode_entry(encode_batch(b, "json")).price.tolist()
    [100.0]
    """
    if fmt == "arrow":
        data = _encode_arrow(batch)
    elif fmt == "json":
        data = _encode_json(batch)
    else:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return {
        "v": SCHEMA_VERSION.encode(),
        "fmt": fmt.encode(),
        "asset": batch.asset.encode(),
        "n": str(len(batch)).encode(),
        "data": data,
    }


def _encode_arrow(batch: TickBatch) -> bytes:
    codes = pa.array(batch.provider.astype(np.int32))
    names = pa.array(list(batch.providers), type=pa.string())
    provider = pa.DictionaryArray.from_arrays(codes, names).dictionary_decode() if len(batch) else pa.array([], pa.string())
    null_price = batch.status == TickStatus.NULL
    rb = pa.RecordBatch.from_arrays([
        provider,
        pa.array(batch.ts_event),
        pa.array(batch.ts_init),
        pa.array(batch.price, mask=null_price) if null_price.any() else pa.array(batch.price),
        pa.array(batch.size),
        pa.array(batch.bid),
        pa.array(batch.ask),
        pa.array(batch.seq),
    ], schema=ARROW_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
        writer.write_batch(rb)
    return sink.getvalue().to_pybytes()


def _json_float(x: float) -> float | str:
    # Strict JSON has no NaN/Infinity: send them as the strings float() reads back.
    return float(x) if math.isfinite(x) else str(float(x)).replace("inf", "Infinity").replace("nan", "NaN")


def _encode_json(batch: TickBatch) -> bytes:
    # Python lists first: element access on numpy arrays costs ~10x more per value.
    names = batch.provider_names().tolist()
    null = (batch.status == TickStatus.NULL).tolist()
    cols = [c.tolist() for c in (batch.ts_event, batch.ts_init, batch.price, batch.size,
                                 batch.bid, batch.ask, batch.seq)]
    rows: list[dict[str, Any]] = []
    for name, is_null, t_event, t_init, price, size, bid, ask, seq in zip(names, null, *cols):
        row: dict[str, Any] = {
            "provider": name, "ts_event": t_event, "ts_init": t_init,
            "price": None if is_null else _json_float(price), "size": _json_float(size),
        }
        if bid == bid:  # not NaN
            row["bid"] = _json_float(bid)
        if ask == ask:
            row["ask"] = _json_float(ask)
        if seq >= 0:
            row["seq"] = seq
        rows.append(row)
    return json.dumps(rows, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------- decoding


class _Errors:
    """Row errors naming the field, capped for the batch's meta."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.count = 0

    def add(self, message: str, count: int = 1) -> None:
        self.count += count
        if len(self.items) < _MAX_ERRORS:
            self.items.append(message)

    def to_meta(self) -> dict[str, str]:
        if not self.count:
            return {}
        items = list(self.items)
        if self.count > len(items):
            items.append(f"... {self.count - len(items)} more")
        return {"errors": json.dumps(items)}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _malformed_entry(asset: str, reason: str, received_ns: int | None) -> TickBatch:
    ts = np.array([received_ns or 0], dtype=np.int64)
    b = TickBatch(
        asset=asset, providers=(UNKNOWN_PROVIDER,), provider=np.zeros(1, dtype=np.int16),
        ts_event=ts, ts_init=ts.copy(), price=np.full(1, np.nan), size=np.full(1, np.nan),
        bid=np.full(1, np.nan), ask=np.full(1, np.nan), seq=np.full(1, -1, dtype=np.int64),
        status=np.full(1, TickStatus.MALFORMED, dtype=np.uint8),
    )
    b.meta["error"] = reason
    return b


def decode_entry(
    fields: Mapping[bytes | str, bytes | str],
    *,
    asset: str | None = None,
    received_ns: int | None = None,
) -> TickBatch:
    """Decode one stream entry into a batch; never raises on bad input.

    Parameters
    ----------
    fields
        The entry's fields as Redis returns them (bytes or str keys and values).
    asset
        The asset of the stream the entry was read from. An entry naming another asset gets
        every row ``MALFORMED``; an entry naming none takes this one.
    received_ns
        Receive time stamped on ticks that carry no ``ts_init`` (default: their ``ts_event``).

    Returns
    -------
    TickBatch
        The ticks, with ``status`` ``MALFORMED`` / ``NULL`` on bad rows (reasons in
        ``meta["errors"]``), or a one-row ``MALFORMED`` batch (reason in ``meta["error"]``)
        when the entry cannot be read at all.
    """
    try:
        norm: dict[str, Any] = {}
        for key, value in fields.items():
            name = _text(key)
            if name is not None:
                norm[name] = value.encode() if isinstance(value, str) else value
    except (AttributeError, TypeError):
        return _malformed_entry(asset or "", "entry: fields are not a mapping of bytes", received_ns)

    entry_asset = _text(norm.get("asset"))
    batch_asset = asset if asset is not None else (entry_asset or "")
    version = _text(norm.get("v"))
    if version != SCHEMA_VERSION:
        return _malformed_entry(batch_asset, f"v: unsupported schema version {version!r}", received_ns)
    fmt = _text(norm.get("fmt"))
    data = norm.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return _malformed_entry(batch_asset, "data: missing", received_ns)
    if fmt == "arrow":
        batch = _decode_arrow(bytes(data), batch_asset, received_ns)
    elif fmt == "json":
        batch = _decode_json(bytes(data), batch_asset, received_ns)
    else:
        return _malformed_entry(batch_asset, f"fmt: unsupported format {fmt!r}", received_ns)

    if asset is not None and entry_asset and entry_asset != asset and len(batch):
        batch.status[:] = TickStatus.MALFORMED
        batch.meta["error"] = f"asset: entry names {entry_asset!r} on the stream of {asset!r}"
    n_text = _text(norm.get("n"))
    if n_text is not None and n_text.strip() != str(len(batch)) and "error" not in batch.meta:
        batch.meta["warning"] = f"n: entry says {n_text!r}, data holds {len(batch)} rows"
    return batch


def _decode_arrow(data: bytes, asset: str, received_ns: int | None) -> TickBatch:
    try:
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        return _malformed_entry(asset, f"data: undecodable Arrow IPC stream ({type(exc).__name__})", received_ns)
    n = table.num_rows
    names = set(table.column_names)
    errors = _Errors()
    malformed = np.zeros(n, dtype=bool)

    for col in REQUIRED:
        if col not in names:
            errors.add(f"{col}: column missing", n)
            malformed[:] = True

    # Provider: strings (plain or dictionary-encoded).
    providers: tuple[str, ...] = (UNKNOWN_PROVIDER,)
    provider = np.zeros(n, dtype=np.int16)
    if "provider" in names:
        col = table.column("provider")
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            enc = pc.dictionary_encode(col.cast(pa.string())).combine_chunks()
            vocab = enc.dictionary.to_pylist()
            good = [v for v in vocab if v.strip()]
            if len(good) >= _MAX_PROVIDERS:
                return _malformed_entry(asset, f"provider: {len(good)} distinct providers in one batch", received_ns)
            providers = (*good, UNKNOWN_PROVIDER)
            unknown = len(good)
            position = {v: k for k, v in enumerate(good)}
            # vocabulary index -> batch index; the extra last slot takes null rows
            lut = np.array([position.get(v, unknown) for v in vocab] + [unknown], dtype=np.int16)
            provider = lut[pc.fill_null(enc.indices, len(vocab)).to_numpy(zero_copy_only=False)]
            bad = provider == unknown
            if bad.any():
                errors.add(f"provider: missing or empty in {int(bad.sum())} row(s)", int(bad.sum()))
                malformed |= bad
        else:
            errors.add(f"provider: column has type {col.type}, expected string", n)
            malformed[:] = True

    def numeric(name: str, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(values, null mask) of a numeric column, or None when absent / of a wrong type."""
        if name not in names:
            return None
        col = table.column(name)
        t = col.type
        if kind == "time" and pa.types.is_timestamp(t):
            col = col.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64())
            t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            errors.add(f"{name}: column has type {t}, expected {'int64' if kind != 'float' else 'float64'}", n)
            malformed[:] = True
            return None
        nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, dtype=bool)
        if kind == "float":
            values = pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            return np.asarray(values, dtype=np.float64), nulls
        if pa.types.is_integer(t):
            try:
                values = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
                return np.asarray(values, dtype=np.int64), nulls
            except pa.ArrowInvalid:  # uint64 beyond int64
                errors.add(f"{name}: value beyond int64", n)
                malformed[:] = True
                return None
        f = pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(f) | (f != np.round(f)) | (np.abs(f) >= 2.0**63)
        if bad.any():
            errors.add(f"{name}: {int(bad.sum())} value(s) not an integer", int(bad.sum()))
            malformed[:] |= bad
        return np.where(bad, 0, f).astype(np.int64), nulls

    ts_event = np.zeros(n, dtype=np.int64)
    got = numeric("ts_event", "time")
    if got is not None:
        ts_event, nulls = got
        if nulls.any():
            errors.add(f"ts_event: missing in {int(nulls.sum())} row(s)", int(nulls.sum()))
            malformed |= nulls
    ts_init = _default_init(ts_event, received_ns)
    got = numeric("ts_init", "time")
    if got is not None:
        values, nulls = got
        ts_init = np.where(nulls, ts_init, values)

    price = np.full(n, np.nan)
    null_price = np.zeros(n, dtype=bool)
    got = numeric("price", "float")
    if got is not None:
        price, null_price = got
    size = np.full(n, np.nan)
    got = numeric("size", "float")
    if got is not None:
        size, nulls = got
        if nulls.any():
            errors.add(f"size: missing in {int(nulls.sum())} row(s)", int(nulls.sum()))
            malformed |= nulls
    quotes = {}
    for name in ("bid", "ask"):
        got = numeric(name, "float")
        quotes[name] = got[0] if got is not None else np.full(n, np.nan)
    seq = np.full(n, -1, dtype=np.int64)
    got = numeric("seq", "int")
    if got is not None:
        seq = np.where(got[1], -1, got[0])

    status = np.zeros(n, dtype=np.uint8)
    status[null_price] = TickStatus.NULL
    status[malformed] = TickStatus.MALFORMED
    batch = TickBatch(
        asset=asset, providers=providers, provider=provider, ts_event=ts_event, ts_init=ts_init, price=price, size=size, bid=quotes["bid"], ask=quotes["ask"], seq=seq,
        status=status,
    )
    batch.meta.update(errors.to_meta())
    return _compact_providers(batch)


def _default_init(ts_event: np.ndarray, received_ns: int | None) -> np.ndarray:
    return ts_event.copy() if received_ns is None else np.full(len(ts_event), received_ns, dtype=np.int64)


def _compact_providers(batch: TickBatch) -> TickBatch:
    """Drop the unknown-provider name from the vocabulary when no row uses it."""
    if batch.providers and batch.providers[-1] == UNKNOWN_PROVIDER and UNKNOWN_PROVIDER not in batch.providers[:-1]:
        last = len(batch.providers) - 1
        if not np.any(batch.provider == last):
            batch.providers = batch.providers[:-1]
    return batch


# JSON rows --------------------------------------------------------------------


class _RowError(Exception):
    pass


def _json_number(row: dict[str, Any], key: str, required: bool) -> float | None:
    """A float from a number or numeric string; None when absent/null and not required."""
    value = row.get(key)
    if value is None:
        if required:
            raise _RowError(f"{key}: missing")
        return None
    if isinstance(value, bool):
        raise _RowError(f"{key}: boolean is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise _RowError(f"{key}: {value[:40]!r} is not a number") from None
    raise _RowError(f"{key}: {type(value).__name__} is not a number")


def _json_time(value: Any, key: str) -> int:
    if isinstance(value, bool) or value is None:
        raise _RowError(f"{key}: missing" if value is None else f"{key}: boolean is not a time")
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise _RowError(f"{key}: {value} is beyond int64 ns")
        return value
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer() and abs(value) < 2.0**63):
            raise _RowError(f"{key}: {value!r} is not an integer ns time")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return _json_time(int(text), key)
        try:
            ts = pd.Timestamp(text)
        except (ValueError, TypeError, OverflowError):
            raise _RowError(f"{key}: {value[:40]!r} is not ISO-8601 or int ns") from None
        if ts is pd.NaT:
            raise _RowError(f"{key}: {value[:40]!r} is not a time")
        return int((ts.tz_localize("UTC") if ts.tzinfo is None else ts).value)
    raise _RowError(f"{key}: {type(value).__name__} is not a time")


def _decode_json(data: bytes, asset: str, received_ns: int | None) -> TickBatch:
    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return _malformed_entry(asset, f"data: invalid JSON ({str(exc)[:80]})", received_ns)
    if not isinstance(rows, list):
        return _malformed_entry(asset, f"data: expected a JSON array, got {type(rows).__name__}", received_ns)
    n = len(rows)
    errors = _Errors()
    names: list[str] = []
    ts_event = np.zeros(n, dtype=np.int64)
    ts_init = np.zeros(n, dtype=np.int64)
    price, size, bid, ask = (np.full(n, np.nan) for _ in range(4))
    seq = np.full(n, -1, dtype=np.int64)
    status = np.zeros(n, dtype=np.uint8)
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _RowError(f"row: {type(row).__name__} is not an object")
            name = row.get("provider")
            if not isinstance(name, str) or not name.strip():
                raise _RowError("provider: missing or not a non-empty string")
            t_event = _json_time(row.get("ts_event"), "ts_event")
            t_init = _json_time(row["ts_init"], "ts_init") if row.get("ts_init") is not None else (
                t_event if received_ns is None else received_ns)
            p = _json_number(row, "price", required=False)
            s = _json_number(row, "size", required=True)
            b = _json_number(row, "bid", required=False)
            a = _json_number(row, "ask", required=False)
            q = row.get("seq")
            if q is not None and (isinstance(q, bool) or not isinstance(q, int) or not 0 <= q < 2**63):
                raise _RowError(f"seq: {q!r} is not a non-negative integer")
        except _RowError as exc:
            errors.add(f"row {i}: {exc}")
            names.append(UNKNOWN_PROVIDER)
            status[i] = TickStatus.MALFORMED
            continue
        names.append(name)
        ts_event[i], ts_init[i] = t_event, t_init
        size[i] = s
        bid[i] = np.nan if b is None else b
        ask[i] = np.nan if a is None else a
        seq[i] = -1 if q is None else q
        if p is None:
            status[i] = TickStatus.NULL
        else:
            price[i] = p
    vocab = sorted(set(names))
    index = {v: k for k, v in enumerate(vocab)}
    batch = TickBatch(
        asset=asset, providers=tuple(vocab),
        provider=np.fromiter((index[v] for v in names), dtype=np.int16, count=n),
        ts_event=ts_event, ts_init=ts_init, price=price, size=size, bid=bid, ask=ask, seq=seq,
        status=status,
    )
    batch.meta.update(errors.to_meta())
    return batch
