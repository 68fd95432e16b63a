"""Shared fixtures: one real Redis server and one local Ray instance for the whole session.

Unit tests of pure logic use neither. Integration tests ask for ``redis_url`` and/or
``ray_session``; both are real (an embedded ``redis-server`` or ``REDIS_URL``; a local Ray).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tickcast.config import Settings, load_settings
from tickcast.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"


@pytest.fixture(scope="session")
def shared_data_file() -> Path:
    """The real multi-venue BTC file (read in place, never copied into the repo)."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis | None]:
    """The session's Redis server when embedded (None when REDIS_URL points elsewhere)."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    srv = EmbeddedRedis.start(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_redis: EmbeddedRedis | None) -> str:
    return os.environ["REDIS_URL"] if embedded_redis is None else embedded_redis.url


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    # Serve (if a test started it) is shut down with Ray.
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve never started
        pass
    ray.shutdown()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    """Default settings pointed at a fresh data dir and the session's Redis."""
    return load_settings(overrides=[f"data_dir={tmp_path}", f"redis.url={redis_url}"])
