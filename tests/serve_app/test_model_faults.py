"""Who is to blame: per-model serving metrics, a model's own failures, the rollback's figures;
and explanations (TreeSHAP) from the native booster, loaded only when asked for.

The broken model here is real: a trained model whose ONNX median ensemble has a NaN base value,
so onnxruntime really returns NaN medians for every row.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from serve_app import model_kit as mk
from serve_app.control import RoutingStore, TrafficControl
from serve_app.feature_cache import FeatureCache
from serve_app.metrics import (LATENCY_BUCKETS_MS, MetricsSnapshot, ServeMetrics, candidate_sla,
                               merge_snapshots, render_prometheus)
from serve_app.predictor import ModelFailed, ServingView
from serve_app.slots import ModelLoader, SlotManager
from tickcast.config import ControllerConfig
from tickcast.errors import ServiceUnavailable
from tickcast.monitoring.shadow_eval import decide_rollback
from tickcast.redis_server import connect

from .conftest import ServingWorld, make_world


# ----------------------------------------------------------------------- pure: metrics
def _replica(stale_503: int, own: dict[tuple[str, str, str], int],
             served: dict[tuple[str, str, str], int], slow: dict[tuple[str, str, str], int] | None = None
             ) -> dict:
    m = ServeMetrics(sla_ms=150.0)
    for _ in range(stale_503):  # stale features of any asset: no model's fault
        m.observe("predict", "none", 503, 1.0, error="unavailable")
    for key, n in served.items():
        for i in range(n):
            m.observe("predict", key[1], 200, 300.0 if i < (slow or {}).get(key, 0) else 2.0,
                      models=[key])
    for key, n in own.items():
        for _ in range(n):
            m.observe("predict", key[1], 500, 1.0, error="model_failed", models=[key])
        m.count_model_errors([(*key, "model_failed", 500)] * n)
    return m.snapshot()


def test_rollback_counts_only_the_candidates_own_errors() -> None:
    cand = ("BTC-USD", "green", "v2")
    base = {"r1": _replica(0, {}, {cand: 10})}
    now = {
        # 400 stale-feature 503s and another asset's broken model: none of it is the candidate's.
        "r1": _replica(400, {("ETH-USD", "green", "e9"): 30}, {cand: 110, ("ETH-USD", "green", "e9"): 5}),
        "r2": _replica(100, {}, {cand: 50}),
    }
    sla = candidate_sla(base, now, "BTC-USD", "v2")
    assert (sla.requests, sla.errors, sla.slow) == (150, 0, 0)
    cfg = ControllerConfig(watch_labels=100, sla_min_requests=50)
    assert decide_rollback(None, 3, sla, cfg).action == "wait"
    # The deployment-wide view (what the rollback read before) saw a 60 % error rate.
    from tickcast.monitoring.shadow_eval import sla_since
    assert sla_since(base, now).error_rate > 0.5

    # Its own failures do count, from any replica, typed or as published.
    broken = {"r1": MetricsSnapshot.from_dict(_replica(400, {cand: 20}, {cand: 110})),
              "r2": _replica(0, {cand: 5}, {cand: 40})}
    sla = candidate_sla(base, broken, "BTC-USD", "v2")
    assert (sla.requests, sla.errors) == (100 + 20 + 40 + 5, 25)
    assert decide_rollback(None, 3, sla, cfg).action == "rollback"
    # A restarted replica (counts went down) counts from zero.
    restarted = {"r1": _replica(0, {}, {cand: 3})}
    assert candidate_sla(base, restarted, "BTC-USD", "v2").requests == 3


def test_latency_rule_reads_the_candidates_requests() -> None:
    cand = ("BTC-USD", "blue", "v7")
    now = {"r1": _replica(0, {}, {cand: 100, ("ETH-USD", "blue", "x"): 100},
                          slow={cand: 10, ("ETH-USD", "blue", "x"): 100})}
    sla = candidate_sla({}, now, "BTC-USD", "v7")
    assert (sla.requests, sla.slow) == (100, 10) and sla.p99_ms is not None


def test_typed_snapshot_reads_old_and_malformed_snapshots() -> None:
    old = {"buckets_ms": list(LATENCY_BUCKETS_MS), "requests": {"predict|blue|200": 5}, "sla_violations": {},
           "latency_hist": {}, "latency_sum_ms": {}, "predictions": {}, "errors": {}}
    snap = MetricsSnapshot.from_dict(old)
    assert snap.served("BTC-USD") == 0 and snap.own_errors_by_slot("BTC-USD") == {}
    weird = MetricsSnapshot.from_dict({"model_errors": {"a|b": 1, "A|blue|v|e|x": 2,
                                                        "A|blue|v|model_failed|500": "3"},
                                       "model_requests": ["not", "a", "map"]})
    assert weird.own_errors("A") == 3 and weird.served("A") == 0
    assert MetricsSnapshot.from_dict(None).total() == 0  # type: ignore[arg-type]
    # Merging across replicas keeps the per-model counts; old snapshots merge as zero.
    merged = merge_snapshots([old, _replica(0, {("A", "green", "v"): 2}, {("A", "green", "v"): 1})])
    assert merged["model_errors"] == {"A|green|v|model_failed|500": 2}
    assert merged["model_requests"] == {"A|green|v": 3}
    text = render_prometheus(merged)
    assert ('tickcast_serve_model_errors_total{asset="A",slot="green",version="v",'
            'error="model_failed",code="500"} 2') in text
    m = ServeMetrics(sla_ms=1.0)
    m.observe("batch", "blue", 200, 5.0, models=[("A", "blue", "v"), ("B", "blue", "v")])
    clone = pickle.loads(pickle.dumps(m))
    assert clone.snapshot() == m.snapshot()
    assert MetricsSnapshot.from_dict(clone.snapshot()).slow("B") == 1


# ----------------------------------------------------------------------- real models
def _poison_median(onnx_bytes: bytes) -> bytes:
    """The same model with a NaN base value in its median ensemble: NaN medians, every row."""
    model = onnx.load_from_string(onnx_bytes)
    hit = 0
    for node in model.graph.node:
        if node.op_type == "TreeEnsembleRegressor" and node.output[0] == "q1":
            for attr in node.attribute:
                if attr.name == "base_values":
                    attr.floats[:] = [float("nan")]
                    hit += 1
    assert hit == 1
    return model.SerializeToString()


@pytest.fixture
def world(tmp_path: Path, redis_url: str, real_bars, trained_models) -> ServingWorld:
    return make_world(tmp_path, redis_url, real_bars, trained_models)


def _serving(world: ServingWorld, compiled: bool = True):
    client = connect(world.redis_url)
    store = RoutingStore(client, prefix=world.settings.serve.redis_prefix)
    control = TrafficControl(store, world.registry)
    slots = SlotManager(store, control, ModelLoader(world.registry, compiled=compiled),
                        refresh_s=0.05, registry_poll_s=0.1)
    from serve_app.app import PredictorReplica

    features = FeatureCache(lambda: connect(world.redis_url), refresh_s=0.05,
                            bar_close=PredictorReplica._bar_close_reader(Path(world.settings.data_dir) / "bars"))
    slots.start()
    features.start()
    return control, slots, features


def test_a_failing_model_is_blamed_alone(world: ServingWorld, trained_models) -> None:
    first, _ = trained_models
    bad = mk.TrainedModel(onnx_bytes=_poison_median(first.onnx_bytes), native_json=first.native_json,
                          card=first.card, reference=first.reference)
    bad_version = mk.register_model(world.registry, "BTC-USD", bad, alias="challenger")
    control, slots, features = _serving(world, compiled=False)  # onnxruntime serves the NaN
    try:
        control.reconcile(force=True)
        slots.sync(force=True)
        freq = world.settings.bars.freq_s * 1_000_000_000
        view = ServingView(slots.state, features.snapshot, world.settings.assets, freq, 180.0)
        av = view.asset_view("BTC-USD")
        assert av.route.version("green") == bad_version
        age = view.check_fresh(av, time.time_ns())
        assert math.isfinite(view.score_online(av, "blue", age).pred)
        with pytest.raises(ModelFailed) as exc:
            view.score_online(av, "green", age)
        assert exc.value.fault == ("BTC-USD", "green", bad_version, "model_failed", 500)
        # In a batch, the rows routed to it fail alone and are blamed on it; others are served.
        control.set_traffic(1.0, False, ["BTC-USD"])
        slots.sync()
        view = ServingView(slots.state, features.snapshot, world.settings.assets, freq, 180.0)
        res = view.score_batch(["BTC-USD", "ETH-USD"], 0.5, time.time_ns())
        assert res.asset == ["ETH-USD"]
        assert res.faults == [("BTC-USD", "green", bad_version, "model_failed", 500)]
        assert [e[:2] for e in res.errors] == [("BTC-USD", "model_failed")]
        # Shadowing the broken model never fails the served prediction.
        control.set_traffic(0.0, True, ["BTC-USD"])
        slots.sync()
        view = ServingView(slots.state, features.snapshot, world.settings.assets, freq, 180.0)
        res = view.score_batch(["BTC-USD"], 0.5, time.time_ns())
        assert res.asset == ["BTC-USD"] and res.slot == ["blue"] and res.shadow_asset == []
        assert res.shadow_faults == [("BTC-USD", "green", bad_version, "model_failed", 500)]
    finally:
        slots.stop()
        features.stop()
    # The compiled engine refuses to load it at all: NaN breaks its parity check at load.
    control, slots, features = _serving(world, compiled=True)
    try:
        slots.sync(force=True)
        assert "disagrees with onnxruntime" in slots.state.errors.get("BTC-USD", "")
    finally:
        slots.stop()
        features.stop()


def test_explanation_adds_up_to_the_served_median_and_loads_lazily(world: ServingWorld) -> None:
    control, slots, features = _serving(world)
    try:
        freq = world.settings.bars.freq_s * 1_000_000_000
        view = ServingView(slots.state, features.snapshot, world.settings.assets, freq, 180.0)
        av = view.asset_view("BTC-USD")
        model = av.blue.model
        assert model.explainer is not None and not model.explainer.loaded
        assert not model.predictor.has_native  # the compiled kernel serves; no booster held
        served = view.score_online(av, "blue", view.check_fresh(av, time.time_ns()))
        e = model.explainer.explain(served.x)
        assert model.explainer.loaded
        assert len(e.top) == 5 and e.n_features == len(model.feature_names)
        mags = [abs(c.contribution) for c in e.top]
        assert mags == sorted(mags, reverse=True)
        assert e.total == pytest.approx(served.pred, abs=2e-5)
        row = served.x[0]
        for c in e.top:
            i = model.feature_names.index(c.feature)
            assert (c.value is None and np.isnan(row[i])) or c.value == pytest.approx(float(row[i]))
        # ETH-USD's model files equal BTC-USD's: one explainer (one booster) for both.
        assert view.asset_view("ETH-USD").blue.model.explainer is model.explainer
        # A version without a native booster cannot be explained: a 503 that says so.
        Path(world.registry.path("BTC-USD", world.v2), "model.xgb.json").unlink()
        green = ModelLoader(world.registry).load("BTC-USD", world.v2)
        with pytest.raises(ServiceUnavailable, match="native booster"):
            green.explainer.explain(served.x)
    finally:
        slots.stop()
        features.stop()


def test_the_replica_counts_a_failing_model_against_itself_only(world: ServingWorld,
                                                                trained_models) -> None:
    """The replica's own bookkeeping (what it publishes for the controller), outside Serve."""
    from serve_app.app import _RUNTIME, PredictorReplica
    from serve_app.request_clock import RequestTag
    from serve_app.schemas import BatchPredictRequest, PredictRequest
    from tickcast.errors import TickcastError

    first, _ = trained_models
    bad = mk.TrainedModel(onnx_bytes=_poison_median(first.onnx_bytes), native_json=first.native_json,
                          card=first.card, reference=first.reference)
    bad_version = mk.register_model(world.registry, "BTC-USD", bad, alias="challenger")
    settings = world.settings.with_overrides(**{"model.compiled_engine": False})
    replica = PredictorReplica(settings.model_dump_json(), world.redis_url)
    try:
        table, _ = replica.control.set_traffic(1.0, None, ["BTC-USD"])
        assert replica._apply(table.rev)
        assert replica.slots.state.model("BTC-USD", "green").version == bad_version

        def call(fn, *args) -> tuple[RequestTag, int]:
            tag = RequestTag(time.perf_counter(), "batch" if fn == replica._predict_batch else "predict")
            try:
                fn(*args, {}, tag)
                status = 200
            except TickcastError as exc:
                status = exc.status
            replica.record_request(tag, status, tag.elapsed_ms())
            return tag, status

        tag, status = call(replica.predict_bytes, PredictRequest(asset="BTC-USD"))
        assert (status, tag.slot, tag.error) == (500, "green", "model_failed")
        _, status = call(replica.predict_bytes, PredictRequest(asset="STALE-USD"))
        assert status == 503
        _, status = call(replica.predict_bytes, PredictRequest(asset="DOGE-USD"))
        assert status == 404
        tag, status = call(replica._predict_batch, BatchPredictRequest(assets=["BTC-USD"]))
        assert (status, tag.error) == (500, "model_failed")
        _, status = call(replica._predict_batch, BatchPredictRequest(assets=["BTC-USD", "ETH-USD"]))
        assert status == 200
        snap = MetricsSnapshot.from_dict(replica.metrics.snapshot())
        assert snap.own_errors("BTC-USD", bad_version) == 3
        assert snap.own_errors_by_slot("BTC-USD") == {"green": 3}
        assert snap.served("BTC-USD", bad_version) == 3
        assert snap.served("ETH-USD") == 1
        assert snap.served("STALE-USD") == 0 and snap.own_errors("STALE-USD", server_only=False) == 0
        sla = candidate_sla({}, {"r": snap}, "BTC-USD", bad_version)
        assert (sla.requests, sla.errors, sla.error_rate) == (3, 3, 1.0)
        raw = replica.metrics.snapshot()
        assert {"predict|none|503", "predict|none|404", "predict|green|500", "batch|green|500"} <= set(raw["requests"])
        # The Ray metrics (what Grafana's p99 reads) get every status of the prediction endpoints.
        assert {code for _, code, _ in replica._latencies} == {200, 404, 500, 503}
    finally:
        replica._stop.set()
        replica.slots.stop()
        replica.features.stop()
        replica.logger.stop()
        _RUNTIME.replica = None
