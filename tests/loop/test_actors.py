"""Drift and safety in a market shard, and the controller, on real Ray and a real Redis.

The test plays the two producers the loop listens to: it publishes each bar's features with
the online store (``features_log:<ASSET>``) and logs forecasts on ``predictions:<ASSET>`` in the
serving app's entry layout, from real models (quick XGBoost fits registered in a real
registry) or, for the controller's decisions, forecasts built to be good or bad. The full path
through the Serve app is covered by the drills (``test_drill.py``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pytest

from actors.feeder import parse_entry_id
from actors.loop_support import stream_tail_id
from serve_app import model_kit as mk
from tickcast.config import Settings, load_settings
from tickcast.drill import shift_prices
from tickcast.features.definitions import compute_features, feature_names, schema_hash
from tickcast.monitoring.events import EventLog
from tickcast.redis_server import EmbeddedRedis, connect
from tickcast.storage.bar_store import BarStore
from tickcast.storage.online_store import OnlineFeatureStore
from tickcast.streams import prediction_stream_key
from training.registry import ModelRegistry, registry_root

pytestmark = [pytest.mark.ray, pytest.mark.redis]

ASSET = "BTC-USD"
MIN = 60_000_000_000
HISTORY = 2880


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis of this module's own (key names of the loop are fixed per asset)."""
    srv = EmbeddedRedis.start(tmp_path_factory.mktemp("loop-redis"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def market(shared_data_file: Path) -> pd.DataFrame:
    """Real BTC/USD minutes of one venue (bar-store schema), calm history first."""
    return mk.venue_bars(shared_data_file).iloc[2880:2880 + HISTORY + 600].reset_index(drop=True)


def _settings(tmp_path: Path, url: str, **extra: Any) -> Settings:
    over = [f"data_dir={tmp_path}", f"redis.url={url}", f"assets=[{ASSET}]",
            "model.purge_bars=10", "controller.poll_s=0.1", "controller.monitor_poll_s=0.1",
            "drift.window=120", "drift.min_window=60", "drift.eval_every=10",
            "drift.detector_warmup=60", "drift.performance_window=60",
            "drift.performance_min_labels=30", "safety.vol_short=10", "safety.vol_long=60",
            "shards.monitor_sweep_s=0.5",
            # The loop's mechanics on a real regime change, with KS alone: on a 120-bar window
            # of calm real minutes the binned measures (PSI, TVD, KL) alone can read CRITICAL
            # (their calibration is tested in tests/monitoring and measured by bench.drift).
            "drift.weight_psi=0", "drift.weight_w1=0", "drift.weight_tvd=0", "drift.weight_kl=0"]
    over += [f"{k}={v}" for k, v in extra.items()]
    return load_settings(overrides=over)


def _wait(pred: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        out = pred()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _log_forecasts(client: Any, settings: Settings, version: str, slot: str, bar_ts: np.ndarray,
                   fc: np.ndarray, shadow: bool = False) -> None:
    """Entries of the prediction stream, in the serving app's layout."""
    pipe = client.pipeline(transaction=False)
    for t, (lo, pred, hi) in zip(bar_ts.tolist(), fc.tolist()):
        pipe.xadd(prediction_stream_key(settings.serve.prediction_stream, ASSET), {
            "request_id": f"t{t}", "asset": ASSET, "slot": slot, "version": version,
            "bar_ts": str(t), "pred": repr(pred), "lo": repr(lo), "hi": repr(hi),
            "price": "nan", "ts": str(time.time_ns()), "shadow": "1" if shadow else "0"})
    pipe.execute()


def _events(client: Any, settings: Settings, **kw: Any) -> list[dict[str, Any]]:
    return EventLog(client, settings.controller.events_stream).read(**kw)


def test_drift_and_safety_in_a_shard_follow_a_regime_change_and_survive_a_kill(
        ray_session: None, redis_server: EmbeddedRedis, market: pd.DataFrame,
        tmp_path: Path) -> None:
    import ray

    from actors.market_shard import get_or_create_shards, kill_shards
    from serve_app.slots import ModelLoader

    settings = _settings(tmp_path, redis_server.url)
    client = connect(redis_server.url)
    client.flushall()
    store = BarStore(tmp_path / "bars", fsync=False)
    live0 = int(market["ts"].iloc[HISTORY])
    shift_at = live0 + 150 * MIN
    bars = shift_prices(market, shift_at, vol=3.0)  # the market turns 3x as volatile
    store.upsert(ASSET, "consensus", bars.iloc[:HISTORY])
    registry = ModelRegistry(registry_root(settings))
    champion = mk.register_model(registry, ASSET, mk.train_quick_model(settings, market.iloc[:HISTORY],
                                                                       rounds=40))
    shards = get_or_create_shards(settings, redis_server.url, (ASSET,), closed_loop=True)
    drift, safety = shards.ref(ASSET, "drift"), shards.ref(ASSET, "safety")
    model = ModelLoader(registry).load(ASSET, champion)
    feats = compute_features(bars, settings.features)
    names = list(feature_names(settings.features))
    online = OnlineFeatureStore(client)

    def feed(lo: int, hi: int) -> None:
        """Bars ``lo..hi``: features at each close, the champion's forecast, then the bars.

        Written in bulk, so the forecasts go first: live, each forecast is logged before the
        next bar closes.
        """
        rows = bars.iloc[lo:hi]
        x = feats.loc[rows["ts"].to_numpy(), list(model.feature_names)].to_numpy(np.float32)
        pred, qlo, qhi = model.score(x)
        for t in rows["ts"].tolist():
            online.write(ASSET, int(t), schema_hash(settings.features), names,
                         feats.loc[t, names].to_numpy(np.float64))
        _log_forecasts(client, settings, champion, "blue", rows["ts"].to_numpy(),
                       np.column_stack([qlo, pred, qhi]))
        # Written in bulk, the bars must not overtake the forecasts: wait until the safety
        # actor has read them (a bar whose successor closed before its forecast came is flat).
        tail = parse_entry_id(stream_tail_id(
            client, prediction_stream_key(settings.serve.prediction_stream, ASSET)))
        _wait(lambda: parse_entry_id(ray.get(safety.status.remote())["predictions_id"]) >= tail,
              what="forecasts read")
        store.upsert(ASSET, "consensus", rows)

    feed(HISTORY, HISTORY + 150)
    calm = _wait(lambda: (st := ray.get(drift.status.remote()))["counts"]["labels"] >= 140
                 and st["counts"]["features"] >= 150 and st, what="calm features and labels")
    assert calm["champion"] == champion and calm["counts"]["features"] == 150
    assert calm["level"] in ("NORMAL", "WARNING")

    # A kill mid-stream: Ray restarts the shard, whose drift and safety resume from their
    # checkpoints.
    pid = safety_pid = ray.get(drift.pid.remote())
    assert ray.get(safety.pid.remote()) == pid  # one process for the asset's whole state
    os.kill(pid, signal.SIGKILL)
    feed(HISTORY + 150, HISTORY + 400)
    after = _wait(lambda: (st := ray.get(drift.status.remote(), timeout=30))["counts"]["features"] >= 400 and st,
                  timeout_s=90, what="shifted features after the restart")
    assert after["restored"] and after["pid"] != pid
    assert after["counts"]["features"] == 400  # nothing counted twice, nothing lost
    _wait(lambda: ray.get(drift.status.remote())["level"] == "CRITICAL", what="CRITICAL drift")
    st = ray.get(drift.status.remote())
    # The alert was raised when the score first reached drift.retrain_score (the SLA's 0.2).
    assert st["retrain"] and st["alert"]["score"] >= settings.drift.retrain_score
    report = ray.get(drift.report.remote())
    # The quick model's card has no validation figures: feature and prediction drift decide.
    assert report["performance"] == {} and report["score"] >= 0.3 and report["feature_score"] > 0.15
    assert "rv_short" in report["drifted_features"]

    sf = _wait(lambda: (s := ray.get(safety.status.remote()))["last_done_ts"] >= int(bars["ts"].iloc[HISTORY + 398]) and s,
               what="safety caught up")
    assert sf["restored"] and sf["pid"] != safety_pid
    assert sf["counts"]["warm_bars"] == settings.safety.vol_long + 1
    assert sf["counts"]["bars"] == 400  # every live bar once, each with its forecast here
    assert sf["counts"]["with_forecast"] > 300
    published = client.hgetall(f"safety:{ASSET}")
    assert published[b"regime"].decode() in ("ELEVATED", "CRISIS", "NORMAL")
    assert float(published[b"multiplier"]) == pytest.approx(sf["multiplier"])

    events = _events(client, settings, asset=ASSET)
    kinds = [e["type"] for e in events]
    assert "drift_alert" in kinds and "drift_level" in kinds
    regime = [e for e in events if e["type"] == "regime" and e["to"] in ("ELEVATED", "CRISIS")]
    assert regime and regime[0]["ratio"] >= settings.safety.elevated_ratio
    assert regime[0]["bar"] > 0 and "vol_short" in regime[0]
    assert kill_shards() == 1


def test_controller_promotes_a_better_challenger_then_rolls_back_a_bad_champion(
        ray_session: None, redis_server: EmbeddedRedis, market: pd.DataFrame,
        tmp_path: Path) -> None:
    import ray

    from actors.controller import get_or_create_controller, kill_controller

    settings = _settings(tmp_path, redis_server.url, **{
        "controller.min_paired": 40, "controller.watch_labels": 40,
        "controller.retrain_min_new_bars": 100000, "controller.label_timeout_bars": 5})
    client = connect(redis_server.url)
    client.flushall()
    store = BarStore(tmp_path / "bars", fsync=False)
    store.upsert(ASSET, "consensus", market.iloc[:HISTORY])
    registry = ModelRegistry(registry_root(settings))
    quick = mk.train_quick_model(settings, market.iloc[:HISTORY], rounds=20)
    v1 = mk.register_model(registry, ASSET, quick, alias="champion")
    ctl = get_or_create_controller(settings, redis_server.url)
    _wait(lambda: ray.get(ctl.status.remote())["assets"][ASSET]["champion"] == v1, what="adoption")

    # A CRITICAL alert: the controller waits for data of the new regime (100000 bars here).
    assert ray.get(ctl.on_alert.remote(ASSET, {"score": 0.5, "bar_ts": int(market["ts"].iloc[HISTORY - 1])}))
    assert ray.get(ctl.status.remote())["assets"][ASSET]["phase"] == "waiting_data"
    assert ray.get(ctl.on_alert.remote(ASSET, {"score": 0.6}))  # busy: recorded as ignored

    # A challenger registered meanwhile is shadow-tested at once.
    v2 = mk.register_model(registry, ASSET, quick, alias="challenger", note="test challenger")
    loop = _wait(lambda: (a := ray.get(ctl.status.remote())["assets"][ASSET])["phase"] == "shadow" and a,
                 what="shadow")
    assert loop["candidate"] == v2 and loop["incumbent"] == v1
    from serve_app.control import RoutingStore

    route = RoutingStore(client, settings.serve.redis_prefix).load().get(ASSET)
    assert route is not None and route.shadow and route.slot_of(v2) is not None

    # The challenger's forecasts know the next return; the champion's are flat.
    close = market["close"].to_numpy()
    ts = market["ts"].to_numpy()
    rng = np.random.default_rng(0)

    def log_bars(lo: int, hi: int, good: str, bad: str, bad_bias: float = 0.0) -> None:
        idx = np.arange(lo, hi)
        y = np.log(close[idx + 1] / close[idx])
        sharp = y + rng.normal(0, 2e-4, len(idx))
        _log_forecasts(client, settings, good, "green", ts[idx],
                       np.column_stack([sharp - 8e-4, sharp, sharp + 8e-4]), shadow=True)
        _log_forecasts(client, settings, bad, "blue", ts[idx],
                       np.tile([bad_bias - 1.5e-3, bad_bias, bad_bias + 1.5e-3], (len(idx), 1)))
        store.upsert(ASSET, "consensus", market.iloc[lo:hi + 1])

    log_bars(HISTORY, HISTORY + 25, v2, v1)
    _wait(lambda: ray.get(ctl.status.remote())["assets"][ASSET]["paired"] >= 20, what="pairs")
    # A kill during the evaluation: the pairs collected so far come back from the checkpoint.
    pid = ray.get(ctl.pid.remote())
    os.kill(pid, signal.SIGKILL)
    log_bars(HISTORY + 25, HISTORY + 60, v2, v1)
    promoted = _wait(lambda: [e for e in _events(client, settings, asset=ASSET, types=["promoted"])],
                     timeout_s=90, what="promotion")[0]
    assert ray.get(ctl.status.remote())["restored"]
    assert promoted["candidate"] == v2 and promoted["n"] == 40
    assert promoted["p_candidate_better"] < 0.05 and promoted["dm_stat"] < 0
    assert promoted["sharpe_candidate"] >= promoted["sharpe_incumbent"]
    assert registry.aliases(ASSET) == {"champion": v2, "previous": v1}
    watch = _wait(lambda: (a := ray.get(ctl.status.remote())["assets"][ASSET])["phase"] == "watch" and a,
                  what="watch")
    assert watch["candidate"] == v2 and watch["incumbent"] == v1

    # Now the new champion goes wrong (a biased median) while the previous one is sharp.
    since = HISTORY + 62
    log_bars(since, since + 45, v1, v2, bad_bias=2e-3)
    rolled = _wait(lambda: [e for e in _events(client, settings, asset=ASSET, types=["rolled_back"])],
                   timeout_s=60, what="rollback")[0]
    assert rolled["champion"] == v2 and rolled["previous"] == v1
    assert rolled["p_candidate_worse"] < 0.05 and rolled["n"] == 40
    assert registry.aliases(ASSET)["champion"] == v1
    final = ray.get(ctl.status.remote())["assets"][ASSET]
    assert final["phase"] == "idle" and v2 in final["decided"]
    kinds = [e["type"] for e in _events(client, settings, asset=ASSET)]
    for kind in ("retrain_scheduled", "alert_ignored", "retrain_cancelled", "shadow_started",
                 "promoted", "watch_started", "rolled_back"):
        assert kind in kinds, kind
    assert kill_controller()


def test_the_halt_follows_the_users_book_read_by_the_shard(
        ray_session: None, redis_server: EmbeddedRedis, market: pd.DataFrame,
        tmp_path: Path) -> None:
    """``book:<ASSET>`` entries (the user's P&L) reach the asset's safety in its shard: a loss
    beyond ``safety.max_drawdown`` halts, whatever the paper account does; a malformed entry
    is counted by reason and loses nothing else."""
    import ray

    from actors.market_shard import get_or_create_shards, kill_shards
    from tickcast.monitoring.book import book_stream_key

    settings = _settings(tmp_path, redis_server.url)
    client = connect(redis_server.url)
    client.flushall()
    store = BarStore(tmp_path / "bars", fsync=False)
    store.upsert(ASSET, "consensus", market.iloc[:HISTORY])
    shards = get_or_create_shards(settings, redis_server.url, (ASSET,), closed_loop=True)
    safety = shards.ref(ASSET, "safety")
    live = market.iloc[HISTORY:HISTORY + 30]
    t0 = int(live["ts"].iloc[0])
    key = book_stream_key(ASSET)
    client.xadd(key, {"asset": ASSET, "ts": str(t0), "capital": "10000", "pnl": "0"})
    client.xadd(key, {"asset": ASSET, "ts": str(t0 + 2 * MIN), "pnl": "not-a-number"})
    client.xadd(key, {"asset": ASSET, "ts": str(t0 + 5 * MIN), "pnl": "-900"})  # -9% of equity
    store.upsert(ASSET, "consensus", live)
    st = _wait(lambda: (s := ray.get(safety.status.remote()))["halted"] and s, what="book halt")
    assert st["source"] == "book" and st["book_applied"] == 2
    assert sum(st["book_rejected"].values()) == 1
    assert st["drawdown"] >= settings.safety.max_drawdown
    assert client.hget(f"safety:{ASSET}", "halted") == b"1"  # what every prediction shows
    assert kill_shards() == 1
