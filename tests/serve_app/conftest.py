"""Fixtures of the serving tests: real models, real online features, a live Serve app.

The models are real XGBoost quantile models trained on the shared BTC/USD bars with the
project's training code (``serve_app.model_kit``: features, ``fit_final``, conformal
calibration, ONNX export with parity check, registry). Online features are the real feature
rows of those bars replayed at live time, written through the online store; the bar store
holds the bars (the served reference price).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serve_app import model_kit as mk
from tickcast.config import Settings, load_settings
from tickcast.net import free_port
from tickcast.redis_server import connect
from tickcast.storage.bar_store import BarStore
from tickcast.storage.online_store import OnlineFeatureStore
from tickcast.ticks import NS_PER_MIN
from training.registry import ModelRegistry, registry_root

TOKEN = "test-admin-token"


@dataclass
class ServingWorld:
    """Data, models and settings of one serving test module."""

    settings: Settings
    redis_url: str
    registry: ModelRegistry
    v1: str  # BTC-USD champion (blue)
    v2: str  # BTC-USD challenger (green)
    url: str = ""

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def real_bars(shared_data_file: Path):
    """The last 6,000 real BTC/USD 1-minute bars of one venue."""
    return mk.venue_bars(shared_data_file, limit=6000)


@pytest.fixture(scope="session")
def trained_models(real_bars, tmp_path_factory: pytest.TempPathFactory):
    """Two real models trained on different halves of the bars (different predictions)."""
    settings = load_settings(overrides=[f"data_dir={tmp_path_factory.mktemp('train')}"])
    first = mk.train_quick_model(settings, real_bars.iloc[:4000], rounds=30, seed=1)
    second = mk.train_quick_model(settings, real_bars.iloc[2000:], rounds=30, seed=2)
    return first, second


def make_world(tmp_path: Path, redis_url: str, real_bars, trained_models, *,
               overrides: list[str] | None = None) -> ServingWorld:
    """Register models and publish features for BTC-USD, ETH-USD, STALE-USD and NOMODEL-USD."""
    tag = os.urandom(3).hex()
    settings = load_settings(overrides=[
        f"data_dir={tmp_path}", f"redis.url={redis_url}", f"serve.port={free_port()}",
        f"serve.admin_token={TOKEN}", f"serve.redis_prefix='serve-{tag}:'",
        f"serve.prediction_stream=predictions-{tag}", "serve.feature_refresh_s=0.2",
        "serve.registry_poll_s=0.5", "serve.metrics_publish_s=0.5", "serve.drain_period_s=1",
        "serve.max_body_bytes=65536", "serve.max_batch_assets=50",
        "assets=[BTC-USD, ETH-USD]", *(overrides or []),
    ])
    first, second = trained_models
    registry = ModelRegistry(registry_root(settings))
    v1 = mk.register_model(registry, "BTC-USD", first, alias="champion")
    v2 = mk.register_model(registry, "BTC-USD", second, alias="challenger")
    mk.register_model(registry, "ETH-USD", first, alias="champion")
    mk.register_model(registry, "STALE-USD", first, alias="champion")

    freq = settings.bars.freq_s * 1_000_000_000
    live = mk.shift_to_live(real_bars.iloc[-1500:], freq)
    bars = BarStore(Path(settings.data_dir) / "bars", fsync=False)
    online = OnlineFeatureStore(connect(redis_url))
    feats = mk.feature_rows(settings, live)
    for asset in ("BTC-USD", "ETH-USD", "NOMODEL-USD"):
        bars.upsert(asset, "consensus", live.iloc[-5:])
        mk.publish_features(settings, online, asset, feats)
    stale = live.copy()
    stale["ts"] = stale["ts"] - 60 * NS_PER_MIN  # an hour old: beyond serve.feature_max_age_s
    mk.publish_features(settings, online, "STALE-USD", mk.feature_rows(settings, stale))
    return ServingWorld(settings=settings, redis_url=redis_url, registry=registry, v1=v1, v2=v2)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")


def deploy(world: ServingWorld, replicas: int | None = None) -> Iterator[ServingWorld]:
    """Start the app for ``world``; yields with ``world.url`` set; deletes the app after."""
    from serve_app.app import start_serving, stop_serving

    settings = world.settings
    if replicas is not None:
        settings = settings.with_overrides(**{"serve.autoscaling.min_replicas": replicas,
                                              "serve.autoscaling.max_replicas": replicas})
        world.settings = settings
    world.url = start_serving(settings, world.redis_url, wait_ready_s=120)

    def ready() -> bool:
        h = httpx.get(f"{world.url}/v1/health", timeout=10).json()
        m = httpx.get(f"{world.url}/v1/models", timeout=10).json()
        return bool(h.get("ready")) and "BTC-USD" in m.get("assets", {})

    wait_until(ready, 60, "the app to be ready")
    try:
        yield world
    finally:
        stop_serving()
        # Serve keeps its HTTP port for its lifetime: the next module's app, on its own free
        # port, needs a fresh Serve instance.
        from ray import serve

        serve.shutdown()
