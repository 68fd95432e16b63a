"""`tickcast serve --detach` / `tickcast down` end to end, and the autoscaling spike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serve_app import model_kit as mk
from tickcast.config import load_settings
from training.registry import ModelRegistry, registry_root

from .conftest import ServingWorld, deploy, free_port, make_world

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TICKCAST_ADMIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "tickcast.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_serve_detach_feeds_live_features_and_down_stops_everything(tmp_path: Path, trained_models) -> None:
    """Default feed: asset actors + the live simulator; ready means fresh features and a model."""
    data_dir = tmp_path / "data"
    settings = load_settings(overrides=[f"data_dir={data_dir}"])
    version = mk.register_model(ModelRegistry(registry_root(settings)), "BTC-USD", trained_models[0])
    port = free_port()
    common = ["--data-dir", str(data_dir), "--set", "assets=[BTC-USD]", "--set", "ingest.ray_address=local",
              "--set", "serve.drain_period_s=1"]
    out = _cli("serve", *common, "--detach", "--port", str(port), "--timeout", "240", timeout=300)
    started = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert started["status"] == "ready" and started["url"] == f"http://127.0.0.1:{port}"
        url = started["url"]
        body = httpx.post(f"{url}/v1/predict", json={"asset": "BTC-USD"}, timeout=10).json()
        assert body["model_version"] == version and body["feature_age_s"] < 180
        # No admin token configured: admin is disabled, and says so.
        r = httpx.post(f"{url}/v1/admin/traffic", json={"shadow": True}, timeout=10)
        assert r.status_code == 403 and "disabled" in r.json()["detail"]
        again = _cli("serve", *common, "--detach", "--port", str(port), timeout=60)
        assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "already_running"
    finally:
        down = _cli("down", "--data-dir", str(data_dir), timeout=180)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout.strip().splitlines()[-1])["status"] == "stopped"
    pid = started.get("pid")
    if pid:
        assert not _alive(pid)
        group = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True).stdout.split()
        assert str(pid) not in group  # nothing it started is left (Ray, HAProxy, agents)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
    assert not (data_dir / "serve" / "state.json").exists()
    redis_dir = str((data_dir / "redis").resolve())
    for proc in Path("/proc").iterdir():  # the embedded Redis it started is gone too
        try:
            assert os.readlink(proc / "cwd") != redis_dir, f"process {proc.name} still runs in {redis_dir}"
        except (OSError, ValueError):
            continue
    again = _cli("down", "--data-dir", str(data_dir), timeout=60)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip().startswith(f"error: no tickcast server runs for data dir {data_dir}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_step(data_dir: Path, steps: tuple[str, ...], parent: subprocess.Popen[str],
                   timeout_s: float) -> dict:
    """The server's state once it is at one of ``steps`` (it writes its state first thing)."""
    path = data_dir / "serve" / "state.json"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("step") in steps:
            return state
        assert parent.poll() is None, parent.communicate()
        assert time.monotonic() < deadline, f"the server never reached {steps}: {state}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["down", "sigterm_to_server", "sigint_to_serve_detach"])
