"""The Ray-native path on a real ``ray start --head`` cluster, as a user runs it.

One isolated head for the module (see :mod:`tests.ops.ray_head`): token authentication on (a
token in ``~/.ray/auth_token``, as on any machine where ``ray.init()`` ran), the venv *not*
activated when Ray started, a dashboard with its job server and a metrics export port.

1. ``python -m training.retrain`` submitted with ``JobSubmissionClient`` trains a champion into
   the registry. The client and the job find the cluster's token without ``RAY_AUTH_MODE``; the
   job finds the venv through the documented runtime env (``PATH``), not through activation.
2. ``tickcast serve --detach`` attaches to the token cluster with no extra step and serves that
   champion; the dashboard's Serve API lists the app.
3. A real Prometheus scrapes the cluster's metrics export port (Ray's own service discovery
   file) and sees the ``tickcast_*`` series; the SLA alert rules evaluate on them without error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pandas as pd
import pytest
import yaml

from tests.ops.prometheus import prometheus_binary, start_prometheus
from tests.ops.ray_head import VENV_BIN, RayHead, path_without_venv, quiet_port, start_head
from tickcast.net import free_port
from tickcast.ray_runtime import WORKING_DIR_EXCLUDES
from tickcast.storage.bar_store import BarStore
from training.registry import ModelRegistry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ASSET = "BTC-USD"
SMALL = ["--set", "tune.max_rounds=30", "--set", "tune.grace_rounds=10",
         "--set", "tune.report_every=10", "--set", "model.walk_forward_folds=2"]
# What the README tells a user whose cluster was started without the venv on PATH.
JOB_RUNTIME_ENV = {"working_dir": str(ROOT), "excludes": list(WORKING_DIR_EXCLUDES),
                   "env_vars": {"PATH": f"{VENV_BIN}:${{PATH}}"}}


def _last_json(text: str) -> dict[str, Any]:
    return dict(json.loads([ln for ln in text.strip().splitlines() if ln.strip()][-1]))


def _synthetic_bars(n: int, seed: int) -> pd.DataFrame:
    from tests.training.conftest import make_synthetic_bars

    return make_synthetic_bars(n, seed=seed)


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    h = start_head(token=True)
    try:
        yield h
    finally:
        h.stop()
        leftover = [p for p in os.listdir("/proc") if p.isdigit()
                    and f"RAY_TMPDIR={h.ray_tmpdir}".encode() in _environ(int(p))]
        global_file = Path("/tmp/ray/ray_current_cluster")
        shutil.rmtree(h.root, ignore_errors=True)
        assert not leftover, f"processes of the test head survived: {leftover}"
        # The head was never registered where other sessions' Ray would discover it.
        assert not (global_file.exists() and f":{h.gcs_port}" in global_file.read_text())


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _submit(head: RayHead, entrypoint: list[str], runtime_env: dict[str, Any],
            timeout_s: float = 900.0) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "tests.ops.submit_job", "--address", head.dashboard_url,
                          "--runtime-env-json", json.dumps(runtime_env), "--timeout", str(timeout_s),
                          "--", *entrypoint],
                         env=head.client_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout_s + 120)
    assert out.returncode == 0, out.stderr[-3000:]
    return _last_json(out.stdout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cluster_data")
    BarStore(d / "bars", fsync=False).upsert(ASSET, "consensus", _synthetic_bars(4 * 1440, seed=11))
    return d


@pytest.fixture(scope="module")
def retrain_job(head: RayHead, data_dir: Path) -> dict[str, Any]:
    """``python -m training.retrain`` as a Ray job through JobSubmissionClient."""
    return _submit(head, ["python", "-m", "training.retrain", "--asset", ASSET,
                          "--data-dir", str(data_dir), "--train-end", "2024-01-04",
                          "--trials", "2", *SMALL], JOB_RUNTIME_ENV)


def test_the_head_runs_token_auth_with_the_venv_not_on_path(head: RayHead) -> None:
    mode = httpx.get(f"{head.dashboard_url}/api/authentication_mode", timeout=5).json()
    assert mode == {"authentication_mode": "token"}
    # Without the token, the job server refuses: authentication is really on.
    r = httpx.get(f"{head.dashboard_url}/api/jobs/", timeout=5)
    assert r.status_code == 401
    assert str(VENV_BIN) not in head.client_env()["PATH"].split(os.pathsep)
    assert (head.ray_tmpdir / "ray" / "ray_current_cluster").exists()


def test_plain_python_entrypoint_fails_without_the_venv_on_path(head: RayHead, data_dir: Path) -> None:
    """The failure issue 11 reports, so that the fix below is known to be needed here."""
    plain = shutil.which("python", path=path_without_venv())
    if plain is not None:
        probe = subprocess.run([plain, "-c", "import pandas, ray"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            pytest.skip(f"{plain} (first python on PATH outside the venv) has the dependencies")
    res = _submit(head, ["python", "-c", "import pandas, ray"],
                  {"working_dir": str(ROOT), "excludes": list(WORKING_DIR_EXCLUDES)}, timeout_s=300)
    assert res["status"] == "FAILED"
    assert "No module named" in res["logs"] or "python: not found" in res["logs"], res["logs"][-2000:]


def test_retrain_job_registers_a_champion(retrain_job: dict[str, Any], data_dir: Path) -> None:
    assert retrain_job["status"] == "SUCCEEDED", retrain_job["logs"][-4000:]
    assert retrain_job["auth"].startswith("ray auth token (discovered, token from ~/.ray/auth_token")
    summary = _last_json(retrain_job["logs"])
    assert summary["alias"] == "champion" and summary["trials"] == 2
    registry = ModelRegistry(data_dir / "registry")
    assert registry.resolve(ASSET, "champion") == summary["version"]
    card = registry.card(ASSET, summary["version"])
    assert card["training"]["end_exclusive_ns"] == int(pd.Timestamp("2024-01-04", tz="UTC").value)
    assert card["metrics"]["dm_p"] < 0.05  # the synthetic AR(1) signal was learned


@pytest.mark.skipif(prometheus_binary() is None, reason="prometheus not installed (`make tools`)")
def test_tickcast_serve_attaches_and_prometheus_sees_tickcast_series(
        head: RayHead, retrain_job: dict[str, Any], data_dir: Path, tmp_path: Path) -> None:
    assert retrain_job["status"] == "SUCCEEDED"
    env = head.client_env()
    assert "RAY_AUTH_MODE" not in env and "RAY_ADDRESS" not in env
    port = quiet_port()
    serve_cmd = [sys.executable, "-m", "tickcast.cli", "serve", "--detach", "--data-dir", str(data_dir),
                 "--port", str(port), "--timeout", "400", "--set", f"assets=[{ASSET}]"]
    prom = None
    try:
        out = subprocess.run(serve_cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
        log = (data_dir / "serve" / "serve.log").read_text(errors="replace")[-4000:]
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + log
        status = _last_json(out.stdout)
        assert status["status"] == "ready", status
        assert "connected" in log and "InvalidAuthToken" not in log

        url = status["url"]
        with httpx.Client(timeout=10.0) as client:
            answers = [client.post(f"{url}/v1/predict", json={"asset": ASSET}) for _ in range(50)]
            assert [r.status_code for r in answers] == [200] * 50
            # This cluster's app answered: it serves the job's champion.
            assert {r.json()["model_version"] for r in answers} == {_last_json(retrain_job["logs"])["version"]}
            # The dashboard's Serve page reads this API: the app runs on the cluster.
            apps = client.get(f"{head.dashboard_url}/api/serve/applications/",
                              headers={"Authorization": f"Bearer {head.token}"}).json()
        assert apps["applications"]["tickcast"]["status"] == "RUNNING"

        sd_file = head.ray_tmpdir / "ray" / "session_latest" / "prom_metrics_service_discovery.json"
        deadline = time.monotonic() + 60
        while not sd_file.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        # Every node's metrics export port (at the node's address), plus the autoscaler's and
        # the dashboard's own.
        targets = json.loads(sd_file.read_text())[0]["targets"]
        assert any(t.endswith(f":{head.metrics_port}") for t in targets), targets
        prom = start_prometheus(tmp_path / "prom", [{
            "job_name": "ray",
            "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}],
        }], rule_files=[ROOT / "configs" / "alerts.yml"])
        requests = prom.wait_for('sum by (slot) (ray_tickcast_requests_total{code="200"})', 120)
        assert requests and float(requests[0]["value"][1]) >= 50, requests
        assert {s["metric"]["slot"] for s in requests} == {"blue"}
        assert prom.wait_for('ray_tickcast_request_latency_ms_bucket{le="+Inf"}', 30)
        ticks = prom.wait_for(f'sum(ray_tickcast_ticks_total{{asset="{ASSET}",status="accepted"}}) > 0', 60)
        assert ticks, "the market shard's tick counter never reached Prometheus"
        assert prom.wait_for(f'ray_tickcast_provider_agreement{{asset="{ASSET}"}}', 30)
        assert any(t["health"] == "up" and f":{head.metrics_port}/" in t["scrapeUrl"]
                   for t in prom.targets())
        # Every alert rule evaluates on the real series (a typo'd function or label set would
        # leave health "err"); the rules run every scrape interval.
        time.sleep(3.0)
        rules = prom.rules()
        assert len(rules) >= 8
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        if prom is not None:
            prom.stop()
        subprocess.run([sys.executable, "-m", "tickcast.cli", "down", "--data-dir", str(data_dir)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)


def _serve_status(head: RayHead) -> dict[str, Any]:
    """The dashboard's Serve API (what its Serve page shows)."""
    r = httpx.get(f"{head.dashboard_url}/api/serve/applications/", timeout=10,
                  headers={"Authorization": f"Bearer {head.token}"})
    r.raise_for_status()
    return dict(r.json())


