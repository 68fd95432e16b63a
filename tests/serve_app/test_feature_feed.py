"""The replicas' feature cache follows the change feed: its cost per refresh, and its resyncs.

Each test runs its own embedded Redis, so ``INFO commandstats`` counts exactly the commands of
the cache under test (the server executes them; nothing is mocked).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import redis

from serve_app.feature_cache import PRICE_RETRY_NS, FeatureCache, parse_safety
from tickcast.redis_server import EmbeddedRedis, connect
from tickcast.storage.online_store import HASH_PREFIX, OnlineFeatureStore
from tickcast.storage.safety_store import clear_safety, publish_safety
from tickcast.streams import CHANGES_STREAM, safety_key

pytestmark = pytest.mark.redis

NAMES = [f"f{i}" for i in range(25)]
MINUTE = 60_000_000_000
# Not counted: what the test itself sends to read and reset the counters, and connection setup.
_UNCOUNTED = {"info", "config", "client", "hello"}


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis.start(tmp_path)
    yield server
    server.stop()


def _bar_ts() -> int:
    return (time.time_ns() // MINUTE - 1) * MINUTE


def _publish(store: OnlineFeatureStore, assets: list[str], bar_ts: int, seed: int = 0,
             close: bool = True) -> None:
    rng = np.random.default_rng(seed)
    for a in assets:
        store.write(a, bar_ts, "schema", NAMES, rng.normal(size=len(NAMES)),
                    close=float(rng.uniform(10, 100)) if close else None)


def _reset(client: redis.Redis) -> None:
    client.config_resetstat()


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    out = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return {k: v for k, v in out.items() if k.split("|")[0] not in _UNCOUNTED}


def _world(url: str, n: int, **kwargs) -> tuple[redis.Redis, OnlineFeatureStore, FeatureCache, list[str]]:
    client = connect(url)
    client.flushall()
    store = OnlineFeatureStore(connect(url), **kwargs)
    assets = [f"A{i:04d}-USD" for i in range(n)]
    _publish(store, assets, _bar_ts())
    for a in assets[::10]:
        publish_safety(client, a, {"regime": "ELEVATED", "multiplier": 0.5, "halted": "0"},
                       changes_stream=store.changes_stream)
    cache = FeatureCache(lambda: connect(url), refresh_s=0.05, resync_s=3600,
                         changes_stream=store.changes_stream)
    snap = cache.refresh()
    assert len(snap.features) == n and len(snap.safety) == len(assets[::10]) and not snap.error
    assert cache.stats()["resyncs_start"] == 1
    return client, store, cache, assets


def test_idle_refresh_is_one_command_whatever_the_number_of_assets(srv: EmbeddedRedis) -> None:
    per_size = {}
    for n in (10, 1000):
        client, _, cache, _ = _world(srv.url, n)
        before = cache.snapshot
        _reset(client)
        for _ in range(5):
            snap = cache.refresh()
        per_size[n] = _calls(client)
        assert snap.version == before.version and snap.features is before.features
        assert cache.stats()["resyncs_periodic"] == 0
    assert per_size[10] == per_size[1000] == {"xrange": 5}


def test_a_resync_with_nothing_changed_keeps_every_entry(srv: EmbeddedRedis) -> None:
    client, _, cache, assets = _world(srv.url, 100)
    before = cache.snapshot
    _reset(client)
    snap = cache.refresh(force_resync=True)
    calls = _calls(client)
    assert calls["hgetall"] == 200 and calls["scan"] >= 1  # every row and safety hash re-read...
    assert snap.version == before.version  # ...and nothing rebuilt: the served view stays
    assert all(snap.features[a] is before.features[a] for a in assets)


def test_one_change_among_1000_rereads_that_asset_only(srv: EmbeddedRedis) -> None:
    client, store, cache, assets = _world(srv.url, 1000)
    before = cache.snapshot
    changed, calmed = assets[500], assets[10]
    store.write(changed, _bar_ts() + MINUTE, "schema", NAMES, np.full(len(NAMES), 0.5), close=42.0)
    publish_safety(client, calmed, {"regime": "CRISIS", "multiplier": 0.1, "halted": "1"})
    _reset(client)
    snap = cache.refresh()
    assert _calls(client) == {"xrange": 1, "hgetall": 2}  # the feed, one row, one safety hash
    assert snap.version == before.version + 1
    entry = snap.features[changed]
    assert entry.bar_ts == _bar_ts() + MINUTE and entry.price == 42.0 and entry.values[0] == 0.5
    assert all(snap.features[a] is before.features[a] for a in assets if a != changed)
    assert (snap.safety[calmed].regime, snap.safety[calmed].halted) == ("CRISIS", True)
    # A cleared hash is served as NORMAL again.
    clear_safety(client, calmed)
    snap = cache.refresh()
    assert calmed not in snap.safety  # absent hash: NORMAL
    assert cache.stats()["resyncs_feed_gap"] == 0 and cache.stats()["resyncs_start"] == 1


def test_new_assets_are_discovered_from_the_feed(srv: EmbeddedRedis) -> None:
    client, store, cache, _ = _world(srv.url, 20)
    _reset(client)
    _publish(store, ["NEW-USD"], _bar_ts())
    snap = cache.refresh()
    assert "NEW-USD" in snap.features and "scan" not in _calls(client)
    # A tracked asset with a safety hash but no features (explicit-feature clients) is read once.
    client.hset(safety_key("EXPL-USD"), mapping={"regime": "CRISIS", "multiplier": "0.3", "halted": "0"})
    cache.track(["EXPL-USD"])
    assert cache.refresh().safety["EXPL-USD"].regime == "CRISIS"


def test_a_trimmed_or_reset_feed_triggers_a_resync(srv: EmbeddedRedis) -> None:
    # changes_maxlen 10: Redis trims whole nodes of 100 entries, so 300 writes trim the head.
    client, store, cache, assets = _world(srv.url, 50, changes_maxlen=10)
    missed = assets[7]
    store.write(missed, _bar_ts() + MINUTE, "schema", NAMES, np.zeros(len(NAMES)), close=7.0)
    for i in range(300):
        store.write(assets[0], _bar_ts() + MINUTE + i, "schema", NAMES, np.zeros(len(NAMES)), close=1.0)
    first = client.xrange(store.changes_stream, count=1)[0][1]
    assert first[b"asset"] == assets[0].encode()  # the entry announcing `missed` is gone
    snap = cache.refresh()
    assert cache.stats()["resyncs_feed_gap"] == 1
    assert snap.features[missed].price == 7.0  # applied all the same, by the resync
    assert snap.features[assets[0]].bar_ts == _bar_ts() + MINUTE + 299
    # The feed follows again from the resync's cursor: no second resync for the next change.
    store.write(missed, _bar_ts() + 2 * MINUTE, "schema", NAMES, np.zeros(len(NAMES)), close=8.0)
    assert cache.refresh().features[missed].price == 8.0
    assert cache.stats()["resyncs_feed_gap"] == 1
    # A stream deleted and recreated (a flushed or replaced Redis): the cursor's entry is gone.
    client.delete(store.changes_stream)
    store.write(missed, _bar_ts() + 3 * MINUTE, "schema", NAMES, np.zeros(len(NAMES)), close=9.0)
    assert cache.refresh().features[missed].price == 9.0
    assert cache.stats()["resyncs_feed_gap"] == 2


def test_outage_keeps_serving_the_last_snapshot_then_resyncs(srv: EmbeddedRedis) -> None:
    client, store, cache, assets = _world(srv.url, 30)
    held = cache.snapshot
    srv.stop()
    snap = cache.refresh()
    assert snap.error and snap.features is held.features and snap.version == held.version
    assert cache.stats()["failures"] == 1
    # Back without its data (a crash before the AOF was written, a failover to an empty
    # replica): the publishers write again, the stream starts over.
    for f in srv.directory.glob("appendonly*"):
        f.unlink()
    srv.restart()
    store = OnlineFeatureStore(connect(srv.url))
    _publish(store, assets[:5], _bar_ts() + MINUTE, seed=3)
    snap = cache.refresh()
    assert not snap.error and cache.stats()["resyncs_outage"] == 1
    assert all(snap.features[a].bar_ts == _bar_ts() + MINUTE for a in assets[:5])
    # Rows whose hashes are gone stay until they are stale (the request path retires them).
    assert all(snap.features[a] is held.features[a] for a in assets[5:])
    assert snap.safety == {}  # the safety hashes are gone: NORMAL everywhere


def test_periodic_resync_catches_writers_that_bypass_the_feed(srv: EmbeddedRedis) -> None:
    client, _, cache, assets = _world(srv.url, 10)
    cache.resync_s = 0.3
    cache.refresh(force_resync=True)  # restart the resync clock with the new period
    client.hset(safety_key(assets[1]), mapping={"regime": "CRISIS", "multiplier": "0.2", "halted": "0"})
    assert assets[1] not in cache.refresh().safety  # no feed entry: not seen by the follow step
    time.sleep(0.35)
    assert cache.refresh().safety[assets[1]].regime == "CRISIS"
    stats = cache.stats()
    assert stats["resyncs_periodic"] == 1 and stats["resyncs_requested"] == 1


def test_bar_store_price_is_retried_without_reading_redis(srv: EmbeddedRedis) -> None:
    client = connect(srv.url)
    store = OnlineFeatureStore(connect(srv.url))
    closes: dict[str, float] = {}
    cache = FeatureCache(lambda: connect(srv.url), refresh_s=0.05, resync_s=3600,
                         bar_close=lambda a, ts: closes.get(a))
    cache.refresh()
    _publish(store, ["NOCLOSE-USD"], _bar_ts(), close=False)
    assert cache.refresh().features["NOCLOSE-USD"].price is None  # the bar is not stored yet
    closes["NOCLOSE-USD"] = 123.5  # ...now it is
    _reset(client)
    snap = cache.refresh()
    assert snap.features["NOCLOSE-USD"].price == 123.5 and _calls(client) == {"xrange": 1}
    # A row older than PRICE_RETRY_NS without a price is not looked up forever.
    store.write("OLD-USD", _bar_ts(), "schema", NAMES, np.zeros(len(NAMES)),
                updated_ns=time.time_ns() - PRICE_RETRY_NS - 1)
    cache.refresh()
    closes["OLD-USD"] = 5.0
    assert cache.refresh().features["OLD-USD"].price is None


def test_malformed_feed_entries_are_skipped_and_counted(srv: EmbeddedRedis) -> None:
    client, store, cache, assets = _world(srv.url, 5)
    client.xadd(CHANGES_STREAM, {"asset": "BAD ASSET", "kind": "features"})
    client.xadd(CHANGES_STREAM, {"kind": "safety"})
    client.xadd(CHANGES_STREAM, {"asset": assets[0], "kind": "unknown-kind"})
    _publish(store, assets[:1], _bar_ts() + MINUTE)
    snap = cache.refresh()
    assert cache.stats()["malformed_changes"] == 3 and not snap.error
    assert snap.features[assets[0]].bar_ts == _bar_ts() + MINUTE
    # An unreadable features hash keeps its last row and does not stop the others.
    client.hset(HASH_PREFIX + assets[1], mapping={"values": b"\x00" * 3, "updated": str(time.time_ns())})
    client.xadd(CHANGES_STREAM, {"asset": assets[1], "kind": "features"})
    _publish(store, assets[2:3], _bar_ts() + MINUTE)
    snap = cache.refresh()
    assert cache.stats()["unreadable_rows"] == 1 and not snap.error
    assert snap.features[assets[2]].bar_ts == _bar_ts() + MINUTE and assets[1] in snap.features


def test_random_writes_trims_and_resyncs_converge_to_a_full_read(srv: EmbeddedRedis) -> None:
    """Whatever the interleaving of writes, trims and refreshes, the cache ends equal to a
    fresh read of every hash."""
    client, store, cache, assets = _world(srv.url, 200, changes_maxlen=50)
    rng = random.Random(11)
    bar = {a: _bar_ts() for a in assets}
    next_refresh = 0
    for step in range(1000):
        a = rng.choice(assets)
        r = rng.random()
        if r < 0.6:
            bar[a] += rng.choice([0, 1]) * MINUTE  # new bar or an amendment of the current one
            store.write(a, bar[a], "schema", NAMES, np.full(len(NAMES), float(step)), close=1.0 + step)
        elif r < 0.85:
            publish_safety(client, a, {"regime": rng.choice(["NORMAL", "ELEVATED", "CRISIS"]),
                                       "multiplier": rng.random(), "halted": rng.choice(["0", "1"])},
                           changes_stream=store.changes_stream)
        else:
            clear_safety(client, a, changes_stream=store.changes_stream)
        if step == next_refresh:
            cache.refresh()
            # Mostly close refreshes (the feed is followed), some far apart (trimmed past).
            next_refresh = step + rng.choice([3, 10, 30, 200])
    snap = cache.refresh()
    rows = store.read_many(assets)
    for a in assets:
        assert (snap.features[a].bar_ts, snap.features[a].updated) == (rows[a].bar_ts, rows[a].updated), a
        np.testing.assert_array_equal(snap.features[a].values, rows[a].values)
        assert snap.safety.get(a) == (parse_safety(client.hgetall(safety_key(a))) if client.exists(safety_key(a))
                                      else None), a
    stats = cache.stats()
    assert stats["resyncs_feed_gap"] >= 1  # the small feed was trimmed under the cache
    assert stats["refreshes"] - stats["resyncs_feed_gap"] - stats["resyncs_start"] >= 10  # and followed


# ----------------------------------------------------------------------- prediction log
def _pred_row(i: int, asset: str, shadow: bool = False) -> tuple:
    return (f"r{i}", asset, "green" if shadow else "blue", "v1", 1_700_000_000_000_000_000,
            0.001 * i, -0.01, 0.01, 100.0 + i, shadow)


def test_prediction_log_writes_each_row_to_its_asset_stream(srv: EmbeddedRedis) -> None:
    from serve_app.prediction_log import PredictionLogger
    from tickcast.config import BreakerConfig
    from tickcast.streams import prediction_stream_key

    client = connect(srv.url)
    log = PredictionLogger(lambda: connect(srv.url), "predictions", maxlen=50, batch=64,
                           queue_rows=10_000, breaker=BreakerConfig(), flush_s=0.01, max_busy=1.0)
    log.start()
    counts = {"BTC-USD": 0, "ETH-USD": 0, "SOL-USD": 0}
    for i in range(400):
        asset = "BTC-USD" if i % 4 < 2 else ("ETH-USD" if i % 4 == 2 else "SOL-USD")
        if asset == "SOL-USD" and counts[asset] >= 20:
            asset = "BTC-USD"
        counts[asset] += 2
        assert log.submit([_pred_row(i, asset), _pred_row(i, asset, shadow=True)])
    log.stop(flush_timeout_s=10)
    assert log.stats()["written"] == 800 and log.stats()["dropped_write_failed"] == 0
    assert not client.exists("predictions")  # no shared stream any more
    for asset, n in counts.items():
        entries = client.xrange(prediction_stream_key("predictions", asset))
        assert {f[b"asset"] for _, f in entries} == {asset.encode()}
        ids = [int(f[b"request_id"][1:]) for _, f in entries]
        assert ids == sorted(ids)  # rows keep their order within an asset
        if n <= 50:
            assert len(entries) == n
        else:
            assert 50 <= len(entries) < n  # each stream capped on its own (MAXLEN ~ 50)


def test_prediction_log_counts_a_refused_row_without_losing_the_others(srv: EmbeddedRedis) -> None:
    from serve_app.prediction_log import PredictionLogger
    from tickcast.config import BreakerConfig

    client = connect(srv.url)
    client.set("predictions:BAD-USD", "not a stream")  # one asset's key is unusable
    log = PredictionLogger(lambda: connect(srv.url), "predictions", maxlen=1000, batch=64,
                           queue_rows=10_000, breaker=BreakerConfig(min_calls=2, window_size=4),
                           flush_s=0.01, max_busy=1.0)
    log.start()
    for i in range(100):
        log.submit([_pred_row(i, "BAD-USD" if i % 10 == 0 else "GOOD-USD")])
    log.stop(flush_timeout_s=10)
    stats = log.stats()
    assert (stats["written"], stats["dropped_write_failed"]) == (90, 10)
    assert "WRONGTYPE" in stats["last_error"] and stats["breaker"] == "closed"
    assert client.xlen("predictions:GOOD-USD") == 90