def test_a_server_stops_cleanly_while_it_starts(how: str, tmp_path: Path, trained_models,
                                                process_mark) -> None:
    """Stopped while it creates its market shards by `tickcast down` or by Ctrl-C on
    `tickcast serve --detach`; by SIGTERM to the server process once Serve's HAProxy runs,
    while the app deploys. The start goes no further, and nothing it started remains."""
    data_dir = tmp_path / "data"
    settings = load_settings(overrides=[f"data_dir={data_dir}"])
    mk.register_model(ModelRegistry(registry_root(settings)), "BTC-USD", trained_models[0])
    process_mark.watch(tmp_path)  # its embedded Redis runs in data_dir/redis
    env = {k: v for k, v in os.environ.items()
           if k not in ("TICKCAST_ADMIN_TOKEN", "REDIS_URL", "RAY_ADDRESS")}
    argv = [sys.executable, "-m", "tickcast.cli", "serve", "--detach", "--data-dir", str(data_dir),
            "--port", str(free_port()), "--set", "assets=[BTC-USD,ETH-USD]",
            "--set", "ingest.ray_address=local", "--timeout", "900"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=process_mark.env({**env, "PYTHONPATH": str(ROOT)}), cwd=ROOT)
    try:
        state = _wait_for_step(data_dir, ("feed", "closed_loop"), parent, timeout_s=600)
        server = int(state["pid"])
        if how == "sigterm_to_server":
            _wait_for_step(data_dir, ("app",), parent, timeout_s=600)
            deadline = time.monotonic() + 120
            while "haproxy" not in " ".join(argv for _, argv in process_mark.processes()):
                assert time.monotonic() < deadline, process_mark.processes()
                time.sleep(0.2)
        running = " ".join(argv for _, argv in process_mark.processes())
        assert "redis-server" in running and "raylet" in running, running  # the mark sees them
        # `down` for a data dir without a server names this one.
        other = _cli("down", "--data-dir", str(tmp_path / "elsewhere"), timeout=60)
        assert other.returncode == 2 and f"pid {server} for data dir {data_dir}" in other.stderr, other.stderr
        if how == "down":
            down = _cli("down", "--data-dir", str(data_dir), timeout=300)
            assert down.returncode == 0, down.stderr
            assert json.loads(down.stdout.strip().splitlines()[-1])["status"] == "stopped"
        elif how == "sigterm_to_server":
            os.kill(server, signal.SIGTERM)
        else:
            parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
    last = err.strip().splitlines()[-1]
    if how == "sigint_to_serve_detach":
        assert parent.returncode == 130, err[-3000:]
        assert last == "interrupted by SIGINT; stopped what the command had started"
    else:
        assert parent.returncode == 2, err[-3000:]
        assert last.startswith("error: the server stopped before it was ready: interrupted by "
                               "SIGTERM; stopped what the command had started (exit code 143"), last
    assert not _alive(server)
    log = (data_dir / "serve" / "serve.log").read_text()
    assert "serving at" not in log and "[tickcast serve] stopped" in log, log[-3000:]
    assert not (data_dir / "serve" / "state.json").exists()
    assert process_mark.remaining() == []


@pytest.fixture
def spike_app(ray_session: None, redis_url: str, real_bars, trained_models, tmp_path: Path) -> Iterator[ServingWorld]:
    world = make_world(tmp_path, redis_url, real_bars, trained_models, overrides=[
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=2", "serve.autoscaling.upscale_delay_s=1",
        "serve.autoscaling.downscale_delay_s=3", "serve.autoscaling.look_back_period_s=2",
        "serve.autoscaling.metrics_interval_s=0.5",
        # Half the default busy target: under the full suite's load the client and HAProxy
        # share the two cores, and the burst may keep the replica's loop only ~70% busy.
        "serve.autoscaling.target_busy=0.5",
    ])
    yield from deploy(world)


@pytest.mark.slow
@pytest.mark.ray
def test_spike_adds_replicas_and_removes_them_after(spike_app: ServingWorld) -> None:
    from bench.serve import ClosedLoopClient, _running_replicas, http_post

    port = spike_app.settings.serve.port
    requests = [http_post("127.0.0.1", port, "/v1/predict", b'{"asset":"BTC-USD"}')]
    client = ClosedLoopClient("127.0.0.1", port, requests)
    samples: list[tuple[str, int]] = []
    phase = ["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((phase[0], _running_replicas()))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Each connection paced at 200 req/s: 400 req/s, then 10x (4,000 req/s, more than one
        # replica on this machine serves), then 400 again.
        base = client.run(2, 3.0, warmup_s=0.5, per_connection_rps=200)
        phase[0] = "burst"
        burst = client.run(20, 12.0, warmup_s=0.0, per_connection_rps=200)
        phase[0] = "after"
        deadline = time.monotonic() + 30
        after = client.run(2, 4.0, warmup_s=0.0, per_connection_rps=200)
        while time.monotonic() < deadline and _running_replicas() != 1:
            time.sleep(0.5)
        phase[0] = "end"
        time.sleep(0.5)
    finally:
        stop.set()
        sampler.join()
    during = [n for p, n in samples if p == "burst"]
    assert max(n for p, n in samples if p == "base") == 1
    assert max(during) == 2, samples
    assert [n for p, n in samples if p == "end"][-1] == 1, samples
    assert base.errors == burst.errors == after.errors == 0, (base.statuses, burst.statuses, after.statuses)
    print(f"spike: burst {burst.rps:.0f} req/s p99 {burst.pct(99):.1f} ms; base p99 {base.pct(99):.1f} ms; "
          f"keep-alive connections closed by HAProxy reloads: {burst.reconnects + after.reconnects}")
