"""A market that is closed, over HTTP: real Ray Serve, real Redis, real models.

ETH-USD trades one minute a week (two days from now), so it is closed during the whole test;
BTC-USD trades around the clock beside it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterator

import httpx
import pytest

from .conftest import ServingWorld, deploy, make_world

pytestmark = [pytest.mark.ray, pytest.mark.redis]

_NOW = datetime.now(timezone.utc)
_OPENS = (_NOW + timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
NEXT_OPEN = _OPENS.strftime("%Y-%m-%dT%H:%M:%SZ")
CALENDAR = ("{timezone: UTC, sessions: [{days: [%s], open: '00:00', close: '00:01'}]}"
            % _OPENS.strftime("%a").lower())


@pytest.fixture(scope="module")
def api(ray_session: None, redis_url: str, real_bars, trained_models,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingWorld]:
    world = make_world(tmp_path_factory.mktemp("sessions"), redis_url, real_bars, trained_models,
                       overrides=[f"calendars.ETH-USD={CALENDAR}"])
    yield from deploy(world, replicas=1)


def test_a_closed_market_answers_503_market_closed(api: ServingWorld) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post("/v1/predict", json={"asset": "ETH-USD"})
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["error"] == "market_closed" and body["next_open"] == NEXT_OPEN
        assert body["detail"].startswith(f"market closed: ETH-USD reopens at {NEXT_OPEN}")
        assert http.post("/v1/predict", json={"asset": "BTC-USD"}).status_code == 200

        r = http.post("/v1/predict/batch", json={"assets": ["BTC-USD", "ETH-USD"]})
        assert r.status_code == 200, r.text
        errors = r.json()["errors"]
        assert [(e["asset"], e["error"]) for e in errors] == [("ETH-USD", "market_closed")]

        health = http.get("/v1/health").json()
        # A closed market is not a failure: the replica stays ready and lists no reason for it.
        assert health["ready"] is True and not any("ETH-USD" in x for x in health["reasons"])
        eth, btc = health["assets"]["ETH-USD"], health["assets"]["BTC-USD"]
        assert eth["session"]["state"] == "closed" and eth["session"]["next_open"] == NEXT_OPEN
        assert eth["reason"].startswith("market closed")
        assert btc["session"] == {"state": "open", "next_open": None, "next_close": None,
                                  "calendar": "24/7"}
        assert btc["features"] is True
        assert http.get("/v1/health", params={"probe": "ready"}).status_code == 200
