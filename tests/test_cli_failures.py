"""Failing cleanly (issue 13): one ``error:`` line with exit 2 for each failure the environment
can cause, and nothing the command started outlives it -- after an error, SIGINT or SIGTERM.

Each command runs as a user runs it (a subprocess), tagged by a :class:`ProcessMark` that every
process it starts inherits (embedded redis-server, Ray's gcs_server, raylet, agents and
workers), so that what it left behind is found by that tag, never by process name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickcast.net import free_port

ROOT = Path(__file__).resolve().parent.parent
INGEST = ("ingest", "--source", "sim", "--assets", "BTC-USD", "--minutes", "1")
COMMANDS = ("ingest", "serve")


def clean_env() -> dict[str, str]:
    """This environment without anything that points tickcast at a Redis, Ray or config."""
    drop = ("REDIS_URL", "RAY_ADDRESS", "TICKCAST_DATA_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TICKCAST__")}


@pytest.fixture(scope="module")
def registry(shared_data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry with a BTC-USD champion (`tickcast serve` refuses to start without any),
    trained quickly on real bars; outside every data dir the tests make unwritable."""
    from serve_app import model_kit as mk
    from tickcast.config import load_settings
    from training.registry import ModelRegistry

    root = tmp_path_factory.mktemp("registry")
    settings = load_settings(overrides=[f"data_dir={root}"])
    model = mk.train_quick_model(settings, mk.venue_bars(shared_data_file, limit=3000), rounds=10)
    mk.register_model(ModelRegistry(root), "BTC-USD", model)
    return root


@pytest.fixture
def command(registry: Path):
    """``tickcast ingest`` (one simulated minute) or ``tickcast serve`` (one asset with a model,
    a free port), as argv."""
    def argv(name: str, data_dir: Path, *extra: str) -> list[str]:
        args = list(INGEST) if name == "ingest" else [
            "serve", "--set", "assets=[BTC-USD]", "--set", f"model.registry_dir={registry}",
            "--port", str(free_port())]
        return [sys.executable, "-m", "tickcast.cli", *args, "--data-dir", str(data_dir), *extra]

    return argv


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 2 and one ``error:`` line (its last), no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


def redis_was_started(data_dir: Path) -> None:
    """The command did start its embedded Redis in ``data_dir`` (it wrote the pid file)."""
    assert (data_dir / "redis" / "pid").exists(), "the command never started its embedded Redis"


# -- failures before anything starts -------------------------------------------------------------

@pytest.mark.parametrize("name", COMMANDS)
def test_redis_unreachable(name: str, tmp_path: Path, process_mark, command) -> None:
    process_mark.watch(tmp_path)
    port = free_port()
    env = process_mark.env({**clean_env(), "REDIS_URL": f"redis://:secret@127.0.0.1:{port}/0",
                            "TICKCAST__INGEST__RAY_ADDRESS": "local"})
    line = error_line(run(command(name, tmp_path / "data"), env, timeout=120))
    assert f"Redis at redis://:***@127.0.0.1:{port}/0" in line and "not reachable" in line
    assert "Connection refused" in line and "unset REDIS_URL" in line and "secret" not in line
    assert process_mark.remaining() == []


