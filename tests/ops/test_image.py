"""The container image, run as a user runs it (``make image-test``; skipped by ``make test``).

``docker run -p 8000:8000 IMAGE`` with no arguments must train (the registry volume is empty)
and then answer ``POST /v1/predict``. Checked here on the image ``make image`` built
(``TICKCAST_IMAGE``) with the engine that built it (``TICKCAST_CONTAINER_ENGINE``): the port
mapping, readiness, a prediction, the health check, the non-root user, and a clean stop.

The bootstrap is made small through the image's own configuration interface (environment):
half a simulated day of history, two Tune trials of at most 60 rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Iterator

import httpx
import pytest

from tickcast.net import free_port

IMAGE = os.environ.get("TICKCAST_IMAGE")
ENGINE = os.environ.get("TICKCAST_CONTAINER_ENGINE") or "docker"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not IMAGE, reason="run by `make image-test` (needs TICKCAST_IMAGE)")]

SMALL_BOOTSTRAP = {"TICKCAST_BOOTSTRAP_HISTORY_MINUTES": "720", "TICKCAST__TUNE__TRIALS": "2",
                   "TICKCAST__TUNE__MAX_ROUNDS": "60", "TICKCAST__TUNE__GRACE_ROUNDS": "20",
                   "TICKCAST__MODEL__WALK_FORWARD_FOLDS": "2"}


def _engine(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{ENGINE} {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


@pytest.fixture(scope="module")
def container() -> Iterator[dict[str, object]]:
    name = f"tickcast-image-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    envs = [a for k, v in SMALL_BOOTSTRAP.items() for a in ("-e", f"{k}={v}")]
    # --shm-size: Ray's object store lives in /dev/shm (64 MiB by default in a container).
    _engine("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--shm-size=1g", *envs, str(IMAGE))
    info: dict[str, object] = {"name": name, "url": f"http://127.0.0.1:{port}", "started": time.monotonic()}
    try:
        yield info
    finally:
        logs = _engine("logs", name, check=False).stdout + _engine("logs", name, check=False).stderr
        print(logs[-4000:])
        _engine("rm", "-f", "-t", "5", name, check=False, timeout=120)


def _wait_ready(url: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/v1/health", timeout=3.0)
            last = dict(r.json())
            if last.get("ready"):
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2.0)
    raise AssertionError(f"not ready after {timeout_s:.0f} s; last health {last}")


def test_default_command_trains_and_answers_predict(container: dict[str, object]) -> None:
    url = str(container["url"])
    health = _wait_ready(url, 1500.0)
    ready_after = time.monotonic() - float(container["started"])  # type: ignore[arg-type]
    print(f"ready after {ready_after:.0f} s (bootstrap training included)")
    r = httpx.post(f"{url}/v1/predict", json={"asset": "BTC-USD"}, timeout=10.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["asset"] == "BTC-USD" and body["slot"] == "blue"
    assert body["lo_price"] <= body["pred_price"] <= body["hi_price"]
    assert body["model_version"] and health["assets"]
    bad = httpx.post(f"{url}/v1/predict", json={"asset": "NOPE-USD"}, timeout=10.0)
    assert bad.status_code == 404
    logs = _engine("logs", str(container["name"])).stdout
    first = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("{")))
    assert set(first["trained"]["models"]) == {"BTC-USD", "ETH-USD"}


def test_healthcheck_user_and_clean_stop(container: dict[str, object]) -> None:
    name = str(container["name"])
    _wait_ready(str(container["url"]), 1500.0)
    if ENGINE == "podman":
        # podman runs HEALTHCHECKs from systemd timers; without systemd, run the image's own.
        assert _engine("healthcheck", "run", name, check=False).returncode == 0
    else:
        deadline = time.monotonic() + 120
        status = ""
        while time.monotonic() < deadline:
            status = _engine("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
            if status == "healthy":
                break
            time.sleep(5)
        assert status == "healthy"
    assert _engine("exec", name, "id", "-u").stdout.strip() == "10001"
    _engine("stop", "-t", "90", name, timeout=150)
    state = json.loads(_engine("inspect", name).stdout)[0]["State"]
    logs = _engine("logs", name).stderr + _engine("logs", name).stdout
    assert "[tickcast serve] stopped" in logs, logs[-3000:]
    assert state["ExitCode"] == 0, state
