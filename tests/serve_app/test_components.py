"""Serving components against a real Redis and real models: prediction log, routing store and
traffic control, feature cache, slot manager and hot swap, metrics; plus the pure parts."""

from __future__ import annotations

import math
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from serve_app import model_kit as mk
from serve_app.control import Conflict, RoutingStore, TrafficControl
from serve_app.feature_cache import FeatureCache, parse_safety
from serve_app.metrics import ServeMetrics, merge_snapshots, quantile_from_hist, render_prometheus
from serve_app.prediction_log import FIELDS, PredictionLogger
from serve_app.predictor import ServingView
from serve_app.routing import AssetRoute
from serve_app.schemas import BatchPredictRequest, PredictRequest
from serve_app.slots import ModelLoader, SlotManager
from tickcast.config import BreakerConfig
from tickcast.errors import InvalidInput, ServiceUnavailable, UnknownAsset
from tickcast.redis_server import connect
from tickcast.storage.safety_store import clear_safety, publish_safety
from tickcast.streams import prediction_stream_key
from training.registry import ModelRegistry

from .conftest import ServingWorld, make_world

pytestmark = pytest.mark.redis


@pytest.fixture
def world(tmp_path: Path, redis_url: str, real_bars, trained_models) -> ServingWorld:
    return make_world(tmp_path, redis_url, real_bars, trained_models)


def _row(i: int, shadow: bool = False) -> tuple:
    return (f"r{i}", "BTC-USD", "green" if shadow else "blue", "v1", 1_700_000_000_000_000_000,
            0.001 * i, -0.01, 0.01, 100.0 + i, shadow)


# ----------------------------------------------------------------------- prediction log
def test_prediction_log_writes_every_row(redis_url: str) -> None:
    stream = f"predictions-test-{time.time_ns()}"
    log = PredictionLogger(lambda: connect(redis_url), stream, maxlen=10_000, batch=64,
                           queue_rows=1_000, breaker=BreakerConfig(), flush_s=0.01, max_busy=1.0)
    log.start()
    for i in range(300):
        assert log.submit([_row(i), _row(i, shadow=True)])
    log.stop(flush_timeout_s=10)
    client = connect(redis_url)
    entries = client.xrange(prediction_stream_key(stream, "BTC-USD"))  # one stream per asset
    assert len(entries) == 600
    fields = entries[3][1]
    assert set(fields) == {f.encode() for f in FIELDS}
    assert fields[b"request_id"] == b"r1" and fields[b"shadow"] == b"1"
    assert float(fields[b"price"]) == 101.0 and int(fields[b"bar_ts"]) == 1_700_000_000_000_000_000
    assert log.stats()["written"] == 600 and log.stats()["dropped_queue_full"] == 0


def test_prediction_log_never_blocks_when_redis_is_down() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    log = PredictionLogger(lambda: redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                                               socket_timeout=0.2, retry=Retry(NoBackoff(), 0)),
                           "predictions", maxlen=100, batch=10, queue_rows=50,
                           breaker=BreakerConfig(min_calls=2, window_size=4, open_s=5.0), flush_s=0.01)
    log.start()
    t0 = time.perf_counter()
    accepted = sum(log.submit([_row(i)]) for i in range(200))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.05  # 200 submissions with Redis unreachable: no waiting on it
    time.sleep(0.5)
    stats = log.stats()
    log.stop(flush_timeout_s=0.1)
    assert accepted <= 200 and stats["dropped_queue_full"] + stats["dropped_write_failed"] > 0
    assert stats["written"] == 0 and stats["breaker"] in ("open", "half_open")