def _wait_serve_gone(head: RayHead, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _serve_status(head)
        if not status["controller_info"].get("actor_id") and not status["applications"] \
                and not status.get("proxies"):
            return True
        time.sleep(1.0)
    return False


def test_serve_config_deploys_with_serve_deploy(head: RayHead, retrain_job: dict[str, Any],
                                                data_dir: Path, tmp_path: Path) -> None:
    """``serve deploy configs/serve_config.yaml`` as a Ray user runs it (Ray's CLI with
    ``RAY_AUTH_MODE=token``, as the README says): the builder starts the market shards on the
    ingress streams, a feed handler writes ticks, and the API serves the registry's champion
    through HAProxy."""
    from serve_app.feed import LiveSimulatorFeed
    from tickcast.config import load_settings
    from tickcast.redis_server import EmbeddedRedis

    assert retrain_job["status"] == "SUCCEEDED"
    env = head.client_env(RAY_AUTH_MODE="token")
    serve_cli = str(VENV_BIN / "serve")
    # A Serve instance left by the previous test keeps its HTTP options: start from none.
    # `serve shutdown` returns at once and deletes asynchronously: wait until Serve is gone.
    subprocess.run([serve_cli, "shutdown", "-y", "-a", head.dashboard_url], env=env, cwd=ROOT,
                   capture_output=True, text=True, timeout=180, check=True)
    assert _wait_serve_gone(head, 180), "Serve did not shut down"
    redis = EmbeddedRedis.start(tmp_path / "redis")
    feed = None
    try:
        config = yaml.safe_load((ROOT / "configs" / "serve_config.yaml").read_text())
        port = quiet_port()
        config["http_options"] = {"host": "127.0.0.1", "port": port}
        # This host runs other Serve instances: HAProxy's stats/metrics ports must be free ones.
        config["controller_options"]["runtime_env"]["env_vars"].update(
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
        app = config["applications"][0]
        # The cluster's environment, given per app; PYTHONPATH puts this checkout before the
        # venv's install (on a real cluster the image or the venv has the code).
        app["runtime_env"] = {"env_vars": {"REDIS_URL": redis.url, "TICKCAST_DATA_DIR": str(data_dir),
                                           "PYTHONPATH": str(ROOT)}}
        app["args"]["overrides"] = [f"assets=[{ASSET}]"]
        cfg_path = tmp_path / "serve_config.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        out = subprocess.run([serve_cli, "deploy", str(cfg_path), "-a", head.dashboard_url], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

        # A feed handler: the simulator at wall-clock time, writing ticks:<ASSET> of that Redis.
        settings = load_settings(overrides=[f"data_dir={data_dir}", f"redis.url={redis.url}",
                                            f"assets=[{ASSET}]"])
        feed = LiveSimulatorFeed(settings, redis.url, (ASSET,))
        feed.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400
        health: dict[str, Any] = {}
        while time.monotonic() < deadline and not health.get("ready"):
            try:
                health = httpx.get(f"{url}/v1/health", timeout=3).json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2.0)
        assert health.get("ready"), (health, feed.error, {
            name: (app["status"], app.get("message", "")[-1500:])
            for name, app in _serve_status(head)["applications"].items()})
        r = httpx.post(f"{url}/v1/predict", json={"asset": ASSET}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == _last_json(retrain_job["logs"])["version"]
        status = _serve_status(head)
        assert status["applications"]["tickcast"]["status"] == "RUNNING"
        assert status["applications"]["tickcast"]["deployed_app_config"]["import_path"] == \
            "tickcast.serve_deploy:app_builder"
        assert not feed.error
    finally:
        if feed is not None:
            feed.stop()
        subprocess.run([serve_cli, "shutdown", "-y", "-a", head.dashboard_url], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
        redis.stop()
