"""Asynchronous prediction log: every prediction of both slots to its asset's Redis stream.

Each row goes to ``<serve.prediction_stream>:<ASSET>`` (``predictions:BTC-USD``, named by
:func:`tickcast.streams.prediction_stream_key`), capped at about
``serve.prediction_stream_maxlen_per_asset`` entries, so that a reader of one asset (its drift
and safety state, an audit) reads that asset's predictions only: the closed loop's work grows
with the number of assets, not with its square.

The request path only appends a list of row tuples to a bounded in-memory queue (a lock and a
counter, about a microsecond); it never waits for Redis and never fails because of it. A
background thread takes the queued rows, encodes them as pipelined ``XADD`` commands, each to
its row's asset stream (RESP written directly: about 2.5 µs per entry instead of ~15 µs through
the generic command path) and sends them in chunks of ``serve.prediction_log_batch`` entries through a
:class:`~tickcast.storage.breaker.CircuitBreaker`.

Overload and outages lose log entries, never requests:

* queue full (``serve.prediction_log_queue`` rows) → the new rows are dropped and counted;
* breaker open → rows wait in the queue (up to its bound) until the breaker lets a probe in;
* a chunk whose write fails (connection lost, timeout) → dropped and counted (re-sending it
  could duplicate entries that did reach their streams);
* an ``XADD`` the server refuses (an asset's key holding another type) → that row dropped and
  counted; the rest of the chunk is written, and the breaker counts it as a success (the server
  answered);
* the writer never uses more than ``serve.prediction_log_max_busy`` of the wall clock (it
  sleeps in proportion to the time it worked), so logging cannot starve the request threads of
  the interpreter lock under a flood such as 1,000-asset batches; the excess is dropped and
  counted.

Stream entry fields (all strings): ``request_id``, ``asset``, ``slot`` (blue/green),
``version``, ``bar_ts`` (UNIX ns of the features' bar, ``-1`` for explicit features), ``pred``,
``lo``, ``hi`` (median and interval bounds, log return), ``price`` (reference close, ``nan`` if
unknown), ``ts`` (UNIX ns when logged), ``shadow`` (``1`` for a mirrored prediction that was
not returned to the client).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import redis

from tickcast.config import BreakerConfig
from tickcast.errors import CircuitOpen
from tickcast.storage.breaker import CircuitBreaker
from tickcast.streams import prediction_stream_key

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("request_id", "asset", "slot", "version", "bar_ts", "pred", "lo", "hi",
                           "price", "ts", "shadow")
# One queued row, in FIELDS order minus ``ts`` (stamped when the row is encoded):
# (request_id, asset, slot, version, bar_ts|None, pred, lo, hi, price|None, shadow)
Row = tuple[str, str, str, str, "int | None", float, float, float, "float | None", bool]
# Command heads kept per asset; beyond this many distinct assets the cache starts over (assets
# are validated and routed, so this bounds memory, it is not expected to be reached).
_MAX_HEADS = 100_000


def _bulk(value: str) -> str:
    return f"${len(value.encode())}\r\n{value}\r\n"


class RespXaddEncoder:
    """Encodes prediction rows as RESP ``XADD <prefix>:<asset> MAXLEN ~ <n> * field value ...``
    commands, one per row, each to the stream of the row's asset.

    Parameters
    ----------
    prefix
        Stream key prefix (``serve.prediction_stream``); a row of asset A goes to
        ``prediction_stream_key(prefix, A)``.
    maxlen
        Approximate cap of each asset's stream length (``MAXLEN ~``).

    Examples
    --------
    >>> enc = RespXaddEncoder("predictions", 1000)
    >>> cmd = enc.encode([("r1", "BTC-USD", "blue", "v1", 60, 0.5, 0.25, 0.75, 100.0, False)], 7)
    >>> cmd.count(b"\\r\\n$"), cmd.startswith(b"*28\\r\\n$4\\r\\nXADD\\r\\n$19\\r\\npredictions:BTC-USD\\r\\n")
    (28, True)
    >>> b"$6\\r\\nshadow\\r\\n$1\\r\\n0\\r\\n" in cmd
    True
    """

    def __init__(self, prefix: str, maxlen: int) -> None:
        if not prefix:
            raise ValueError("prefix must be a non-empty key prefix")
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.prefix = prefix
        self.maxlen = int(maxlen)
        nargs = 6 + 2 * len(FIELDS)
        self._cmd = f"*{nargs}\r\n$4\r\nXADD\r\n"
        self._tail = f"$6\r\nMAXLEN\r\n$1\r\n~\r\n{_bulk(str(self.maxlen))}$1\r\n*\r\n"
        self._heads: dict[str, str] = {}
        self._names = [_bulk(name) for name in FIELDS]

    def head(self, asset: str) -> str:
        """RESP text of ``XADD <stream of asset> MAXLEN ~ <n> *`` (cached per asset)."""
        head = self._heads.get(asset)
        if head is None:
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            head = self._heads[asset] = (f"{self._cmd}{_bulk(prediction_stream_key(self.prefix, asset))}"
                                         f"{self._tail}")
        return head

    def encode(self, rows: Sequence[Row], ts_ns: int) -> bytes:
        """RESP bytes of one ``XADD`` per row (to its asset's stream), all stamped ``ts_ns``."""
        heads = self._heads
        head_of = self.head
        n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10 = self._names
        ts = str(int(ts_ns))
        tsf = f"{n9}${len(ts)}\r\n{ts}\r\n"
        out: list[str] = []
        append = out.append
        for rid, asset, slot, version, bar_ts, pred, lo, hi, price, shadow in rows:
            head = heads.get(asset) or head_of(asset)
            b = "-1" if bar_ts is None else str(int(bar_ts))
            p = repr(float(pred))
            lw = repr(float(lo))
            h = repr(float(hi))
            pr = "nan" if price is None else repr(float(price))
            append(
                f"{head}{n0}${len(rid)}\r\n{rid}\r\n{n1}${len(asset)}\r\n{asset}\r\n"
                f"{n2}${len(slot)}\r\n{slot}\r\n{n3}${len(version)}\r\n{version}\r\n"
                f"{n4}${len(b)}\r\n{b}\r\n{n5}${len(p)}\r\n{p}\r\n{n6}${len(lw)}\r\n{lw}\r\n"
                f"{n7}${len(h)}\r\n{h}\r\n{n8}${len(pr)}\r\n{pr}\r\n{tsf}"
                f"{n10}$1\r\n{'1' if shadow else '0'}\r\n"
            )
        # Request ids, assets, slots and versions are validated ASCII, so str lengths are byte
        # lengths and one encode() of the joined text is exact.
        return "".join(out).encode()


class PredictionLogger:
    """Bounded queue + background writer of prediction rows to per-asset Redis streams.

    Parameters
    ----------
    client_factory
        Returns a connected Redis client (called in the writer thread; retried on failure).
    stream
        Prefix of the per-asset stream keys (``serve.prediction_stream``): rows of asset A go
        to ``prediction_stream_key(stream, A)``.
    maxlen
        Approximate cap of each asset's stream (``serve.prediction_stream_maxlen_per_asset``).
    batch
        Entries per pipelined write (``serve.prediction_log_batch``).
    queue_rows
        Rows the queue may hold before new rows are dropped (``serve.prediction_log_queue``).
    breaker
        Breaker configuration (``breaker`` section).
    flush_s
        How long the writer sleeps when the queue is empty.
    max_busy
        Largest share of wall time the writer may spend working (``(0, 1]``).
    """

    def __init__(self, client_factory: Callable[[], redis.Redis], stream: str, maxlen: int,
                 batch: int, queue_rows: int, breaker: BreakerConfig, flush_s: float = 0.01,
                 max_busy: float = 0.25) -> None:
        if batch < 1 or queue_rows < 1:
            raise ValueError("batch and queue_rows must be >= 1")
        if not 0 < max_busy <= 1:
            raise ValueError(f"max_busy must be in (0, 1], got {max_busy}")
        self._factory = client_factory
        self._encoder = RespXaddEncoder(stream, maxlen)
        self.stream = stream
        self.batch = int(batch)
        self.queue_rows = int(queue_rows)
        self.flush_s = float(flush_s)
        self.max_busy = float(max_busy)
        self.breaker = CircuitBreaker(breaker, f"redis:{stream}")
        self._lock = threading.Lock()
        self._queue: deque[Sequence[Row]] = deque()
        self._queued = 0
        self._dropped_full = 0
        self._dropped_failed = 0
        self._written = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._last_error = ""

    # ------------------------------------------------------------------ hot path
    def submit(self, rows: Sequence[Row]) -> bool:
        """Queue ``rows`` for writing; False (and counted as dropped) when the queue is full."""
        n = len(rows)
        with self._lock:
            if self._queued + n > self.queue_rows:
                self._dropped_full += n
                return False
            self._queued += n
            self._queue.append(rows)
        return True

    # ------------------------------------------------------------------ writer
    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Write what is queued (for at most ``flush_timeout_s``), then stop the thread."""
        deadline = time.monotonic() + flush_timeout_s
        while self.pending() and time.monotonic() < deadline and self._thread is not None \
                and self._thread.is_alive():
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def pending(self) -> int:
        """Rows queued and not yet written or dropped."""
        with self._lock:
            return self._queued

    def _take(self, limit: int) -> list[Row]:
        out: list[Row] = []
        with self._lock:
            while self._queue and len(out) < limit:
                rows = self._queue.popleft()
                room = limit - len(out)
                if len(rows) > room:
                    # Split a large batch: the rest goes back to the front, order preserved.
                    self._queue.appendleft(rows[room:])
                    rows = rows[:room]
                out.extend(rows)
        return out

    def _done(self, written: int, failed: int) -> None:
        with self._lock:
            self._queued -= written + failed
            self._written += written
            self._dropped_failed += failed

    def _put_back(self, rows: list[Row]) -> None:
        with self._lock:
            self._queue.appendleft(rows)

    def _write(self, rows: list[Row]) -> tuple[int, str]:
        """Send ``rows``; returns how many XADDs the server refused and the first reason.

        A refused XADD (one asset's key holding another type...) is that row's loss alone:
        the server answered, so it is not a failure for the breaker.
        """
        if self._client is None:
            self._client = self._factory()
        payload = self._encoder.encode(rows, time.time_ns())
        conn = self._client.connection_pool.get_connection()
        try:
            conn.send_packed_command([payload], check_health=False)
            errors = 0
            first = ""
            for _ in rows:
                try:
                    conn.read_response()
                except redis.ResponseError as exc:
                    errors += 1  # e.g. the key holds another type: counted, stream unaffected
                    first = first or f"ResponseError: {exc}"
            return errors, first
        except BaseException:
            conn.disconnect()  # a half-read pipeline leaves the connection out of sync
            raise
        finally:
            self._client.connection_pool.release(conn)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self._take(self.batch)
            if not rows:
                self._stop.wait(self.flush_s)
                continue
            started = time.perf_counter()
            try:
                refused, why = self.breaker.call(self._write, rows)
            except CircuitOpen as exc:
                self._put_back(rows)
                self._stop.wait(max(getattr(exc, "retry_after_s", 0.0), self.flush_s))
                continue
            except Exception as exc:  # noqa: BLE001 - Redis down, timeout, reset: count, go on
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._client = None
                self._done(0, len(rows))
                self._stop.wait(self.flush_s)
                continue
            if refused:
                self._last_error = f"{refused} of {len(rows)} XADD refused; {why}"
            self._done(len(rows) - refused, refused)
            busy = time.perf_counter() - started
            if self.max_busy < 1.0:
                # Work at most max_busy of the time: sleep busy * (1/max_busy - 1).
                self._stop.wait(busy * (1.0 / self.max_busy - 1.0))

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics``: written, dropped (queue full / write failed), queued."""
        with self._lock:
            return {"written": self._written, "dropped_queue_full": self._dropped_full,
                    "dropped_write_failed": self._dropped_failed, "queued": self._queued,
                    "breaker": self.breaker.state.value, "last_error": self._last_error}