# ----------------------------------------------------------------------- routing store
def test_routing_store_compare_and_set_loses_no_update(redis_url: str) -> None:
    store = RoutingStore(connect(redis_url), prefix=f"cas-{time.time_ns()}:")
    assets = [f"A{i}" for i in range(8)]

    def add(asset: str) -> None:
        for k in range(10):
            store.update(lambda t, a=asset, k=k: t.with_routes({a: AssetRoute(blue=f"{a}-v{k}")}))

    threads = [threading.Thread(target=add, args=(a,)) for a in assets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = store.load()
    assert {a: r.blue for a, r in table.routes.items()} == {a: f"{a}-v9" for a in assets}
    assert table.rev == 80  # every change committed exactly once
    assert store.update(lambda t: t).rev == 80  # no change, no write


def test_traffic_control_promote_rollback_and_reconcile(world: ServingWorld) -> None:
    store = RoutingStore(connect(world.redis_url), prefix=world.settings.serve.redis_prefix)
    control = TrafficControl(store, world.registry)
    table = control.reconcile(force=True)
    btc = table.routes["BTC-USD"]
    assert (btc.blue, btc.green, btc.champion) == (world.v1, world.v2, world.v1)
    assert set(table.routes) == {"BTC-USD", "ETH-USD", "STALE-USD"}

    table, changes = control.set_traffic(0.25, True, ["BTC-USD"])
    assert table.routes["BTC-USD"].green_weight == 0.25 and changes[0].after.shadow
    with pytest.raises(UnknownAsset):
        control.set_traffic(0.5, None, ["NOPE"])

    table, _ = control.promote("BTC-USD")
    assert table.routes["BTC-USD"].champion == world.v2
    assert world.registry.aliases("BTC-USD")["champion"] == world.v2
    assert world.registry.aliases("BTC-USD")["previous"] == world.v1
    rev = table.rev
    table, _ = control.promote("BTC-USD", version=world.v2)  # already champion: nothing changes
    assert table.rev == rev
    with pytest.raises(Conflict):
        control.promote("STALE-USD")  # both its slots hold the champion: nothing to promote
    table, _ = control.rollback("BTC-USD")
    assert table.routes["BTC-USD"].champion == world.v1
    with pytest.raises(Conflict):
        control.rollback("BTC-USD")  # the registry has no previous champion any more

    # A promotion done in the registry directly (the closed-loop controller) is followed.
    world.registry.promote("BTC-USD", world.v2)
    table = control.reconcile()
    assert table.routes["BTC-USD"].champion == world.v2
    # A new challenger goes into the idle slot with no traffic.
    v3 = mk.register_model(world.registry, "BTC-USD",
                           mk.TrainedModel(*_model_parts(world, "BTC-USD", world.v1)), alias="challenger")
    route = control.reconcile().routes["BTC-USD"]
    assert route.champion == world.v2 and route.version(route.idle_slot) == v3
    assert route.choose(0.0) == route.champion_slot


def _model_parts(world: ServingWorld, asset: str, version: str) -> tuple:
    path = world.registry.path(asset, version)
    card = world.registry.card(asset, version)
    for key in ("version", "asset", "created", "code_version"):
        card.pop(key, None)
    return ((path / "model.onnx").read_bytes(), (path / "model.xgb.json").read_bytes(), card,
            world.registry.reference(asset, version))


# ----------------------------------------------------------------------- slots + features
def test_slot_manager_hot_swap_keeps_serving(world: ServingWorld) -> None:
    client = connect(world.redis_url)
    store = RoutingStore(client, prefix=world.settings.serve.redis_prefix)
    control = TrafficControl(store, world.registry)
    loader = ModelLoader(world.registry)
    slots = SlotManager(store, control, loader, refresh_s=0.05, registry_poll_s=0.2)
    from serve_app.app import PredictorReplica

    features = FeatureCache(lambda: connect(world.redis_url), refresh_s=0.05,
                            bar_close=PredictorReplica._bar_close_reader(Path(world.settings.data_dir) / "bars"))
    slots.start()
    features.start()
    try:
        state0 = slots.state
        assert state0.model("BTC-USD", "blue").version == world.v1
        # ETH-USD's model file equals BTC-USD's champion: one predictor, shared.
        assert state0.model("ETH-USD", "blue").predictor is state0.model("BTC-USD", "blue").predictor
        freq = world.settings.bars.freq_s * 1_000_000_000

        def view() -> ServingView:
            return ServingView(slots.state, features.snapshot, world.settings.assets, freq, 180.0)

        av = view().asset_view("BTC-USD")
        age = view().check_fresh(av, time.time_ns())
        before = view().score_online(av, "blue", age)
        assert before.version == world.v1 and before.price is not None and before.lo < before.hi
        control.promote("BTC-USD")
        deadline = time.monotonic() + 5
        # Scoring never fails while the swap happens (under load the swap may land before the
        # loop's first pass: the version served just before it counts as the old one).
        versions = {before.version}
        while time.monotonic() < deadline:
            v = view()
            a = v.asset_view("BTC-USD")
            versions.add(v.score_online(a, a.route.champion_slot, 1.0).version)
            if slots.state.table.routes["BTC-USD"].champion == world.v2:
                break
        assert slots.state.model("BTC-USD", "green").version == world.v2
        assert world.v1 in versions
        # The two models disagree (trained on different bars).
        after = view().score_online(view().asset_view("BTC-USD"), "green", 1.0)
        assert after.pred != before.pred
        with pytest.raises(UnknownAsset):
            view().asset_view("DOGE-USD")
        with pytest.raises(ServiceUnavailable):
            view().asset_view("NOMODEL-USD")
        stale = view().asset_view("STALE-USD")
        with pytest.raises(ServiceUnavailable, match="stale"):
            view().check_fresh(stale, time.time_ns())
        # Vectorized batch agrees with the single path.
        res = view().score_batch(["BTC-USD", "ETH-USD", "STALE-USD"], 0.99, time.time_ns())
        assert res.asset == ["BTC-USD", "ETH-USD"]
        assert float(res.pred[0]) == pytest.approx(after.pred, abs=1e-12)
        assert [e[0] for e in res.errors] == ["STALE-USD"] and res.shadow_asset == []
    finally:
        slots.stop()
        features.stop()


def test_feature_cache_reads_safety_and_discovers_assets(world: ServingWorld) -> None:
    client = connect(world.redis_url)
    from serve_app.app import PredictorReplica

    cache = FeatureCache(lambda: connect(world.redis_url), refresh_s=0.05,
                         bar_close=PredictorReplica._bar_close_reader(Path(world.settings.data_dir) / "bars"))
    snap = cache.refresh()
    assert {"BTC-USD", "ETH-USD", "NOMODEL-USD", "STALE-USD"} <= set(snap.features)
    entry = snap.features["BTC-USD"]
    assert entry.price is not None and entry.values.dtype == np.float64
    publish_safety(client, "BTC-USD", {"regime": "ELEVATED", "multiplier": "0.5", "halted": "0"})
    try:
        snap = cache.refresh()
        assert snap.safety["BTC-USD"].regime == "ELEVATED" and snap.safety["BTC-USD"].multiplier == 0.5
    finally:
        clear_safety(client, "BTC-USD")
    assert "BTC-USD" not in cache.refresh().safety
    # A Redis outage keeps the last snapshot in use and says why.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    broken = FeatureCache(lambda: redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                                              retry=Retry(NoBackoff(), 0)))
    assert broken.refresh().error and broken.snapshot.features == {}


def test_feature_cache_prices_from_the_published_close(world: ServingWorld) -> None:
    from tickcast.features.definitions import feature_names, schema_hash
    from tickcast.storage.online_store import OnlineFeatureStore

    looked_up: list[tuple[str, int]] = []

    def bar_close(asset: str, bar_ts: int) -> float | None:
        looked_up.append((asset, bar_ts))
        return 1.0

    names = list(feature_names(world.settings.features))
    online = OnlineFeatureStore(connect(world.redis_url))
    bar_ts = (time.time_ns() // 60_000_000_000 - 1) * 60_000_000_000
    online.write("CLOSE-USD", bar_ts, schema_hash(world.settings.features), names,
                 np.zeros(len(names)), close=123.25)
    online.write("NOCLOSE-USD", bar_ts, schema_hash(world.settings.features), names, np.zeros(len(names)))
    cache = FeatureCache(lambda: connect(world.redis_url), refresh_s=0.05, bar_close=bar_close)
    cache.track(["CLOSE-USD", "NOCLOSE-USD"])
    snap = cache.refresh()
    assert snap.features["CLOSE-USD"].price == 123.25
    assert snap.features["NOCLOSE-USD"].price == 1.0  # from the bar store
    read = {a for a, _ in looked_up}
    assert "NOCLOSE-USD" in read and "CLOSE-USD" not in read  # a published close needs no bar read


def test_safety_parsing_is_defensive() -> None:
    assert parse_safety({}).regime == "NORMAL"
    halted = parse_safety({b"regime": b"CRISIS", b"multiplier": b"0.2", b"halted": b"1"})
    assert halted.halted and halted.multiplier == 0.0


# ----------------------------------------------------------------------- pure parts
def test_metrics_merge_render_and_pickle() -> None:
    a, b = ServeMetrics(sla_ms=5.0), ServeMetrics(sla_ms=5.0)
    rng = np.random.default_rng(3)
    lat = rng.exponential(2.0, 2000)
    for i, ms in enumerate(lat):
        (a if i % 2 else b).observe("predict", "blue" if i % 3 else "green", 200, float(ms))
    a.count_predictions("green", "shadow", 7)
    merged = merge_snapshots([a.snapshot(), b.snapshot()])
    total = sum(v for k, v in merged["requests"].items())
    assert total == 2000 and merged["replicas"] == 2
    assert sum(merged["sla_violations"].values()) == int((lat > 5.0).sum())
    counts = [sum(x) for x in zip(*merged["latency_hist"].values())]
    assert quantile_from_hist(counts, merged["buckets_ms"], 0.5) >= float(np.quantile(lat, 0.5))
    text = render_prometheus(merged, gauges=[("green_weight", "w", {"asset": "A"}, 0.1)])
    assert 'tickcast_serve_predictions_total{slot="green",role="shadow"} 7' in text
    assert 'tickcast_serve_green_weight{asset="A"} 0.1' in text
    clone = pickle.loads(pickle.dumps(a))
    assert clone.snapshot() == a.snapshot()


def test_request_schemas_name_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        PredictRequest.model_validate({"asset": "BTC-USD", "features": {"x": float("inf")}})
    assert exc.value.errors()[0]["loc"] == ("features", "x")
    with pytest.raises(ValidationError):
        BatchPredictRequest.model_validate({})
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"asset": "a b"})


