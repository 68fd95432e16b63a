"""WriteAheadLog crash safety and GuardedWriter ordering, without servers."""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tickcast.config import BreakerConfig
from tickcast.errors import InvalidInput
from tickcast.storage.breaker import BreakerState, CircuitBreaker
from tickcast.storage.wal import GuardedWriter, WriteAheadLog


def test_append_pending_ack_in_order(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "q.wal", fsync=False)
    seqs = [wal.append(f"r{i}".encode()) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [p for _, p in wal.pending()] == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    wal.ack(2)
    assert [s for s, _ in wal.pending()] == [3, 4, 5] and len(wal) == 3
    wal.ack(2)  # repeat: no-op
    wal.ack(1)  # older: no-op (acks are cumulative)
    assert len(wal) == 3
    with pytest.raises(InvalidInput):
        wal.ack(6)
    with pytest.raises(InvalidInput):
        wal.append("text")  # type: ignore[arg-type]
    assert wal.append(b"") == 6  # empty payloads are records too
    assert wal.peek() == (3, b"r2")


def test_acked_position_survives_reopen_and_log_compacts(tmp_path: Path) -> None:
    path = tmp_path / "q.wal"
    wal = WriteAheadLog(path, fsync=True)
    for i in range(4):
        wal.append(bytes([i]) * 100)
    wal.ack(2)
    wal.close()
    wal = WriteAheadLog(path)
    assert [s for s, _ in wal.pending()] == [3, 4]
    wal.ack(4)
    assert path.stat().st_size == 0  # everything acked: the log is emptied
    wal.close()
    wal = WriteAheadLog(path)
    assert list(wal.pending()) == [] and wal.append(b"x") == 5  # sequence numbers never reused
    assert wal.acked_seq == 4


@pytest.mark.parametrize("cut", [1, 7, 16, 17, 30])
def test_torn_tail_is_ignored_and_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "q.wal"
    wal = WriteAheadLog(path, fsync=False)
    wal.append(b"a" * 10)
    wal.append(b"b" * 20)
    good = path.stat().st_size
    wal.append(b"c" * 30)  # 16-byte header + 30 bytes: cut it short
    wal.close()
    with open(path, "r+b") as f:
        f.truncate(good + cut)
    wal = WriteAheadLog(path, fsync=False)
    assert [p for _, p in wal.pending()] == [b"a" * 10, b"b" * 20]
    assert wal.truncated_bytes == cut and path.stat().st_size == good
    assert wal.append(b"d") == 3  # appends continue cleanly after the cut
    wal.close()
    assert [p for _, p in WriteAheadLog(path).pending()] == [b"a" * 10, b"b" * 20, b"d"]


def test_corrupt_record_stops_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "q.wal"
    wal = WriteAheadLog(path, fsync=False)
    wal.append(b"first")
    offset = path.stat().st_size
    wal.append(b"second")
    wal.close()
    with open(path, "r+b") as f:
        f.seek(offset + 16)
        f.write(b"X")  # flip a payload byte: crc mismatch
    wal = WriteAheadLog(path, fsync=False)
    assert [p for _, p in wal.pending()] == [b"first"]


def test_garbage_ack_file_records_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "q.wal"
    wal = WriteAheadLog(path, fsync=False)
    for i in range(3):
        wal.append(b"%d" % i)
    wal.ack(1)
    wal.close()
    with open(str(path) + ".ack", "ab") as f:
        f.write(struct.pack("<QI", 3, 12345))  # bad crc: must not count as acked
        f.write(b"\x01\x02")  # torn ack record
    assert [s for s, _ in WriteAheadLog(path).pending()] == [2, 3]


def test_sigkill_while_appending_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "q.wal"
    script = textwrap.dedent(f"""
        from tickcast.storage.wal import WriteAheadLog
        wal = WriteAheadLog({str(path)!r}, fsync=True)
        i = 0
        while True:
            i += 1
            seq = wal.append(b"record-%08d" % i + b"." * (i % 50))
            print(seq, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(300):
        last = proc.stdout.readline()
        assert last
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records = list(WriteAheadLog(path).pending())
    assert len(records) >= int(last)
    for seq, payload in records:
        assert payload == b"record-%08d" % seq + b"." * (seq % 50)
    assert [s for s, _ in records] == list(range(1, len(records) + 1))


def test_compaction_of_long_acked_prefix(tmp_path: Path) -> None:
    path = tmp_path / "q.wal"
    wal = WriteAheadLog(path, fsync=False, compact_bytes=1000)
    for i in range(30):
        wal.append(bytes([i]) * 100)
    wal.ack(20)  # 20 x 116 bytes acked > 1000: suffix copied to a fresh file
    assert path.stat().st_size == 10 * 116
    assert [p[0] for _, p in wal.pending()] == list(range(20, 30))
    wal.append(b"tail")
    wal.close()
    reopened = WriteAheadLog(path)
    assert [s for s, _ in reopened.pending()] == list(range(21, 32))


def test_wal_pickles_by_path(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "q.wal", fsync=False)
    wal.append(b"a")
    wal.append(b"b")
    wal.ack(1)
    state = pickle.dumps(wal)
    wal.close()
    copy = pickle.loads(state)
    assert list(copy.pending()) == [(2, b"b")] and copy.fsync is False


# ---- GuardedWriter against a plain in-process sink ------------------------------------------


class FlakySink:
    """An idempotent keyed sink (like HSET by id) that can be switched off; picklable."""

    def __init__(self) -> None:
        self.store: dict[bytes, int] = {}
        self.order: list[bytes] = []
        self.up = True

    def __call__(self, payload: bytes) -> None:
        if not self.up:
            raise ConnectionError("sink down")
        if payload not in self.store:
            self.order.append(payload)
        self.store[payload] = self.store.get(payload, 0) + 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> CircuitBreaker:
    cfg = BreakerConfig(window_size=4, min_calls=2, failure_rate_threshold=0.5, open_s=1.0,
                        half_open_probes=2, max_open_s=4.0)
    return CircuitBreaker(cfg, "sink", clock)


def test_guarded_writer_queues_during_outage_and_drains_in_order(tmp_path: Path) -> None:
    clock, sink = Clock(), FlakySink()
    gw = GuardedWriter(breaker(clock), WriteAheadLog(tmp_path / "q.wal", fsync=False), sink)
    assert gw.write(b"p0") is True
    sink.up = False
    assert gw.write(b"p1") is False  # failed -> WAL; 1 failure of 2 calls opens the breaker
    assert gw.breaker.state is BreakerState.OPEN
    assert gw.write(b"p2") is False
    assert gw.write(b"p3") is False  # refused by the breaker -> WAL without calling the sink
    assert gw.drain() == 0 and gw.pending == 3
    sink.up = True
    assert gw.write(b"p4") is False  # breaker still open: order must hold, so no direct write
    assert gw.drain() == 0  # refused until the open period elapsed
    clock.now += 1.0
    assert gw.drain() == 4
    assert sink.order == [b"p0", b"p1", b"p2", b"p3", b"p4"]
    assert all(n == 1 for n in sink.store.values())
    assert gw.breaker.state is BreakerState.CLOSED and gw.pending == 0
    assert gw.write(b"p5") is True
    stats = gw.stats()
    assert stats["direct"] == 2 and stats["queued"] == 4 and stats["drained"] == 4
    assert stats["write_errors"] == 1 and stats["pending"] == 0


def test_drain_stops_at_first_failure_and_resumes(tmp_path: Path) -> None:
    clock, sink = Clock(), FlakySink()
    gw = GuardedWriter(breaker(clock), WriteAheadLog(tmp_path / "q.wal", fsync=False), sink)
    sink.up = False
    for i in range(5):
        gw.write(b"r%d" % i)
    clock.now += 1.0
    calls = {"n": 0}

    def half_way(payload: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("flapped")
        FlakySink.__call__(sink, payload)

    sink.up = True
    gw._write = half_way  # the dependency flaps during the drain
    assert gw.drain() == 1 and gw.pending == 4
    assert gw.breaker.state is BreakerState.OPEN  # failed probe re-opened it (2 s now)
    gw._write = sink
    clock.now += 2.0
    assert gw.drain(max_records=2) == 2
    assert gw.drain() == 2
    assert sink.order == [b"r0", b"r1", b"r2", b"r3", b"r4"]


def test_crash_between_write_and_ack_replays_without_doubling(tmp_path: Path) -> None:
    clock, sink = Clock(), FlakySink()
    path = tmp_path / "q.wal"
    gw = GuardedWriter(breaker(clock), WriteAheadLog(path, fsync=False), sink)
    sink.up = False
    for i in range(3):
        gw.write(b"k%d" % i)
    # Simulate: r0 reached the sink but the process died before the ack.
    sink.up = True
    sink(b"k0")
    gw.wal.close()
    restarted = GuardedWriter(breaker(Clock()), WriteAheadLog(path, fsync=False), sink)
    assert restarted.drain() == 3
    assert sink.order == [b"k0", b"k1", b"k2"] and sink.store[b"k0"] == 2  # written twice ...
    assert len(sink.store) == 3  # ... but stored once: the write is idempotent


def test_concurrent_writers_keep_per_thread_order(tmp_path: Path) -> None:
    clock, sink = Clock(), FlakySink()
    gw = GuardedWriter(breaker(clock), WriteAheadLog(tmp_path / "q.wal", fsync=False), sink)

    def producer(t: int) -> None:
        for i in range(200):
            gw.write(b"%d:%03d" % (t, i))
            if i == 50 and t == 0:
                sink.up = False
            if i == 120 and t == 0:
                sink.up = True
                clock.now += 10.0

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sink.up = True
    clock.now += 10.0
    while gw.pending:
        clock.now += 10.0
        gw.drain()
    assert len(sink.store) == 600
    for t in range(3):
        mine = [p for p in sink.order if p.startswith(b"%d:" % t)]
        assert mine == sorted(mine)


def test_guarded_writer_pickles_with_picklable_write(tmp_path: Path) -> None:
    clock, sink = Clock(), FlakySink()
    gw = GuardedWriter(breaker(clock), WriteAheadLog(tmp_path / "q.wal", fsync=False), sink)
    sink.up = False
    gw.write(b"a")
    state = pickle.dumps(gw)
    gw.wal.close()
    copy = pickle.loads(state)
    copy._write.up = True
    copy.breaker._clock.now += 10.0
    assert copy.drain() == 1 and copy._write.order == [b"a"]
    with pytest.raises(InvalidInput):
        GuardedWriter(copy.breaker, copy.wal, "not callable")  # type: ignore[arg-type]