@pytest.mark.parametrize("name, flag, option", [
    ("serve", "--port", "--port"),  # serve.port, before a private Ray would start Serve on it
    ("ingest", "redis.embedded_port", "redis.embedded_port=0"),
])
def test_port_in_use(name: str, flag: str, option: str, tmp_path: Path, process_mark, command) -> None:
    process_mark.watch(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = command(name, tmp_path / "data")
        argv += ["--port", str(port)] if flag == "--port" else ["--set", f"{flag}={port}"]
        env = process_mark.env({**clean_env(), "TICKCAST__INGEST__RAY_ADDRESS": "local"})
        line = error_line(run(argv, env, timeout=120))
    # Named: the port, the process holding it (this test), and how to choose another.
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in line, line
    assert option in line
    assert process_mark.remaining() == []


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nothing may be created in: mode 0555, and immutable when the tests run as
    root (whom permission bits do not stop)."""
    path = tmp_path / "locked"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if _writable(path):
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("running as root on a file system without immutable directories")
        immutable = True
    assert not _writable(path)
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def _writable(path: Path) -> bool:
    try:
        (path / "probe").touch()
    except OSError:
        return False
    (path / "probe").unlink()
    return True


@pytest.mark.parametrize("name", COMMANDS)
def test_data_dir_not_writable(name: str, unwritable_dir: Path, process_mark, command) -> None:
    process_mark.watch(unwritable_dir)
    env = process_mark.env({**clean_env(), "TICKCAST__INGEST__RAY_ADDRESS": "local"})
    data_dir = unwritable_dir / "data" if name == "ingest" else unwritable_dir  # absent, or there
    line = error_line(run(command(name, data_dir), env, timeout=120))
    assert f"data dir {data_dir} is not writable" in line and "--data-dir" in line, line
    assert process_mark.remaining() == []


def test_down_without_a_server_names_the_data_dir(tmp_path: Path) -> None:
    proc = run([sys.executable, "-m", "tickcast.cli", "down", "--data-dir", str(tmp_path)], clean_env(),
               timeout=60)
    line = error_line(proc)
    assert f"no tickcast server runs for data dir {tmp_path}" in line
    assert proc.stdout == ""


# -- Ray fails after the embedded Redis started -----------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("name", COMMANDS)
def test_ray_unreachable_stops_the_redis_it_started(name: str, tmp_path: Path, process_mark,
                                                    command) -> None:
    process_mark.watch(tmp_path)
    port = free_port()
    env = process_mark.env({**clean_env(), "RAY_ADDRESS": f"127.0.0.1:{port}"})
    data_dir = tmp_path / "data"
    line = error_line(run(command(name, data_dir, "--set", "ingest.ray_connect_timeout_s=1"), env))
    assert f"the Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS) is not reachable" in line, line
    assert "ingest.ray_address=local" in line
    redis_was_started(data_dir)
    assert process_mark.remaining() == []


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[Path]:
    """A Ray head with token authentication started by ``ray start --head``, isolated.

    Its RAY_TMPDIR (where it records its address, as ``ray start`` does) and token file are
    private to this fixture; it never writes /tmp/ray/ray_current_cluster, and its processes are
    stopped by their process group at the end. Yields the RAY_TMPDIR.
    """
    ray_exe = Path(sys.executable).with_name("ray")
    global_record = Path("/tmp/ray/ray_current_cluster")
    before = global_record.stat().st_mtime_ns if global_record.exists() else None
    tmp = Path(tempfile.mkdtemp(prefix="tc-tok-", dir="/tmp"))  # short: Ray's socket paths
    token = tmp / "token"
    token.write_text(os.urandom(16).hex())
    env = {**clean_env(), "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    # A session of its own: the head's processes form a group that is not pytest's.
    started = subprocess.run(
        [str(ray_exe), "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    groups = {os.getpgid(pid) for pid in _pids_mentioning(str(tmp))} - {os.getpgrp()}
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert (tmp / "ray" / "ray_current_cluster").exists()
        assert (global_record.stat().st_mtime_ns if global_record.exists() else None) == before
        yield tmp
    finally:
        for pgid in groups:
            _stop_group(pgid)
        shutil.rmtree(tmp, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    os.killpg(pgid, signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("name, token", [("ingest", None), ("serve", "0" * 32)])
def test_ray_refusing_authentication(name: str, token: str | None, token_cluster: Path,
                                     tmp_path: Path, process_mark, command) -> None:
    """The cluster `ray start` recorded refuses this shell: no token (ingest), a wrong one
    (serve). Ray retries for ~20 s by default; RAY_gcs_server_port_wait_time_s shortens that
    to 3 attempts here, which changes nothing in what is refused or reported."""
    process_mark.watch(tmp_path)
    env = {**clean_env(), "RAY_TMPDIR": str(token_cluster), "RAY_gcs_server_port_wait_time_s": "3"}
    if token is not None:
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    data_dir = tmp_path / "data"
    line = error_line(run(command(name, data_dir), process_mark.env(env)))
    assert "refused authentication" in line and "RAY_AUTH_MODE=token" in line, line
    assert "RAY_AUTH_TOKEN" in line and "recorded by `ray start`" in line
    redis_was_started(data_dir)
    assert process_mark.remaining() == []


# -- signals once Redis and a private Ray run ------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_ingest_stops_everything(sig: signal.Signals, tmp_path: Path, process_mark) -> None:
    process_mark.watch(tmp_path)
    data_dir = tmp_path / "data"
    err = tmp_path / "stderr"
    env = process_mark.env({**clean_env(), "TICKCAST__INGEST__RAY_ADDRESS": "local"})
    # Ten paced hours of simulated ticks: still feeding when the signal comes.
    argv = [sys.executable, "-m", "tickcast.cli", "ingest", "--source", "sim", "--assets", "BTC-USD",
            "--minutes", "600", "--speed", "60", "--data-dir", str(data_dir),
            "--set", "ingest.progress_every_s=1"]
    with open(err, "w") as errf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while "[ingest" not in err.read_text() or "sent " not in err.read_text():
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "ingest never started feeding"
            time.sleep(0.5)
        running = " ".join(argv for _, argv in process_mark.processes())
        assert "redis-server" in running and "raylet" in running, running  # the mark sees them
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + sig, err.read_text()[-3000:]
    assert err.read_text().strip().splitlines()[-1] == (
        f"interrupted by {sig.name}; stopped what the command had started")
    assert process_mark.remaining() == []
