"""Producer side of the ingress: tick batches into the per-asset Redis Streams.

One stream entry per tick batch (``encode_batch``: Arrow IPC), several entries per Redis round
trip (a pipeline), and every round trip through a :class:`~tickcast.storage.wal.GuardedWriter`:
while Redis is unreachable the circuit breaker opens and entries go to a local write-ahead log
that is replayed, in order, once Redis answers again. A batch handed to :meth:`StreamFeeder.add`
is therefore durable (in Redis or in the WAL) once :meth:`StreamFeeder.flush` returns.

Replays must not double anything, so the feeder chooses every entry id itself instead of letting
Redis pick one (``*``): ids are ``<base_ms>-<n>`` with ``base_ms`` above the stream's last id at
start-up and ``n`` counting the entries of this run. Re-sending an entry that already reached
Redis (a round trip that failed after the server applied part of it) is answered "ID equal or
smaller than the top item", which the feeder reads as "already written". One producer per
stream at a time is assumed (a second one would race on ids); feed handlers written in other
languages follow the same rule or use ``XADD ... *`` on a stream of their own asset.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tickcast.config import Settings
from tickcast.sources import stream
from tickcast.sources.stream import encode_batch
from tickcast.storage.breaker import CircuitBreaker
from tickcast.storage.wal import GuardedWriter, WriteAheadLog
from tickcast.ticks import TickBatch

# Redis's answer to an XADD whose explicit id is not above the stream's top: for our ids, the
# entry is already there (a replayed round trip).
_ID_TOO_SMALL = "equal or smaller than the target stream top item"
SENT_FIELD = "sent"  # optional entry field: UNIX ns when the producer wrote the entry


def stream_key(settings: Settings, asset: str) -> str:
    """Name of the ingress stream of ``asset`` (``ticks:<ASSET>`` by default)."""
    return stream.stream_key(asset, settings.ingest.stream_prefix)


def parse_entry_id(entry_id: str | bytes) -> tuple[int, int]:
    """``"1700000000000-5"`` -> ``(1700000000000, 5)``; ordering of ids = ordering of tuples.

    >>> parse_entry_id(b"12-3") < parse_entry_id("12-10")
    True
    """
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_entry_id(ms: int, seq: int) -> str:
    """Inverse of :func:`parse_entry_id`."""
    return f"{ms}-{seq}"


@dataclass
class FeederStats:
    """What the feeder has sent so far (for progress lines and reports)."""

    entries: int = 0
    ticks: int = 0
    round_trips: int = 0


class StreamFeeder:
    """Append tick batches to per-asset ingress streams, durably and without doubles.

    Parameters
    ----------
    client
        Redis client (bounded timeouts, see :func:`tickcast.redis_server.connect`).
    settings
        ``ingest`` (stream prefix, entries per round trip), ``breaker`` (the guard).
    wal_path
        Write-ahead log file used while Redis is unreachable. Entries left there by an earlier
        run that could not reach Redis are sent first.
    assets
        Streams this feeder writes; their ids are reserved at construction (Redis must answer).

    Examples
    --------
    The id scheme (no server needed): ids grow within a run and start above the stream's top.

    >>> StreamFeeder.first_id_ms(last_id=b"1700000000000-7", now_ms=1600000000000)
    1700000000001
    """

    def __init__(self, client: redis.Redis, settings: Settings, wal_path: str | Path,
                 assets: tuple[str, ...]) -> None:
        self.client = client
        self.settings = settings
        self.assets = tuple(assets)
        self.breaker = CircuitBreaker(settings.breaker, "redis:feeder")
        Path(wal_path).parent.mkdir(parents=True, exist_ok=True)
        self.wal = WriteAheadLog(Path(wal_path))
        self.writer = GuardedWriter(self.breaker, self.wal, self._write)
        self.stats = FeederStats()
        self._buffer: list[tuple[str, str, dict[str, bytes]]] = []
        self._base_ms: dict[str, int] = {}
        self._next_seq: dict[str, int] = {}
        self._last_id: dict[str, str] = {}
        now_ms = int(time.time() * 1000)
        for asset in self.assets:
            key = stream_key(settings, asset)
            self._base_ms[asset] = self.first_id_ms(self._stream_top(key), now_ms)
            self._next_seq[asset] = 0

    @staticmethod
    def first_id_ms(last_id: bytes | str | None, now_ms: int) -> int:
        """Millisecond part of this run's ids: the clock, but always above the stream's top."""
        if last_id is None:
            return now_ms
        return max(now_ms, parse_entry_id(last_id)[0] + 1)

    def _stream_top(self, key: str) -> bytes | None:
        try:
            info = self.client.xinfo_stream(key)
        except redis.ResponseError:  # no such stream yet
            return None
        top = info.get("last-generated-id") or info.get(b"last-generated-id")
        return top if top not in (None, b"0-0", "0-0") else None

    # -- producing ----------------------------------------------------------------------------
    def add(self, batch: TickBatch) -> str:
        """Queue one batch as one stream entry; returns its entry id.

        The entry is durable after the next :meth:`flush` (called automatically every
        ``ingest.xadd_pipeline_entries`` entries).
        """
        asset = batch.asset
        if asset not in self._base_ms:
            raise ValueError(f"feeder was not opened for asset {asset!r}")
        seq = self._next_seq[asset]
        self._next_seq[asset] = seq + 1
        entry_id = format_entry_id(self._base_ms[asset], seq)
        self._buffer.append((stream_key(self.settings, asset), entry_id, encode_batch(batch)))
        self._last_id[asset] = entry_id
        self.stats.entries += 1
        self.stats.ticks += len(batch)
        if len(self._buffer) >= self.settings.ingest.xadd_pipeline_entries:
            self.flush()
        return entry_id

    def flush(self) -> None:
        """Send the queued entries in one round trip (or log them while Redis is down)."""
        if not self._buffer:
            return
        payload = pickle.dumps(self._buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self._buffer = []
        self.stats.round_trips += 1
        self.writer.write(payload)
        if self.writer.pending:
            # Redis was down: keep replaying the backlog (in order, behind the breaker) as we
            # go, so that consumers resume as soon as Redis answers rather than at the end.
            self.writer.drain()

    def drain(self, timeout_s: float) -> bool:
        """Flush, then replay the WAL until it is empty or ``timeout_s`` passes.

        Returns True when everything handed to :meth:`add` is in Redis.
        """
        self.flush()
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            self.writer.drain()
            if self.pending() == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def pending(self) -> int:
        """Round trips waiting in the WAL."""
        return self.writer.pending

    @property
    def last_ids(self) -> dict[str, str]:
        """Id of the last entry added per asset (what the consumers must reach)."""
        return dict(self._last_id)

    def backlog(self) -> int:
        """Entries still in the assets' streams (consumers trim what they have stored)."""
        pipe = self.client.pipeline(transaction=False)
        for asset in self.assets:
            pipe.xlen(stream_key(self.settings, asset))
        return int(sum(pipe.execute()))

    # -- the guarded write ----------------------------------------------------------------------
    def _write(self, payload: bytes) -> None:
        """One pipelined round trip of XADDs with explicit ids (idempotent, see module doc)."""
        entries: list[tuple[str, str, dict[str, bytes]]] = pickle.loads(payload)
        pipe = self.client.pipeline(transaction=False)
        # ``sent``: when the entry reached Redis (UNIX ns; consumers time bar emission from it).
        sent = str(time.time_ns()).encode()
        for key, entry_id, fields in entries:
            pipe.xadd(key, {**fields, SENT_FIELD: sent}, id=entry_id)  # type: ignore[arg-type,dict-item]
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, redis.ResponseError) and _ID_TOO_SMALL in str(result):
                continue  # already applied by an earlier attempt of this round trip
            if isinstance(result, Exception):
                raise result
