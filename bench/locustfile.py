"""Load-test a running tickcast prediction API with Locust.

``locust -f bench/locustfile.py --host http://127.0.0.1:8000`` (web UI on :8089), or headless::

    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 1m

Environment:

``TICKCAST_ASSETS``
    Comma-separated assets to ask for (default: every asset ``GET /v1/models`` lists).
``TICKCAST_BATCH_SIZE``
    Assets per batch request (default 100; 0 disables the batch task).

About one task in a hundred also reads ``/v1/models`` and ``/metrics`` as a dashboard would;
admin changes are never made by this file.

Each simulated client keeps its own sticky ``X-Request-Key`` (a stable A/B group, as a real
client would) and sends single-asset predictions (weight 10) and batches (weight 1). A response
other than 200 counts as a failure, except 503 on an asset whose features are stale, which
Locust reports under its own name so it can be told apart from real failures.

Locust's Python clients cost far more CPU per request than the server does: to measure this
server's own capacity on one machine, use ``python -m bench.serve`` (a lean closed-loop client);
use this file against a deployment on other machines.
"""

from __future__ import annotations

import json
import os
import random
import uuid

from locust import HttpUser, between, events, task

_ASSETS: list[str] = [a for a in os.environ.get("TICKCAST_ASSETS", "").split(",") if a]
BATCH_SIZE = int(os.environ.get("TICKCAST_BATCH_SIZE", "100"))


@events.test_start.add_listener
def _discover_assets(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Ask the server which assets it serves when none were given."""
    if _ASSETS or environment.host is None:
        return
    import urllib.request

    with urllib.request.urlopen(f"{environment.host.rstrip('/')}/v1/models", timeout=10) as resp:
        _ASSETS.extend(sorted(json.loads(resp.read())["assets"]))
    if not _ASSETS:
        raise RuntimeError("the server lists no asset with a model: nothing to load-test")


class PredictionClient(HttpUser):
    """One API client with a stable A/B key."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.key = uuid.uuid4().hex
        self.headers = {"X-Request-Key": self.key, "Content-Type": "application/json"}

    @task(10)
    def predict(self) -> None:
        asset = random.choice(_ASSETS)
        with self.client.post("/v1/predict", data=json.dumps({"asset": asset}), headers=self.headers,
                              name="/v1/predict", catch_response=True) as resp:
            if resp.status_code == 503 and "stale" in resp.text:
                resp.failure("503 stale features")
            elif resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(1)
    def predict_batch(self) -> None:
        if BATCH_SIZE <= 0:
            return
        assets = [random.choice(_ASSETS) for _ in range(BATCH_SIZE)]
        body = json.dumps({"assets": assets, "format": "columns"})
        with self.client.post("/v1/predict/batch", data=body, headers=self.headers,
                              name=f"/v1/predict/batch x{BATCH_SIZE}", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(1)
    def operator_reads(self) -> None:
        if random.random() > 0.08:  # ~1 % of all tasks (this task has weight 1 of 12)
            return
        self.client.get("/v1/models", name="/v1/models")
        self.client.get("/metrics", name="/metrics")
