"""Online features in Redis: the latest feature row per asset, for the serving path.

Per asset, a hash ``features:<ASSET>`` with fields

- ``bar_ts``: open time (UNIX ns) of the bar whose close produced the row,
- ``schema``: the feature schema hash (``tickcast.features.definitions.schema_hash()``),
- ``names``: JSON list of feature names,
- ``values``: float64 little-endian bytes, one per name,
- ``updated``: UNIX ns when the row was written,
- ``close`` (when the publisher knows it): the close of bar ``bar_ts``, the reference price
  of a prediction made from the row (without it, servers look the bar up in the bar store),

a capped stream ``features_log:<ASSET>`` with the same fields per write (for audit and for
replaying what the server saw), and one entry ``{asset, kind=features, bar_ts}`` per write on
the shared change feed ``changes:online`` (:data:`tickcast.streams.CHANGES_STREAM`), which the
serving replicas follow to re-read only the rows that changed. A write is one server-side
script, so the hash, the log and the change feed never disagree, and it never moves the hash
back in time: a row for an older bar (a replay, or a late amendment of an earlier bar) is
refused (and announces nothing), while a row for the same bar (an amendment of the current
bar) replaces it.

The store holds a live client. Pickling keeps only its connection settings (host, port, db,
credentials, timeouts); the copy opens its own connections on first use, the way redis-py
connects lazily.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import redis

from tickcast.errors import InvalidInput, ServiceUnavailable
from tickcast.streams import CHANGES_MAXLEN, CHANGES_STREAM, ChangeKind

HASH_PREFIX = "features:"
LOG_PREFIX = "features_log:"
_FIELDS = (b"bar_ts", b"schema", b"names", b"values", b"updated")

# KEYS: hash, log stream, change feed. ARGV: bar_ts, schema, names, values, updated, log maxlen,
# close ('' when unknown: a close left from an earlier bar must not describe this one), asset,
# change feed maxlen, change kind.
# Timestamps are compared as decimal strings (length, then lexicographic) because Lua numbers
# are doubles and would blur nanoseconds.
# Every check comes before the first write: Redis never rolls a script back, so a key of the
# wrong type found half-way would leave the hash written and the change unannounced.
_WRITE_LUA = """
for i = 2, 3 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a stream')
  end
end
local cur = redis.call('HGET', KEYS[1], 'bar_ts')
if cur then
  local new = ARGV[1]
  if string.len(cur) > string.len(new) or (string.len(cur) == string.len(new) and cur > new) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'bar_ts', ARGV[1], 'schema', ARGV[2], 'names', ARGV[3],
           'values', ARGV[4], 'updated', ARGV[5])
if ARGV[7] == '' then
  redis.call('HDEL', KEYS[1], 'close')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'bar_ts', ARGV[1], 'schema', ARGV[2],
             'names', ARGV[3], 'values', ARGV[4], 'updated', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'close', ARGV[7])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'bar_ts', ARGV[1], 'schema', ARGV[2],
             'names', ARGV[3], 'values', ARGV[4], 'updated', ARGV[5], 'close', ARGV[7])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', 'asset', ARGV[8], 'kind', ARGV[10],
           'bar_ts', ARGV[1])
return 1
"""

# Connection settings carried across pickling (everything else is rebuilt by redis-py).
_PICKLED_KWARGS = ("host", "port", "db", "username", "password", "path", "socket_timeout",
                   "socket_connect_timeout", "client_name")


@dataclass(eq=False)
class FeatureRow:
    """One asset's latest online feature row."""

    asset: str
    bar_ts: int
    schema: str
    names: tuple[str, ...]
    values: np.ndarray
    updated: int
    extra: dict[str, str] = field(default_factory=dict)

    def age_s(self, now_ns: int | None = None) -> float:
        """Seconds since the row was written."""
        now = time.time_ns() if now_ns is None else now_ns
        return (now - self.updated) / 1e9

    def as_dict(self) -> dict[str, float]:
        """Feature name -> value."""
        return dict(zip(self.names, self.values.tolist()))


