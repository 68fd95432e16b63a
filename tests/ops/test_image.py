"""The container image and compose file, run as a user runs them (``make image-test``; skipped
by ``make test``).

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
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

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


def _compose_command() -> list[str] | None:
    if ENGINE == "docker":
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0
        return ["docker", "compose"] if ok else None
    found = shutil.which("podman-compose")
    return [found] if found else None


def test_compose_runs_redis_ray_head_and_api(tmp_path: Path) -> None:
    """``compose.yaml``: three containers; the API node trains, joins the head and answers."""
    compose = _compose_command()
    if compose is None:
        pytest.skip(f"no compose for {ENGINE} (docker compose, or podman-compose)")
    root = Path(__file__).resolve().parents[2]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"services": {"api": {"environment": {
        k: v for k, v in SMALL_BOOTSTRAP.items()}}}}))
    ports = {"TICKCAST_PORT": free_port(), "TICKCAST_METRICS_PORT": free_port(),
             "RAY_DASHBOARD_PORT": free_port(), "RAY_METRICS_PORT": free_port()}
    token = secrets.token_hex(32)
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "RAY_AUTH_TOKEN": token,
           "TICKCAST_IMAGE": str(IMAGE)}
    project = f"tcimgtest{uuid.uuid4().hex[:6]}"
    cmd = [*compose, "-p", project, "-f", str(root / "compose.yaml"), "-f", str(small)]
    try:
        up = subprocess.run([*cmd, "up", "-d"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        url = f"http://127.0.0.1:{ports['TICKCAST_PORT']}"
        _wait_ready(url, 1500.0)
        for asset in ("BTC-USD", "ETH-USD"):
            r = httpx.post(f"{url}/v1/predict", json={"asset": asset}, timeout=10.0)
            assert r.status_code == 200, r.text
        dashboard = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
        assert httpx.get(f"{dashboard}/api/jobs/", timeout=10).status_code == 401  # token auth on
        serve = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10,
                          headers={"Authorization": f"Bearer {token}"}).json()
        assert serve["applications"]["tickcast"]["status"] == "RUNNING"
        # A proxy on the head and on the API node, whose replicas all run there.
        assert len(serve["proxies"]) == 2
        replicas = serve["applications"]["tickcast"]["deployments"]["tickcast-predictor"]["replicas"]
        head_ip = serve["controller_info"]["node_ip"]
        assert replicas and all(r["node_ip"] != head_ip for r in replicas)
        # The API node's metrics port carries tickcast's series (its actors and replicas).
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and "ray_tickcast_requests_total" not in text:
            time.sleep(3)
            text = httpx.get(f"http://127.0.0.1:{ports['TICKCAST_METRICS_PORT']}/metrics", timeout=10).text
        assert "ray_tickcast_requests_total" in text and "ray_tickcast_ticks_total" in text
    finally:
        down = subprocess.run([*cmd, "down", "-v"], env=env, capture_output=True, text=True, timeout=600)
        print(down.stdout[-2000:], down.stderr[-2000:])
        if ENGINE == "podman":  # podman-compose leaves the project's network behind
            _engine("network", "rm", "-f", f"{project}_default", check=False)
