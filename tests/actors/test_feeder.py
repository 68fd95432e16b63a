"""StreamFeeder against a real Redis: explicit ids, idempotent replays, WAL across an outage."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from actors.feeder import StreamFeeder, parse_entry_id, stream_key
from tickcast.config import Settings, load_settings
from tickcast.redis_server import EmbeddedRedis, connect
from tickcast.sources.stream import decode_entry
from tickcast.ticks import TickBatch

T0 = 1_700_000_000 * 10**9


def _settings(tmp_path: Path, url: str, *overrides: str) -> Settings:
    return load_settings(overrides=[f"data_dir={tmp_path}", f"redis.url={url}",
                                    f"ingest.stream_prefix='feeder-{uuid.uuid4().hex[:8]}:'",
                                    "breaker.min_calls=2", "breaker.open_s=0.05", *overrides])


def _batch(i: int, n: int = 5) -> TickBatch:
    return TickBatch.from_columns("BTC-USD", ["kraken"] * n, ts_event=T0 + i * 10**9 + np.arange(n),
                                  price=100.0 + i + np.arange(n), seq=i * n + np.arange(n))


def _prices(client: redis.Redis, key: str) -> list[float]:
    return [p for _, fields in client.xrange(key) for p in decode_entry(fields).price.tolist()]


def test_ids_grow_and_start_above_the_stream_top(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, "ingest.xadd_pipeline_entries=3")
    client = connect(redis_url)
    key = stream_key(settings, "BTC-USD")
    future_ms = 10**13  # a producer left an entry "in the future"
    client.xadd(key, {"v": b"0"}, id=f"{future_ms}-0")
    feeder = StreamFeeder(client, settings, tmp_path / "f.wal", ("BTC-USD",))
    ids = [feeder.add(_batch(i)) for i in range(7)]
    feeder.flush()
    parsed = [parse_entry_id(i) for i in ids]
    assert parsed == sorted(parsed) and len(set(parsed)) == 7
    assert parsed[0] > (future_ms, 0)
    assert feeder.last_ids == {"BTC-USD": ids[-1]}
    assert client.xlen(key) == 8 and feeder.stats.round_trips == 3
    client.xdel(key, f"{future_ms}-0")
    assert _prices(client, key) == [100.0 + i + k for i in range(7) for k in range(5)]


def test_replayed_round_trip_is_not_doubled(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, "ingest.xadd_pipeline_entries=100")
    client = connect(redis_url)
    feeder = StreamFeeder(client, settings, tmp_path / "f.wal", ("BTC-USD",))
    for i in range(4):
        feeder.add(_batch(i))
    payload = pickle.dumps(feeder._buffer)
    feeder.flush()
    key = stream_key(settings, "BTC-USD")
    before = client.xrange(key)
    feeder._write(payload)  # the same round trip again (as after a lost acknowledgement)
    assert client.xrange(key) == before and len(before) == 4


def test_outage_goes_to_the_wal_and_arrives_in_order(tmp_path: Path) -> None:
    srv = EmbeddedRedis.start(tmp_path / "own-redis")
    try:
        settings = _settings(tmp_path, srv.url, "ingest.xadd_pipeline_entries=2")
        client = connect(srv.url, timeout_s=0.5)
        feeder = StreamFeeder(client, settings, tmp_path / "f.wal", ("BTC-USD",))
        for i in range(4):
            feeder.add(_batch(i))
        srv.stop()
        for i in range(4, 10):
            feeder.add(_batch(i))  # durable in the WAL, never raises
        feeder.flush()
        assert feeder.pending() >= 3
        assert not feeder.drain(timeout_s=0.3)  # still down
        srv.restart()
        assert feeder.drain(timeout_s=20)
        assert feeder.pending() == 0
        key = stream_key(settings, "BTC-USD")
        assert _prices(client, key) == [100.0 + i + k for i in range(10) for k in range(5)]
    finally:
        srv.stop()


def test_unknown_asset_is_refused(tmp_path: Path, redis_url: str) -> None:
    feeder = StreamFeeder(connect(redis_url), _settings(tmp_path, redis_url), tmp_path / "f.wal",
                          ("ETH-USD",))
    with pytest.raises(ValueError, match="BTC-USD"):
        feeder.add(_batch(0))
