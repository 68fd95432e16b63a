"""The ``safety:<ASSET>`` hash (regime, multiplier, halt) and its announcement on the change feed.

Serving replicas do not poll every asset's safety hash: they follow the change feed
``changes:online`` (:data:`tickcast.streams.CHANGES_STREAM`) and re-read a hash only when an
entry ``{asset, kind=safety}`` names it. Every writer of a safety hash therefore goes through
:func:`publish_safety` / :func:`clear_safety`, which write the hash and the feed entry in one
server-side script: no reader sees one without the other, and the script checks both keys'
types before writing anything (Redis never rolls a script back), so it writes both or neither.
A bare ``HSET`` still reaches the replicas, but only at their periodic full resync
(``serve.feature_resync_s``).
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Mapping

import redis

from tickcast.errors import InvalidInput
from tickcast.streams import CHANGES_MAXLEN, CHANGES_STREAM, ChangeKind, safety_key

Value = str | bytes | int | float  # numpy scalars too (numbers.Integral / numbers.Real)


class _Mode(str, Enum):
    SET = "set"
    CLEAR = "clear"


# KEYS: safety hash, change feed. ARGV: asset, feed maxlen, change kind, 'set'|'clear',
# field, value, ... (for 'set').
_PUBLISH_LUA = """
local want = {'hash', 'stream'}
for i = 1, 2 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= want[i] then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want[i])
  end
end
if ARGV[4] == 'clear' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'asset', ARGV[1], 'kind', ARGV[3])
return 1
"""


def _check_asset(asset: object) -> str:
    if not isinstance(asset, str) or not asset or any(ch.isspace() for ch in asset):
        raise InvalidInput(f"asset {asset!r} must be a non-empty string without spaces", field="asset")
    return asset


def _encode(mapping: Mapping[str, Value]) -> dict[str, str | bytes]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise InvalidInput("mapping must be a non-empty mapping of field -> value", field="mapping")
    out: dict[str, str | bytes] = {}
    for name, value in mapping.items():
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"field names must be non-empty strings, got {name!r}", field="mapping")
        if isinstance(value, (str, bytes)):
            out[name] = value
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            out[name] = str(int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                raise InvalidInput(f"value of {name!r} must be finite, got {number!r}",
                                   field=f"mapping.{name}")
            out[name] = repr(number)  # shortest text that reads back as the same double
        else:
            raise InvalidInput(f"value of {name!r} must be str, bytes or a number, got "
                               f"{type(value).__name__}", field=f"mapping.{name}")
    return out


def _run(client: redis.Redis, asset: str, mode: _Mode, fields: list[str | bytes],
         changes_stream: str, changes_maxlen: int) -> None:
    if not isinstance(changes_stream, str) or not changes_stream:
        raise InvalidInput("changes_stream must be a non-empty key", field="changes_stream")
    if isinstance(changes_maxlen, bool) or not isinstance(changes_maxlen, int) or changes_maxlen < 1:
        raise InvalidInput("changes_maxlen must be an integer >= 1", field="changes_maxlen")
    script = client.register_script(_PUBLISH_LUA)  # EVALSHA, loaded once per server
    script(keys=[safety_key(asset), changes_stream],
           args=[asset, str(changes_maxlen), ChangeKind.SAFETY.value, mode.value, *fields])


def publish_safety(client: redis.Redis, asset: str, mapping: Mapping[str, Value], *,
                   changes_stream: str = CHANGES_STREAM, changes_maxlen: int = CHANGES_MAXLEN) -> None:
    """Set fields of ``safety:<asset>`` (``HSET``: other fields stay) and announce the change.

    The serving contract is ``regime`` (NORMAL/ELEVATED/CRISIS), ``multiplier`` and ``halted``
    (``"1"``/``"0"``); other fields (``updated``, the evidence) are kept for operators.

    Raises
    ------
    InvalidInput
        Bad asset, an empty mapping, a field that is not a non-empty string, a value that is not
        str, bytes or a finite number (bools are refused: write ``"1"``/``"0"``).
    redis.RedisError
        The server is unreachable, or a key holds another type; then neither the hash nor the
        feed entry was written.

    Examples
    --------
    >>> import tempfile
    >>> from tickcast.redis_server import EmbeddedRedis, connect
    >>> srv = EmbeddedRedis.start(tempfile.mkdtemp())
    >>> r = connect(srv.url)
    >>> publish_safety(r, "BTC-USD", {"regime": "CRISIS", "multiplier": 0.25, "halted": "0"})
    >>> r.hget("safety:BTC-USD", "multiplier"), r.xrange("changes:online")[0][1][b"kind"]
    (b'0.25', b'safety')
    >>> srv.stop()
    """
    asset = _check_asset(asset)
    flat: list[str | bytes] = []
    for name, value in _encode(mapping).items():
        flat += [name, value]
    _run(client, asset, _Mode.SET, flat, changes_stream, changes_maxlen)


def clear_safety(client: redis.Redis, asset: str, *, changes_stream: str = CHANGES_STREAM,
                 changes_maxlen: int = CHANGES_MAXLEN) -> None:
    """Delete ``safety:<asset>`` (replicas then serve NORMAL, multiplier 1) and announce it.

    Raises
    ------
    InvalidInput
        Bad asset.
    redis.RedisError
        The server is unreachable, or a key holds another type; nothing was changed.
    """
    asset = _check_asset(asset)
    _run(client, asset, _Mode.CLEAR, [], changes_stream, changes_maxlen)
