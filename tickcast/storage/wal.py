"""Write-ahead log and a guarded writer: nothing acknowledged is lost while a dependency is down.

:class:`WriteAheadLog` is an append-only file of framed records::

    [payload length: u32][crc32(seq || payload): u32][seq: u64][payload]

plus a small side file ``<path>.ack`` of framed acknowledged positions (``[seq: u64][crc32:
u32]`` appended on each :meth:`~WriteAheadLog.ack`; the last valid one counts). On open the log
is scanned: a record that is cut short or whose checksum fails is a torn tail from a crash
mid-append, and the file is truncated there. When every record is acknowledged the log is
truncated to zero bytes (and the ack file rewritten to one record), so a healthy system keeps an
empty log; sequence numbers keep growing across such compactions.

Fsync policy: with ``fsync=True`` (the default) each append and each ack is ``fdatasync``-ed
before the call returns, so an appended record survives a power loss; with ``fsync=False`` the
data reaches the OS page cache, which survives a killed process but not a power loss. Appends
only happen while the dependency is failing, so the cost (a fraction of a millisecond per call
on SSD) is paid rarely.

:class:`GuardedWriter` puts a :class:`~tickcast.storage.breaker.CircuitBreaker` and a WAL in
front of a ``write(payload)`` function: writes go straight through while the breaker is closed
and nothing is queued; otherwise, or when the write fails, the payload is appended to the WAL.
:meth:`GuardedWriter.drain` replays queued records in order and acknowledges each one after it
was written. A record whose write succeeded but whose ack was lost (crash between the two) is
written again on the next drain, so ``write`` must be idempotent (e.g. ``XADD`` with an explicit
id, ``HSET``, an upsert keyed by time): then nothing is lost, nothing is doubled and order holds.

One owner per log file: a WAL is used by one process at a time (the owning actor). Pickling a
WAL carries its path and options; the copy re-opens the file (and re-scans it) on unpickle.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

from tickcast.errors import CircuitOpen, InvalidInput
from tickcast.storage.breaker import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")  # payload length, crc32(seq || payload), seq
_ACK = struct.Struct("<QI")  # acked seq, crc32(seq)
_SEQ = struct.Struct("<Q")
MAX_RECORD_BYTES = 1 << 30  # a length beyond this in a header can only be garbage


def _crc(seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class WriteAheadLog:
    """Append-only, checksummed, crash-safe log of byte payloads with cumulative acks.

    Parameters
    ----------
    path
        Log file; its parent directory is created. The ack file is ``<path>.ack``.
    fsync
        ``fdatasync`` after every append and ack (see the module notes).
    compact_bytes
        When the acknowledged prefix of a log that still has pending records grows past this
        many bytes, the pending suffix is copied to a fresh file (atomic replace).

    Attributes
    ----------
    truncated_bytes
        Bytes of torn tail dropped when the log was opened (0 after a clean shutdown).

    Examples
    --------
    >>> import tempfile, os
    >>> wal = WriteAheadLog(os.path.join(tempfile.mkdtemp(), "q.wal"), fsync=False)
    >>> wal.append(b"a"), wal.append(b"b")
    (1, 2)
    >>> list(wal.pending())
    [(1, b'a'), (2, b'b')]
    >>> wal.ack(1); list(wal.pending()), len(wal)
    ([(2, b'b')], 1)
    >>> wal.ack(2); os.path.getsize(wal.path), wal.append(b"c")
    (0, 3)
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, compact_bytes: int = 64 << 20) -> None:
        if compact_bytes < 1:
            raise InvalidInput("compact_bytes must be >= 1", field="compact_bytes")
        self.path = Path(path)
        self.ack_path = self.path.with_name(self.path.name + ".ack")
        self.fsync = bool(fsync)
        self.compact_bytes = int(compact_bytes)
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._index: OrderedDict[int, tuple[int, int]] = OrderedDict()  # seq -> (offset, length)
        self._size = 0
        self._acked = 0
        self._last_seq = 0
        self.truncated_bytes = 0
        self._load()

    # ---- open / recovery -------------------------------------------------------------------

    def _load(self) -> None:
        self._acked = self._read_ack()
        size = os.fstat(self._fd).st_size
        offset = 0
        last = 0
        records: list[tuple[int, int, int]] = []
        if size:
            with mmap.mmap(self._fd, size, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    while offset + _HEADER.size <= size:
                        length, crc, seq = _HEADER.unpack_from(view, offset)
                        end = offset + _HEADER.size + length
                        if length > MAX_RECORD_BYTES or end > size or seq <= last:
                            break
                        if _crc(seq, view[offset + _HEADER.size:end]) != crc:
                            break
                        records.append((seq, offset, length))
                        last = seq
                        offset = end
                finally:
                    view.release()
        if offset < size:
            # A torn or corrupt tail: only a crash mid-append produces one; what follows it
            # cannot be trusted, and appending after garbage would hide new records.
            self.truncated_bytes = size - offset
            log.warning("wal %s: dropping %d bytes of torn tail at offset %d", self.path, size - offset, offset)
            os.ftruncate(self._fd, offset)
            self._sync(self._fd)
        self._size = offset
        self._last_seq = max(last, self._acked)
        for seq, off, length in records:
            if seq > self._acked:
                self._index[seq] = (off, length)
        if records and not self._index:
            self._truncate_all()  # everything acked, compaction had not happened yet

    def _read_ack(self) -> int:
        try:
            data = self.ack_path.read_bytes()
        except FileNotFoundError:
            return 0
        acked = 0
        for off in range(0, len(data) - _ACK.size + 1, _ACK.size):
            seq, crc = _ACK.unpack_from(data, off)
            if zlib.crc32(_SEQ.pack(seq)) == crc and seq >= acked:
                acked = seq
        return acked

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fdatasync(fd)

    def _sync_dir(self) -> None:
        if self.fsync:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # ---- pickling ----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "fsync": self.fsync, "compact_bytes": self.compact_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], fsync=state["fsync"], compact_bytes=state["compact_bytes"])  # type: ignore[misc]

    # ---- public API --------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Append one record and return its sequence number (1, 2, ... never reused).

        Raises
        ------
        InvalidInput
            ``payload`` is not bytes-like or exceeds 1 GiB.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"payload must be bytes, got {type(payload).__name__}", field="payload")
        payload = bytes(payload)
        if len(payload) > MAX_RECORD_BYTES:
            raise InvalidInput(f"payload of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}", field="payload")
        with self._lock:
            self._check_open()
            seq = self._last_seq + 1
            frame = _HEADER.pack(len(payload), _crc(seq, payload), seq) + payload
            offset = self._size
            try:
                _write_all(self._fd, frame)
                self._sync(self._fd)
            except OSError:
                # Disk full or similar: cut the partial frame so the log stays well formed.
                os.ftruncate(self._fd, offset)
                raise
            self._size = offset + len(frame)
            self._last_seq = seq
            self._index[seq] = (offset, len(payload))
            return seq

    def pending(self) -> Iterator[tuple[int, bytes]]:
        """Unacknowledged records in append order, as ``(seq, payload)``.

        Iterates over the records pending when called (records appended meanwhile come on the
        next call); a record acknowledged meanwhile is skipped.
        """
        with self._lock:
            seqs = list(self._index)
        for seq in seqs:
            with self._lock:
                loc = self._index.get(seq)
                if loc is None:
                    continue
                offset, length = loc
                payload = os.pread(self._fd, length, offset + _HEADER.size) if length else b""
            yield seq, payload

    def peek(self) -> tuple[int, bytes] | None:
        """The oldest pending record, or None when the log is empty."""
        with self._lock:
            if not self._index:
                return None
            seq, (offset, length) = next(iter(self._index.items()))
            payload = os.pread(self._fd, length, offset + _HEADER.size) if length else b""
            return seq, payload

    def ack(self, seq: int) -> None:
        """Acknowledge every record up to and including ``seq`` (cumulative; repeats are no-ops).

        The position is persisted before returning. When nothing is pending any more the log is
        truncated to zero bytes.

        Raises
        ------
        InvalidInput
            ``seq`` is not an integer or was never appended.
        """
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise InvalidInput(f"seq must be an int, got {type(seq).__name__}", field="seq")
        with self._lock:
            self._check_open()
            if seq <= self._acked:
                return
            if seq > self._last_seq:
                raise InvalidInput(f"seq {seq} was never appended (last is {self._last_seq})", field="seq")
            with open(self.ack_path, "ab") as f:
                f.write(_ACK.pack(seq, zlib.crc32(_SEQ.pack(seq))))
                f.flush()
                self._sync(f.fileno())
            self._acked = seq
            while self._index:
                first = next(iter(self._index))
                if first > seq:
                    break
                del self._index[first]
            if not self._index:
                self._truncate_all()
            else:
                first_offset = next(iter(self._index.values()))[0]
                if first_offset >= self.compact_bytes:
                    self._compact(first_offset)

    def _truncate_all(self) -> None:
        # Order matters for a crash in between: the log is emptied first, so the worst case is
        # an empty log with a long ack file (harmless), never records that look unacked.
        os.ftruncate(self._fd, 0)
        self._sync(self._fd)
        self._size = 0
        self._rewrite_ack()

    def _rewrite_ack(self) -> None:
        tmp = self.ack_path.with_name(self.ack_path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_ACK.pack(self._acked, zlib.crc32(_SEQ.pack(self._acked))))
            f.flush()
            self._sync(f.fileno())
        os.replace(tmp, self.ack_path)
        self._sync_dir()

    def _compact(self, first_offset: int) -> None:
        tmp = self.path.with_name(self.path.name + ".compact.tmp")
        remaining = self._size - first_offset
        with open(tmp, "wb") as out:
            copied = 0
            while copied < remaining:
                chunk = os.pread(self._fd, min(8 << 20, remaining - copied), first_offset + copied)
                if not chunk:
                    break
                out.write(chunk)
                copied += len(chunk)
            out.flush()
            self._sync(out.fileno())
        os.replace(tmp, self.path)
        self._sync_dir()
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._size = remaining
        for seq, (off, length) in list(self._index.items()):
            self._index[seq] = (off - first_offset, length)
        self._rewrite_ack()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"write-ahead log {self.path} is closed")

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest record ever appended (0 if none)."""
        return self._last_seq

    @property
    def acked_seq(self) -> int:
        """Highest acknowledged sequence number (0 if none)."""
        return self._acked

    def stats(self) -> dict[str, int]:
        """Pending records, bytes on disk and sequence positions."""
        with self._lock:
            return {"pending": len(self._index), "bytes": self._size, "last_seq": self._last_seq,
                    "acked_seq": self._acked, "truncated_bytes": self.truncated_bytes}

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "WriteAheadLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing to report to
            pass


class GuardedWriter:
    """Write through a circuit breaker, falling back to a write-ahead log; replay in order.

    Parameters
    ----------
    breaker
        Guards the dependency behind ``write``.
    wal
        Where payloads wait while the dependency is unavailable.
    write
        ``write(payload)`` stores one payload in the dependency and raises on failure. It must
        be idempotent (a replayed payload is written again if its ack was lost in a crash) and
        should raise only for transient failures: a payload that can never be written would
        stay at the head of the log and block :meth:`drain` (it is logged on every attempt).

    Notes
    -----
    Thread-safe: one lock orders direct writes, appends and each replayed (write, ack) pair, so
    a direct write never overtakes a queued record. Pickles when ``write`` does (e.g. a small
    callable object that holds a URL and connects on first use); the breaker and WAL carry
    their own state.
    """

    def __init__(self, breaker: CircuitBreaker, wal: WriteAheadLog, write: Callable[[bytes], None]) -> None:
        if not callable(write):
            raise InvalidInput("write must be callable", field="write")
        self.breaker = breaker
        self.wal = wal
        self._write = write
        self._lock = threading.Lock()
        self._counts = {"direct": 0, "queued": 0, "drained": 0, "write_errors": 0}
        self.last_error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _note_error(self, exc: Exception) -> None:
        if not isinstance(exc, CircuitOpen):
            self._counts["write_errors"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def write(self, payload: bytes) -> bool:
        """Write ``payload`` now if the path is clear, else queue it durably.

        Returns
        -------
        bool
            True when written straight to the dependency, False when appended to the WAL (it
            is durable on return either way).
        """
        with self._lock:
            if len(self.wal) == 0 and self.breaker.state is BreakerState.CLOSED:
                try:
                    self.breaker.call(self._write, payload)
                except Exception as exc:  # noqa: BLE001 - any failure: the payload goes to the log instead
                    self._note_error(exc)
                    log.warning("guarded write to %s failed, queued in WAL: %s", self.breaker.name, exc)
                else:
                    self._counts["direct"] += 1
                    return True
            self.wal.append(payload)
            self._counts["queued"] += 1
            return False

    def drain(self, max_records: int | None = None) -> int:
        """Replay queued records in order through the breaker; return how many were written.

        Each record is acknowledged right after its write succeeded. Stops at the first
        failure or refusal (the record stays queued), when the log is empty, or after
        ``max_records``.
        """
        done = 0
        while max_records is None or done < max_records:
            with self._lock:
                head = self.wal.peek()
                if head is None:
                    return done
                seq, payload = head
                try:
                    self.breaker.call(self._write, payload)
                except Exception as exc:  # noqa: BLE001 - recorded; replay resumes later
                    self._note_error(exc)
                    return done
                self.wal.ack(seq)
                self._counts["drained"] += 1
            done += 1
        return done

    @property
    def pending(self) -> int:
        """Records waiting in the WAL."""
        return len(self.wal)

    def stats(self) -> dict[str, Any]:
        """Counters (direct, queued, drained, write_errors), pending records and breaker state."""
        with self._lock:
            return {**self._counts, "pending": len(self.wal), "breaker": self.breaker.state.value,
                    "last_error": self.last_error}
