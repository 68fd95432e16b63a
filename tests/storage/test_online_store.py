"""OnlineFeatureStore against the session's real Redis."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
import pytest
import redis

from tickcast.errors import InvalidInput, ServiceUnavailable
from tickcast.redis_server import connect
from tickcast.storage.online_store import HASH_PREFIX, LOG_PREFIX, FeatureRow, OnlineFeatureStore

pytestmark = pytest.mark.redis

NAMES = ["ret_1", "ret_5", "vol_10"]
T0 = 1_677_628_800_000_000_000  # 2023-03-01T00:00Z


@pytest.fixture
def store(redis_url: str) -> OnlineFeatureStore:
    return OnlineFeatureStore(connect(redis_url), log_maxlen=50)


@pytest.fixture
def asset() -> str:
    return f"TEST-{uuid.uuid4().hex[:8].upper()}"


def test_write_read_round_trip_exact_bytes(store: OnlineFeatureStore, asset: str) -> None:
    values = np.array([1e-4, -2.5e-3, np.nan])
    assert store.read(asset) is None
    assert store.write(asset, T0, "abc123", NAMES, values, updated_ns=T0 + 5) is True
    row = store.read(asset)
    assert isinstance(row, FeatureRow)
    assert (row.asset, row.bar_ts, row.schema, row.names, row.updated) == (asset, T0, "abc123", tuple(NAMES), T0 + 5)
    np.testing.assert_array_equal(row.values, values)  # bit-exact, NaN included
    assert row.values.dtype == np.float64 and row.values.flags.writeable
    raw = store.client.hgetall(HASH_PREFIX + asset)
    assert set(raw) == {b"bar_ts", b"schema", b"names", b"values", b"updated"}
    assert raw[b"values"] == values.astype("<f8").tobytes()
    assert row.age_s(T0 + 5 + 2_000_000_000) == pytest.approx(2.0)


def test_older_bar_never_overwrites_newer(store: OnlineFeatureStore, asset: str) -> None:
    minute = 60_000_000_000
    assert store.write(asset, T0 + minute, "s", NAMES, [1.0, 2.0, 3.0])
    assert store.write(asset, T0, "s", NAMES, [9.0, 9.0, 9.0]) is False  # a replayed older bar
    assert store.read(asset).values.tolist() == [1.0, 2.0, 3.0]
    assert store.write(asset, T0 + minute, "s", NAMES, [1.5, 2.0, 3.0]) is True  # amended bar
    assert store.read(asset).values.tolist() == [1.5, 2.0, 3.0]
    # Timestamps that differ by 1 ns (beyond a double's precision) still compare exactly.
    assert store.write(asset, T0 + minute + 1, "s", NAMES, [7.0, 7.0, 7.0]) is True
    assert store.write(asset, T0 + minute, "s", NAMES, [8.0, 8.0, 8.0]) is False
    assert store.read(asset).bar_ts == T0 + minute + 1


def test_log_stream_is_capped_and_mirrors_writes(store: OnlineFeatureStore, asset: str) -> None:
    for i in range(300):
        store.write(asset, T0 + i, "s", NAMES, [float(i), 0.0, 0.0])
    length = store.client.xlen(LOG_PREFIX + asset)
    assert 50 <= length < 300  # approximate trimming (whole macro nodes)
    last = store.log(asset, count=3)
    assert [r.bar_ts for r in last] == [T0 + 297, T0 + 298, T0 + 299]
    assert last[-1].values[0] == 299.0


def test_read_many_in_one_round_trip(store: OnlineFeatureStore, asset: str) -> None:
    other = asset + "-B"
    store.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0])
    store.write(other, T0, "s", NAMES, [4.0, 5.0, 6.0])
    missing = asset + "-NONE"
    rows = store.read_many([asset, other, missing])
    assert list(rows) == [asset, other, missing]
    assert rows[asset].values.tolist() == [1.0, 2.0, 3.0]
    assert rows[other].values.tolist() == [4.0, 5.0, 6.0]
    assert rows[missing] is None
    assert store.read_many([]) == {}
    # One round trip: the pipeline sends every HGETALL before reading any reply.
    before = store.client.info("stats")["total_commands_processed"]
    store.read_many([asset, other, missing])
    after = store.client.info("stats")["total_commands_processed"]
    assert after - before == 4  # 3 HGETALL + the INFO itself


def test_close_is_stored_logged_and_never_outlives_its_bar(store: OnlineFeatureStore, asset: str) -> None:
    minute = 60_000_000_000
    store.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0], close=23_456.789012345678)
    row = store.read(asset)
    assert float(row.extra["close"]) == 23_456.789012345678  # the same double back
    assert store.log(asset, count=1)[0].extra["close"] == row.extra["close"]
    # The next bar's row without a close: the old bar's close must not describe it.
    store.write(asset, T0 + minute, "s", NAMES, [1.0, 2.0, 3.0])
    assert "close" not in store.read(asset).extra
    assert b"close" not in store.client.hgetall(HASH_PREFIX + asset)
    # A refused (older) write leaves the newer row's fields alone.
    store.write(asset, T0 + 2 * minute, "s", NAMES, [1.0, 2.0, 3.0], close=10.0)
    assert store.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0], close=99.0) is False
    assert float(store.read(asset).extra["close"]) == 10.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"asset": ""}, "asset"),
        ({"bar_ts": -1}, "bar_ts"),
        ({"bar_ts": 1.5}, "bar_ts"),
        ({"names": ["a", "a", "b"]}, "names"),
        ({"values": [1.0, 2.0]}, "values"),
        ({"values": ["x", "y", "z"]}, "values"),
        ({"schema_hash": ""}, "schema_hash"),
        ({"close": 0.0}, "close"),
        ({"close": float("nan")}, "close"),
        ({"close": "abc"}, "close"),
    ],
)
def test_bad_rows_rejected_naming_field(store: OnlineFeatureStore, asset: str, kwargs: dict, field: str) -> None:
    args = {"asset": asset, "bar_ts": T0, "schema_hash": "s", "names": NAMES, "values": [1.0, 2.0, 3.0]}
    args.update(kwargs)
    with pytest.raises(InvalidInput) as err:
        store.write(**args)
    assert err.value.field == field


def test_corrupt_hash_is_reported(store: OnlineFeatureStore, asset: str) -> None:
    store.client.hset(HASH_PREFIX + asset, mapping={"bar_ts": "1", "schema": "s", "names": '["a","b"]',
                                                    "values": b"\x00" * 8, "updated": "1"})
    with pytest.raises(ServiceUnavailable):
        store.read(asset)


def test_client_must_return_bytes(redis_url: str) -> None:
    with pytest.raises(InvalidInput):
        OnlineFeatureStore(redis.Redis.from_url(redis_url, decode_responses=True))
    with pytest.raises(InvalidInput):
        OnlineFeatureStore(connect(redis_url), log_maxlen=0)


def test_pickle_reconnects(store: OnlineFeatureStore, asset: str, redis_url: str) -> None:
    store.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0])
    copy = pickle.loads(pickle.dumps(store))
    assert copy.client is not store.client and copy.log_maxlen == 50
    assert copy.read(asset).values.tolist() == [1.0, 2.0, 3.0]
    via_url = OnlineFeatureStore.from_url(redis_url)
    assert via_url.read(asset).bar_ts == T0


# ----------------------------------------------------------------------- change feed
def _feed(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(stream)]


@pytest.fixture
def feed_store(redis_url: str) -> OnlineFeatureStore:
    """A store announcing on its own change feed (the shared one sees every test's writes)."""
    return OnlineFeatureStore(connect(redis_url), log_maxlen=50,
                              changes_stream=f"changes-test:{uuid.uuid4().hex[:8]}", changes_maxlen=120)


def test_every_stored_row_is_announced_on_the_change_feed(feed_store: OnlineFeatureStore, asset: str) -> None:
    minute = 60_000_000_000
    assert feed_store.write(asset, T0 + minute, "s", NAMES, [1.0, 2.0, 3.0])
    assert feed_store.write(asset, T0 + minute, "s", NAMES, [1.5, 2.0, 3.0])  # amendment: announced
    assert feed_store.write(asset, T0, "s", NAMES, [9.0, 9.0, 9.0]) is False  # refused: silent
    entries = _feed(feed_store.client, feed_store.changes_stream)
    assert entries == [{b"asset": asset.encode(), b"kind": b"features", b"bar_ts": str(T0 + minute).encode()}] * 2


def test_change_feed_is_capped(feed_store: OnlineFeatureStore, asset: str) -> None:
    for i in range(1000):
        feed_store.write(asset, T0 + i, "s", NAMES, [float(i), 0.0, 0.0])
    length = feed_store.client.xlen(feed_store.changes_stream)
    assert 120 <= length < 1000  # approximate trimming (whole macro nodes)
    last = feed_store.client.xrevrange(feed_store.changes_stream, count=1)[0][1]
    assert last[b"bar_ts"] == str(T0 + 999).encode()


def test_row_log_and_announcement_are_one_write(feed_store: OnlineFeatureStore, asset: str) -> None:
    # The feed key holds another type: Redis never rolls a script back, so the script must find
    # it before writing anything -- no row stored unannounced, no log entry...
    feed_store.client.set(feed_store.changes_stream, "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        feed_store.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0])
    assert feed_store.read(asset) is None and not feed_store.client.exists(LOG_PREFIX + asset)
    # ...and with the feed repaired, the next write is stored and announced together.
    feed_store.client.delete(feed_store.changes_stream)
    assert feed_store.write(asset, T0 + 1, "s", NAMES, [1.0, 2.0, 3.0])
    assert feed_store.read(asset).bar_ts == T0 + 1
    assert len(_feed(feed_store.client, feed_store.changes_stream)) == 1


def test_pickle_keeps_the_change_feed(feed_store: OnlineFeatureStore, asset: str) -> None:
    copy = pickle.loads(pickle.dumps(feed_store))
    assert (copy.changes_stream, copy.changes_maxlen) == (feed_store.changes_stream, 120)
    copy.write(asset, T0, "s", NAMES, [1.0, 2.0, 3.0])
    assert _feed(feed_store.client, feed_store.changes_stream)[0][b"asset"] == asset.encode()
    with pytest.raises(InvalidInput):
        OnlineFeatureStore(feed_store.client, changes_maxlen=0)
    with pytest.raises(InvalidInput):
        OnlineFeatureStore(feed_store.client, changes_stream="")


# ----------------------------------------------------------------------- safety hash
def test_publish_safety_writes_hash_and_announcement_atomically(feed_store: OnlineFeatureStore,
                                                                asset: str) -> None:
    from tickcast.storage.safety_store import clear_safety, publish_safety
    from tickcast.streams import safety_key

    client, stream = feed_store.client, feed_store.changes_stream
    publish_safety(client, asset, {"regime": "CRISIS", "multiplier": np.float64(0.2), "halted": "0",
                                   "updated": np.int64(7)}, changes_stream=stream)
    assert client.hgetall(safety_key(asset)) == {b"regime": b"CRISIS", b"multiplier": b"0.2",
                                                 b"halted": b"0", b"updated": b"7"}
    assert _feed(client, stream) == [{b"asset": asset.encode(), b"kind": b"safety"}]
    publish_safety(client, asset, {"halted": "1"}, changes_stream=stream)  # HSET: other fields stay
    assert client.hget(safety_key(asset), "regime") == b"CRISIS"
    clear_safety(client, asset, changes_stream=stream)
    assert not client.exists(safety_key(asset)) and len(_feed(client, stream)) == 3
    # When the announcement cannot be written, the hash is not either.
    client.set(stream, "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publish_safety(client, asset, {"regime": "ELEVATED"}, changes_stream=stream)
    assert client.hget(safety_key(asset), "regime") is None
    client.delete(stream)


@pytest.mark.parametrize(
    "asset, mapping, field",
    [
        ("", {"regime": "NORMAL"}, "asset"),
        ("A B", {"regime": "NORMAL"}, "asset"),
        ("OK-USD", {}, "mapping"),
        ("OK-USD", {"": "x"}, "mapping"),
        ("OK-USD", {"halted": True}, "mapping.halted"),
        ("OK-USD", {"multiplier": float("nan")}, "mapping.multiplier"),
        ("OK-USD", {"regime": None}, "mapping.regime"),
    ],
)
def test_bad_safety_rejected_naming_field(redis_url: str, asset: str, mapping: dict, field: str) -> None:
    from tickcast.storage.safety_store import publish_safety

    client = connect(redis_url)
    stream = f"changes-test:{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidInput) as err:
        publish_safety(client, asset, mapping, changes_stream=stream)
    assert err.value.field == field
    assert not client.exists(stream)  # nothing was sent
