"""A real Ray head (``ray start --head``) for the ops tests, isolated from everything else.

A user's machine has one Ray per host; this shared test machine runs several test sessions, so
the head started here is fenced in:

* ``RAY_TMPDIR`` is a fresh short directory (Unix socket paths must stay under 108 bytes): the
  session, its sockets and ``ray_current_cluster`` live there, never in ``/tmp/ray``, so no other
  process discovers this head and this head's clients discover nothing else.
* ``HOME`` is a fresh directory holding ``.ray/auth_token``: ``ray start --head`` finds the token
  and turns token authentication on, as it does on a machine where any ``ray.init()`` ran.
* Every port is picked free; ``PATH`` lacks the venv's ``bin`` (the "venv not activated before
  ``ray start``" case of issue 11).
* It is stopped by process id: every process whose environment carries this ``RAY_TMPDIR``
  (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tickcast.net import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_BIN = VENV_BIN / "ray"


def quiet_port(host: str = "127.0.0.1", low: int = 20000, high: int = 30000) -> int:
    """A free TCP port below the kernel's ephemeral range, for a server that binds it later.

    ``free_port()`` draws from the ephemeral range that every other test session on this host
    draws from too; between picking a port and binding it, another session can pick the same
    one (seen: a Serve test of another session answered on the port chosen here).
    """
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def path_without_venv(path: str | None = None) -> str:
    """``PATH`` with this interpreter's ``bin`` removed (a shell where the venv is not active)."""
    parts = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    return os.pathsep.join(p for p in parts if p and Path(p).resolve() != VENV_BIN.resolve())


def _ray_env_pids(ray_tmpdir: str) -> list[int]:
    """Processes whose environment has ``RAY_TMPDIR=<ray_tmpdir>`` (this head's, and only its)."""
    needle = f"RAY_TMPDIR={ray_tmpdir}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


@dataclass
class RayHead:
    """A running isolated head: its directories, ports and the environment its clients use."""

    root: Path
    home: Path
    ray_tmpdir: Path
    gcs_port: int
    dashboard_port: int
    metrics_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    @property
    def service_discovery_file(self) -> Path:
        """Ray's Prometheus file-based service discovery (every node's metrics export port)."""
        return self.ray_tmpdir / "ray" / "prom_metrics_service_discovery.json"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a user's shell on this host: no ``RAY_AUTH_MODE``, no ``RAY_ADDRESS``."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "TICKCAST")) and k not in ("REDIS_URL", "VIRTUAL_ENV")}
        env.update(HOME=str(self.home), RAY_TMPDIR=str(self.ray_tmpdir),
                   PATH=path_without_venv(), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        env.update(extra)
        return env

    def stop(self) -> list[int]:
        """Stop every process of this head: TERM, then KILL after 10 s, repeated until none is
        left (a raylet may still be starting a worker when it is told to stop); returns the pids."""
        seen: set[int] = set()

        def signal_all(sig: int) -> list[int]:
            pids = _ray_env_pids(str(self.ray_tmpdir))
            seen.update(pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            return pids

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _ray_env_pids(str(self.ray_tmpdir)):
            time.sleep(0.3)
        deadline = time.monotonic() + 30.0
        while signal_all(signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return sorted(seen)


def start_head(*, token: bool = True, num_cpus: int = 2, timeout_s: float = 120.0,
               attempts: int = 2) -> RayHead:
    """``ray start --head --block`` with a dashboard (job server) and a metrics export port.

    On a loaded shared host ``ray start`` can give up waiting for its own GCS ("Deadline
    Exceeded"); a second attempt on fresh ports and directories follows.

    Raises
    ------
    RuntimeError
        No attempt came up (the message carries the last log's tail).
    """
    for attempt in range(attempts):
        try:
            return _start_head_once(token=token, num_cpus=num_cpus, timeout_s=timeout_s)
        except RuntimeError:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


def _start_head_once(*, token: bool, num_cpus: int, timeout_s: float) -> RayHead:
    root = Path(tempfile.mkdtemp(prefix="tcray-", dir="/tmp"))
    home, ray_tmpdir = root / "home", root / "t"
    home.mkdir()
    ray_tmpdir.mkdir()
    if token:
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    head = RayHead(root=root, home=home, ray_tmpdir=ray_tmpdir, gcs_port=free_port(),
                   dashboard_port=free_port(), metrics_port=free_port(), log=root / "ray-start.log")
    args = [str(RAY_BIN), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(head.gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(head.dashboard_port),
            "--metrics-export-port", str(head.metrics_port),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--num-cpus", str(num_cpus)]
    # The autoscaler's and the dashboard's own metrics ports are fixed numbers by default
    # (44217, 44227): another Ray on the host would already hold them.
    env = head.client_env(AUTOSCALER_METRIC_PORT=str(free_port()), DASHBOARD_METRIC_PORT=str(free_port()))
    with open(head.log, "wb") as logf:
        head.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     cwd=str(root), start_new_session=True)
    address_file = ray_tmpdir / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            break
        if address_file.exists():
            try:
                mode = httpx.get(f"{head.dashboard_url}/api/authentication_mode", timeout=2.0).json()
                if mode.get("authentication_mode"):
                    return head
            except (httpx.HTTPError, ValueError):
                pass
        time.sleep(0.5)
    tail = head.log.read_text(errors="replace")[-3000:]
    head.stop()
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"ray start --head did not come up within {timeout_s:.0f} s:\n{tail}")
