"""GuardedWriter through a real Redis outage: stop the server, keep writing, restart, drain."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tickcast.config import BreakerConfig
from tickcast.redis_server import EmbeddedRedis
from tickcast.storage.breaker import BreakerState, CircuitBreaker
from tickcast.storage.wal import GuardedWriter, WriteAheadLog

pytestmark = pytest.mark.redis


class StreamWriter:
    """Idempotent, order-preserving write of ``{"id": n, ...}`` payloads to a Redis stream.

    ``XADD`` with the explicit id ``<n>-1``: Redis refuses an id not above the stream's top, so
    a replayed payload whose entry already exists (same id, same body) is a no-op, while an
    out-of-order one is an error. Connects on first use; pickles by URL.
    """

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self._client: redis.Redis | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "stream": self.stream}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["stream"])  # type: ignore[misc]

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            # No client-side retries: the breaker decides; a refused connection fails at once.
            self._client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1,
                                                retry=Retry(NoBackoff(), 0))
        return self._client

    def __call__(self, payload: bytes) -> None:
        entry_id = f"{json.loads(payload)['id']}-1"
        try:
            self.client.xadd(self.stream, {"body": payload}, id=entry_id)
        except redis.ResponseError as exc:
            if "equal or smaller" not in str(exc):
                raise
            existing = self.client.xrange(self.stream, min=entry_id, max=entry_id)
            if not existing or existing[0][1][b"body"] != payload:
                raise  # a different record at that id, or an id below the top: out of order


class ManualClock:
    """A picklable clock stepped by the test (the breaker's open period without sleeping)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_redis_outage_loses_nothing_and_doubles_nothing(embedded_redis: EmbeddedRedis | None,
                                                         redis_url: str, tmp_path: Path) -> None:
    if embedded_redis is None:
        pytest.skip("outage test needs the embedded server (REDIS_URL points elsewhere)")
    stream = f"test:guarded:{uuid.uuid4().hex[:8]}"
    clock = ManualClock()
    cfg = BreakerConfig(window_size=10, min_calls=3, failure_rate_threshold=0.5, open_s=0.5,
                        half_open_probes=2, slow_call_s=5.0)
    breaker = CircuitBreaker(cfg, "redis", clock=clock)
    writer = StreamWriter(redis_url, stream)
    gw = GuardedWriter(breaker, WriteAheadLog(tmp_path / "redis.wal", fsync=True), writer)

    def payload(i: int) -> bytes:
        return json.dumps({"id": i, "v": i * 1.5}).encode()

    direct = [gw.write(payload(i)) for i in range(1, 21)]
    assert all(direct)
    try:
        embedded_redis.stop()
        start = time.monotonic()
        outcomes = [gw.write(payload(i)) for i in range(21, 61)]
        assert not any(outcomes)  # every write during the outage went to the WAL
        assert time.monotonic() - start < 5.0  # no caller waited on a dead server
        # Only the first write tried Redis (later ones queue behind it); the owner's drain
        # attempts keep failing until the failure rate in the window opens the breaker.
        attempts = 0
        while breaker.state is BreakerState.CLOSED and attempts < 10:
            assert gw.drain() == 0
            attempts += 1
        assert breaker.state is BreakerState.OPEN and attempts == 4  # 5 failures of 10 calls
        assert gw.drain() == 0 and breaker.stats()["rejected"] == 1  # refused without a call
        clock.now += 1.0
        assert gw.drain() == 0  # the half-open probe fails: still down
        assert breaker.state is BreakerState.OPEN and gw.pending == 40
    finally:
        embedded_redis.restart()
    # A record that reached Redis but whose ack was lost (crash) is replayed: write #21 by hand.
    writer(payload(21))
    for i in range(61, 71):
        assert gw.write(payload(i)) is False  # still queued behind the backlog: order holds
    clock.now += 10.0
    assert gw.drain() == 50
    assert gw.pending == 0 and breaker.state is BreakerState.CLOSED
    assert gw.write(payload(71)) is True

    entries = redis.Redis.from_url(redis_url).xrange(stream)
    ids = [json.loads(fields[b"body"])["id"] for _, fields in entries]
    assert ids == list(range(1, 72))  # every record, once, in order
    assert [e[0] for e in entries] == [f"{i}-1".encode() for i in range(1, 72)]

    # The writer state moves with a checkpoint (the client reconnects on first use).
    copy = pickle.loads(pickle.dumps(gw))
    assert copy.write(payload(72)) is True
    redis.Redis.from_url(redis_url).delete(stream)


def test_embedded_redis_starts_in_a_relative_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # redis-server changes into its --dir before opening its --logfile: both must be absolute.
    monkeypatch.chdir(tmp_path)
    srv = EmbeddedRedis.start("rel/data")
    try:
        assert srv.directory.is_absolute() and srv.directory == tmp_path / "rel" / "data" / "redis"
        assert redis.Redis.from_url(srv.url).ping()
        assert (tmp_path / "rel" / "data" / "redis" / "redis.log").exists()
    finally:
        srv.stop()