def test_model_loader_rejects_unusable_cards(world: ServingWorld, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    onnx, native, card, ref = _model_parts(world, "BTC-USD", world.v1)
    bad = dict(card, conformal={"alpha": 0.1, "window": 100, "scaled": True, "aci_gamma": 0.0,
                                "sigma_floor": 1e-5, "sigma_feature": "not_a_feature"})
    v = registry.register("X-USD", onnx, bad, ref)
    from tickcast.errors import RegistryError

    with pytest.raises(RegistryError, match="not_a_feature"):
        ModelLoader(registry).load("X-USD", v)
    v2 = registry.register("X-USD", onnx, card, ref)
    model = ModelLoader(registry).load("X-USD", v2)
    x = np.zeros((3, len(model.feature_names)), dtype=np.float32)
    pred, lo, hi = model.score(x)
    assert pred.shape == (3,) and np.all(lo <= hi) and math.isfinite(float(pred[0]))
    with pytest.raises(InvalidInput):
        model.score(np.zeros((1, 2), dtype=np.float32))


def test_redis_url_with_password(tmp_path: Path) -> None:
    """A password-protected Redis (REDIS_URL=redis://:secret@host:port/0) serves every part."""
    from tickcast.redis_server import EmbeddedRedis, redact

    srv = EmbeddedRedis.start(tmp_path)
    try:
        redis.Redis.from_url(srv.url).config_set("requirepass", "s3cret")
        url = srv.url.replace("redis://", "redis://:s3cret@")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(srv.url).ping()
        store = RoutingStore(connect(url), prefix="pw:")
        assert store.update(lambda t: t.with_routes({"A": AssetRoute(blue="v1")})).rev == 1
        log = PredictionLogger(lambda: connect(url), "predictions", maxlen=100, batch=10,
                               queue_rows=100, breaker=BreakerConfig(), flush_s=0.01, max_busy=1.0)
        log.start()
        log.submit([_row(1)])
        log.stop(flush_timeout_s=5)
        assert connect(url).xlen("predictions:BTC-USD") == 1
        assert redact(url) == srv.url.replace("redis://", "redis://:***@")
    finally:
        srv.stop()


def test_periodic_thread_runs_until_stopped() -> None:
    from serve_app.periodic import PeriodicThread

    calls: list[float] = []
    worker = PeriodicThread("test-periodic", 0.01, lambda: calls.append(time.monotonic()))
    assert not worker.running
    worker.start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.running and len(calls) >= 3
    worker.stop()
    assert not worker.running
    seen = len(calls)
    time.sleep(0.05)
    assert len(calls) == seen  # no call after stop
