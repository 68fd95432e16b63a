"""The user's own book: position or P&L updates per asset, which the drawdown halt can follow.

A user (a trading system, a risk desk) reports either the **position** it holds in an asset or
the **P&L** of its book in that asset. Once a book has been reported, the asset's
:class:`~tickcast.monitoring.safety.SafetyState` halts and resumes on the book's drawdown
instead of its paper account's: the halt then measures the risk the user really runs.

Messages
--------
Redis stream ``book:<ASSET>`` (one entry per update, fields as strings) or an admin request
body -- the same fields (``docs/ingress.md``, "User book"):

* ``asset`` -- the stream's asset; ``ts`` -- when the update holds, UNIX ns or ISO-8601 (UTC
  without an offset); ``v`` -- optional schema version, ``1``;
* exactly one of ``position`` -- signed exposure as a fraction of the book's equity (``0.5``:
  long half the equity; ``-1``: short all of it; at most ``safety.book_max_abs_position`` in
  absolute value) -- and ``pnl`` -- the book's cumulative P&L in quote currency;
* ``capital`` -- the book's capital in quote currency (> 0); needed with the first ``pnl``.

Book arithmetic (:class:`UserBook`)
-----------------------------------
* position updates: the position holds from its ``ts`` on; each bar close marks the book,
  ``equity *= 1 + position * bar return`` (the user's own fees are unknown here, so none);
* P&L updates: ``equity = capital + pnl`` as reported (the user's own accounting, fees
  included); bars do not move it;
* drawdown = ``1 - equity / high-water mark``. The high-water mark starts anew when the book
  starts, when it switches between position and P&L messages (their units differ), and when a
  message brings a ``capital`` other than the last one (a deposit, a withdrawal, or the user
  rebasing the book after a loss -- the one way to lift a halt of a book that went flat).

Decoding never raises on bad input: :func:`decode_book_entry` and :func:`parse_book_message`
return a :class:`BookRejected` with a reason code (:class:`BookRejection`) naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

BOOK_STREAM_PREFIX = "book:"
BOOK_SCHEMA_VERSION = "1"


class BookKind(str, Enum):
    """What a book update reports."""

    POSITION = "position"
    PNL = "pnl"


class BookRejection(str, Enum):
    """Why a book update was rejected (counted by reason)."""

    MISSING_FIELD = "missing_field"  # asset or ts absent
    BAD_VERSION = "bad_version"  # v other than 1
    ASSET_MISMATCH = "asset_mismatch"  # the entry names another asset than its stream
    BAD_TS = "bad_ts"  # ts neither int ns nor ISO-8601
    BAD_NUMBER = "bad_number"  # position / pnl / capital not a number
    NON_FINITE = "non_finite"  # NaN or infinite
    POSITION_AND_PNL = "position_and_pnl"  # both given
    NO_POSITION_OR_PNL = "no_position_or_pnl"  # neither given
    POSITION_OUT_OF_RANGE = "position_out_of_range"  # |position| > book_max_abs_position
    BAD_CAPITAL = "bad_capital"  # capital <= 0
    UNKNOWN_FIELD = "unknown_field"  # a field the schema does not have
    MISSING_CAPITAL = "missing_capital"  # a pnl update before any capital is known
    STALE = "stale"  # not newer than the last update applied


@dataclass(frozen=True)
class BookUpdate:
    """One validated book update."""

    asset: str
    ts: int  # UNIX ns
    kind: BookKind
    value: float  # the position (fraction of equity) or the P&L (quote currency)
    capital: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"asset": self.asset, "ts": self.ts, "kind": self.kind.value, "value": self.value,
                "capital": self.capital}


@dataclass(frozen=True)
class BookRejected:
    """A rejected book update: the reason code, the field at fault, a readable detail."""

    reason: BookRejection
    field: str | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"reason": self.reason.value, "field": self.field, "detail": self.detail}


def _time_ns(value: Any) -> int:
    """UNIX ns from an int, an integral float, a digit string or an ISO-8601 string."""
    if isinstance(value, bool):
        raise PydanticCustomError(BookRejection.BAD_TS.value, "ts: a boolean is not a time")
    if isinstance(value, int):
        ts = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ts = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        ts = int(value.strip())
    elif isinstance(value, str):
        try:
            stamp = pd.Timestamp(value.strip())
        except (ValueError, TypeError, OverflowError):
            stamp = pd.NaT
        if stamp is pd.NaT:
            raise PydanticCustomError(BookRejection.BAD_TS.value,
                                      "ts: {value!r} is not ISO-8601 or int ns",
                                      {"value": value[:40]})
        ts = int((stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).value)
    else:
        raise PydanticCustomError(BookRejection.BAD_TS.value, "ts: {kind} is not a time",
                                  {"kind": type(value).__name__})
    if not 0 <= ts < 2**63:
        raise PydanticCustomError(BookRejection.BAD_TS.value, "ts: {ts} is outside int64 ns >= 0",
                                  {"ts": ts})
    return ts


def _number(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise PydanticCustomError(BookRejection.BAD_NUMBER.value,
                                  "{name}: a boolean is not a number", {"name": name})
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PydanticCustomError(BookRejection.BAD_NUMBER.value,
                                  "{name}: {value!r} is not a number",
                                  {"name": name, "value": str(value)[:40]}) from None
    if not math.isfinite(v):
        raise PydanticCustomError(BookRejection.NON_FINITE.value, "{name}: {value} is not finite",
                                  {"name": name, "value": str(value)[:40]})
    return v


class BookUpdateMessage(BaseModel):
    """A book update as it arrives (Redis stream fields or an admin request body).

    Validation context (``model_validate(..., context=...)``): ``max_abs_position`` (default
    10) and ``asset`` (the stream's asset, when the message came from ``book:<ASSET>``).

    Examples
    --------
    >>> m = BookUpdateMessage.model_validate({"asset": "BTC-USD", "ts": "2024-01-01T00:01:00Z",
    ...                                       "pnl": "-125.5", "capital": "10000"})
    >>> u = m.to_update(); (u.kind.value, u.value, u.capital, u.ts)
    ('pnl', -125.5, 10000.0, 1704067260000000000)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    asset: str
    ts: int
    position: float | None = None
    pnl: float | None = None
    capital: float | None = None
    v: str | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: Any) -> int:
        return _time_ns(value)

    @field_validator("position", "pnl", "capital", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: Any) -> float | None:
        return _number(value, info.field_name)

    @field_validator("asset", mode="before")
    @classmethod
    def _asset(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise PydanticCustomError(BookRejection.MISSING_FIELD.value, "asset: missing or empty")
        return value.strip()

    @field_validator("v", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str | None:
        if value is None:
            return None
        if str(value).strip() != BOOK_SCHEMA_VERSION:
            raise PydanticCustomError(BookRejection.BAD_VERSION.value,
                                      "v: {value!r} is not schema version 1",
                                      {"value": str(value)[:20]})
        return BOOK_SCHEMA_VERSION

    @model_validator(mode="after")
    def _one_of(self, info: Any) -> "BookUpdateMessage":
        ctx = info.context or {}
        stream_asset = ctx.get("asset")
        if stream_asset is not None and self.asset != stream_asset:
            raise PydanticCustomError(BookRejection.ASSET_MISMATCH.value,
                                      "asset: {asset!r} read from the stream of {stream!r}",
                                      {"asset": self.asset, "stream": stream_asset})
        if self.position is not None and self.pnl is not None:
            raise PydanticCustomError(BookRejection.POSITION_AND_PNL.value,
                                      "position, pnl: give exactly one of them")
        if self.position is None and self.pnl is None:
            raise PydanticCustomError(BookRejection.NO_POSITION_OR_PNL.value,
                                      "position, pnl: give exactly one of them")
        limit = float(ctx.get("max_abs_position", 10.0))
        if self.position is not None and abs(self.position) > limit:
            raise PydanticCustomError(BookRejection.POSITION_OUT_OF_RANGE.value,
                                      "position: |{value}| > {limit}",
                                      {"value": self.position, "limit": limit})
        if self.capital is not None and self.capital <= 0:
            raise PydanticCustomError(BookRejection.BAD_CAPITAL.value,
                                      "capital: {value} must be > 0", {"value": self.capital})
        return self

    def to_update(self) -> BookUpdate:
        """The validated update."""
        if self.position is not None:
            return BookUpdate(self.asset, self.ts, BookKind.POSITION, self.position, self.capital)
        assert self.pnl is not None  # the model validator saw to it
        return BookUpdate(self.asset, self.ts, BookKind.PNL, self.pnl, self.capital)


# The field at fault of the checks that look at several fields (no location of their own).
_REASON_FIELDS = {BookRejection.ASSET_MISMATCH: "asset", BookRejection.POSITION_AND_PNL: "pnl",
                  BookRejection.NO_POSITION_OR_PNL: "position",
                  BookRejection.POSITION_OUT_OF_RANGE: "position",
                  BookRejection.BAD_CAPITAL: "capital"}
# Pydantic's own error types mapped to reason codes (ours carry the code as their type).
_PYDANTIC_REASONS = {"missing": BookRejection.MISSING_FIELD,
                     "extra_forbidden": BookRejection.UNKNOWN_FIELD,
                     "string_type": BookRejection.MISSING_FIELD,
                     "int_type": BookRejection.BAD_TS}


def parse_book_message(data: Mapping[str, Any], *, asset: str | None = None,
                       max_abs_position: float = 10.0) -> BookUpdate | BookRejected:
    """Validate a book update given as a mapping of field names to values.

    Parameters
    ----------
    data
        The fields (strings, numbers or None).
    asset
        The asset the message must name (its stream's), or ``None``.
    max_abs_position
        Largest accepted ``|position|`` (``safety.book_max_abs_position``).

    Examples
    --------
    >>> parse_book_message({"asset": "X", "ts": 5, "position": 0.5}).kind.value
    'position'
    >>> r = parse_book_message({"asset": "X", "ts": 5, "position": 0.5, "pnl": 3})
    >>> r.reason.value, r.field
    ('position_and_pnl', 'pnl')
    >>> r = parse_book_message({"asset": "X", "ts": "soon", "pnl": 3})
    >>> r.reason.value, r.field
    ('bad_ts', 'ts')
    """
    try:
        msg = BookUpdateMessage.model_validate(
            dict(data), context={"asset": asset, "max_abs_position": max_abs_position})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        kind = str(err.get("type", ""))
        try:
            reason = BookRejection(kind)
        except ValueError:
            reason = _PYDANTIC_REASONS.get(kind, BookRejection.BAD_NUMBER)
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else _REASON_FIELDS.get(reason)
        return BookRejected(reason, field, str(err.get("msg", kind)))
    return msg.to_update()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def book_stream_key(asset: str) -> str:
    """The stream of ``asset``'s book updates, ``book:<ASSET>``."""
    return f"{BOOK_STREAM_PREFIX}{asset}"


def decode_book_entry(asset: str, fields: Mapping[Any, Any],
                      max_abs_position: float = 10.0) -> BookUpdate | BookRejected:
    """Decode one entry of the Redis stream ``book:<asset>`` (field names and values as bytes
    or str) into an update, or a rejection naming the reason and field.

    Examples
    --------
    >>> u = decode_book_entry("BTC-USD", {b"asset": b"BTC-USD", b"ts": b"1704067200000000000",
    ...                                   b"position": b"-0.25"})
    >>> (u.kind.value, u.value, u.ts)
    ('position', -0.25, 1704067200000000000)
    >>> r = decode_book_entry("BTC-USD", {b"asset": b"ETH-USD", b"ts": b"1", b"pnl": b"2"})
    >>> r.reason.value, r.field
    ('asset_mismatch', 'asset')
    >>> decode_book_entry("BTC-USD", {b"asset": b"BTC-USD", b"ts": b"1", b"pnl": b"nan"}).reason.value
    'non_finite'
    """
    data = {_text(k): _text(v) for k, v in fields.items()}
    return parse_book_message(data, asset=asset, max_abs_position=max_abs_position)


class UserBook:
    """Equity, high-water mark and drawdown of a user's book in one asset (module notes).

    Examples
    --------
    >>> book = UserBook()
    >>> book.apply(BookUpdate("X", 1, BookKind.POSITION, 1.0)) is None
    True
    >>> book.mark(-0.04); book.mark(0.01)
    >>> round(book.equity, 6), round(book.drawdown, 6)
    (0.9696, 0.0304)
    >>> book.apply(BookUpdate("X", 2, BookKind.PNL, -500.0)).value  # no capital known yet
    'missing_capital'
    >>> book.apply(BookUpdate("X", 3, BookKind.PNL, -500.0, capital=10_000.0)) is None
    True
    >>> book.kind.value, book.equity, book.drawdown  # a new unit: a new high-water mark
    ('pnl', 9500.0, 0.0)
    >>> _ = book.apply(BookUpdate("X", 4, BookKind.PNL, -1500.0)); round(book.drawdown, 4)
    0.1053
    """

    def __init__(self) -> None:
        self.kind: BookKind | None = None
        self.position = 0.0
        self.capital: float | None = None
        self.equity = 1.0
        self.peak = 1.0
        self.last_ts = -1
        self.updates = 0
        self.rebases = 0
        self.worst_drawdown = 0.0

    @property
    def active(self) -> bool:
        """Whether an update has been applied (the halt then follows the book)."""
        return self.kind is not None

    @property
    def drawdown(self) -> float:
        """``1 - equity / high-water mark``, in [0, 1]."""
        if self.peak <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.equity / self.peak))

    def _rebase(self, equity: float) -> None:
        self.equity = equity
        self.peak = equity
        self.rebases += 1

    def apply(self, update: BookUpdate) -> BookRejection | None:
        """Apply an update; returns ``None``, or why it was not applied (state unchanged)."""
        if update.ts <= self.last_ts:
            return BookRejection.STALE
        capital = update.capital if update.capital is not None else self.capital
        if update.kind is BookKind.PNL and capital is None:
            return BookRejection.MISSING_CAPITAL
        new_base = self.kind is not update.kind or (
            update.capital is not None and update.capital != self.capital)
        if update.kind is BookKind.POSITION:
            if new_base:
                self._rebase(1.0)
            self.position = update.value
        else:
            assert capital is not None
            equity = capital + update.value
            if new_base:
                self._rebase(equity)
            else:
                self.equity = equity
                self.peak = max(self.peak, equity)
            self.position = 0.0
        self.kind = update.kind
        self.capital = capital
        self.last_ts = update.ts
        self.updates += 1
        self.worst_drawdown = max(self.worst_drawdown, self.drawdown)
        return None

    def mark(self, simple_return: float) -> None:
        """One bar's simple return on the position held (position books only)."""
        if self.kind is not BookKind.POSITION:
            return
        self.equity = max(0.0, self.equity * (1.0 + self.position * simple_return))
        self.peak = max(self.peak, self.equity)
        self.worst_drawdown = max(self.worst_drawdown, self.drawdown)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"kind": None if self.kind is None else self.kind.value, "position": self.position,
                "capital": self.capital, "equity": self.equity, "peak": self.peak,
                "drawdown": self.drawdown, "worst_drawdown": self.worst_drawdown,
                "last_ts": self.last_ts, "updates": self.updates, "rebases": self.rebases}