def _check_asset(asset: object) -> str:
    if not isinstance(asset, str) or not asset or any(ch.isspace() for ch in asset):
        raise InvalidInput(f"asset {asset!r} must be a non-empty string without spaces", field="asset")
    return asset


class OnlineFeatureStore:
    """Latest feature rows per asset in Redis (hash + capped log stream).

    Parameters
    ----------
    client
        A ``redis.Redis`` returning bytes (``decode_responses=False``), e.g. from
        :func:`tickcast.redis_server.connect`.
    log_maxlen
        Approximate cap of each ``features_log:<ASSET>`` stream (Redis trims in whole macro
        nodes, so the length may exceed it slightly).
    changes_stream, changes_maxlen
        The change feed every write announces itself on, and its approximate cap (the
        defaults are the shared :data:`~tickcast.streams.CHANGES_STREAM`; tests use their own).

    Raises
    ------
    InvalidInput
        A client that decodes responses, ``log_maxlen < 1``, an empty ``changes_stream`` or
        ``changes_maxlen < 1``.
    """

    def __init__(self, client: redis.Redis, *, log_maxlen: int = 10_000,
                 changes_stream: str = CHANGES_STREAM, changes_maxlen: int = CHANGES_MAXLEN) -> None:
        if not isinstance(client, redis.Redis):
            raise InvalidInput(f"client must be a redis.Redis, got {type(client).__name__}", field="client")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise InvalidInput("the client must return bytes (decode_responses=False)", field="client")
        if isinstance(log_maxlen, bool) or not isinstance(log_maxlen, int) or log_maxlen < 1:
            raise InvalidInput("log_maxlen must be an integer >= 1", field="log_maxlen")
        if not isinstance(changes_stream, str) or not changes_stream:
            raise InvalidInput("changes_stream must be a non-empty key", field="changes_stream")
        if isinstance(changes_maxlen, bool) or not isinstance(changes_maxlen, int) or changes_maxlen < 1:
            raise InvalidInput("changes_maxlen must be an integer >= 1", field="changes_maxlen")
        self.client = client
        self.log_maxlen = log_maxlen
        self.changes_stream = changes_stream
        self.changes_maxlen = changes_maxlen
        self._script = client.register_script(_WRITE_LUA)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0, log_maxlen: int = 10_000,
                 changes_stream: str = CHANGES_STREAM,
                 changes_maxlen: int = CHANGES_MAXLEN) -> "OnlineFeatureStore":
        """A store with its own client for ``url`` (bounded socket timeouts)."""
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, log_maxlen=log_maxlen, changes_stream=changes_stream,
                   changes_maxlen=changes_maxlen)

    def __getstate__(self) -> dict[str, Any]:
        kwargs = self.client.connection_pool.connection_kwargs
        return {"conn": {k: kwargs[k] for k in _PICKLED_KWARGS if kwargs.get(k) is not None},
                "log_maxlen": self.log_maxlen, "changes_stream": self.changes_stream,
                "changes_maxlen": self.changes_maxlen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        conn = dict(state["conn"])
        if "path" in conn:
            conn["unix_socket_path"] = conn.pop("path")
        self.__init__(redis.Redis(**conn), log_maxlen=state["log_maxlen"],  # type: ignore[misc]
                      changes_stream=state.get("changes_stream", CHANGES_STREAM),
                      changes_maxlen=state.get("changes_maxlen", CHANGES_MAXLEN))

    def write(
        self,
        asset: str,
        bar_ts: int,
        schema_hash: str,
        names: Sequence[str],
        values: np.ndarray | Sequence[float],
        updated_ns: int | None = None,
        close: float | None = None,
    ) -> bool:
        """Publish the feature row of ``asset`` computed at the close of bar ``bar_ts``.

        ``close``, the bar's close price, is stored with the row when given (the reference
        price servers quote predictions against).

        The hash, its log entry and the change feed entry are written by one script (all or
        nothing).

        Returns
        -------
        bool
            True when stored; False when the hash already holds a newer bar (nothing written,
            nothing announced).

        Raises
        ------
        InvalidInput
            Bad asset, non-integer or negative ``bar_ts``, names that are not unique strings,
            or values that are not a 1-D numeric array of the same length (NaN is allowed:
            features warming up), or a ``close`` that is not a finite positive number.
        redis.RedisError
            The server is unreachable (callers guard this with a circuit breaker).
        """
        asset = _check_asset(asset)
        if isinstance(bar_ts, bool) or not isinstance(bar_ts, (int, np.integer)) or int(bar_ts) < 0:
            raise InvalidInput(f"bar_ts must be a non-negative integer UNIX ns, got {bar_ts!r}", field="bar_ts")
        if not isinstance(schema_hash, str) or not schema_hash:
            raise InvalidInput("schema_hash must be a non-empty string", field="schema_hash")
        names = list(names)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise InvalidInput("names must be unique non-empty strings", field="names")
        try:
            arr = np.asarray(values, dtype="<f8")
        except (TypeError, ValueError):
            raise InvalidInput("values must be numeric", field="values") from None
        if arr.ndim != 1 or len(arr) != len(names):
            raise InvalidInput(f"values must be 1-D with {len(names)} entries, got shape {arr.shape}", field="values")
        close_arg = ""
        if close is not None:
            try:
                price = float(close)
            except (TypeError, ValueError):
                raise InvalidInput(f"close must be a number, got {close!r}", field="close") from None
            if not math.isfinite(price) or price <= 0:
                raise InvalidInput(f"close must be finite and positive, got {price!r}", field="close")
            close_arg = repr(price)  # shortest text that reads back as the same double
        updated = time.time_ns() if updated_ns is None else int(updated_ns)
        applied = self._script(
            keys=[HASH_PREFIX + asset, LOG_PREFIX + asset, self.changes_stream],
            args=[str(int(bar_ts)), schema_hash, json.dumps(names), arr.tobytes(), str(updated),
                  str(self.log_maxlen), close_arg, asset, str(self.changes_maxlen),
                  ChangeKind.FEATURES.value],
        )
        return bool(int(applied))

    @staticmethod
    def decode(asset: str, raw: dict[bytes, bytes]) -> FeatureRow | None:
        """A ``features:<ASSET>`` hash as read by ``HGETALL`` (None when empty), for callers that
        pipeline their own reads.

        Raises
        ------
        ServiceUnavailable
            The hash is unreadable (written by something else).
        """
        if not raw:
            return None
        try:
            names = tuple(json.loads(raw[b"names"]))
            values = np.frombuffer(raw[b"values"], dtype="<f8").astype(np.float64)
            if len(values) != len(names):
                raise ValueError(f"{len(names)} names but {len(values)} values")
            extra = {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items() if k not in _FIELDS}
            return FeatureRow(
                asset=asset,
                bar_ts=int(raw[b"bar_ts"]),
                schema=raw[b"schema"].decode(),
                names=names,
                values=values,
                updated=int(raw[b"updated"]),
                extra=extra,
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ServiceUnavailable(f"{HASH_PREFIX}{asset} is unreadable: {exc}") from None

    def read(self, asset: str) -> FeatureRow | None:
        """The latest row of ``asset``, or None when none was written.

        Raises
        ------
        ServiceUnavailable
            The stored hash is unreadable (written by something else).
        """
        asset = _check_asset(asset)
        return self.decode(asset, self.client.hgetall(HASH_PREFIX + asset))

    def read_many(self, assets: Iterable[str]) -> dict[str, FeatureRow | None]:
        """Latest rows of several assets in one pipelined round trip (None where absent)."""
        assets = [_check_asset(a) for a in assets]
        if not assets:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for a in assets:
            pipe.hgetall(HASH_PREFIX + a)
        return {a: self.decode(a, raw) for a, raw in zip(assets, pipe.execute())}

    def log(self, asset: str, count: int = 100) -> list[FeatureRow]:
        """The most recent ``count`` rows written for ``asset`` (oldest first)."""
        asset = _check_asset(asset)
        entries = self.client.xrevrange(LOG_PREFIX + asset, count=count)
        return [row for _, fields in reversed(entries) if (row := self.decode(asset, fields)) is not None]
