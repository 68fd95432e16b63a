"""Shared fixtures: one real Redis server and one local Ray instance for the whole session.

Unit tests of pure logic use neither. Integration tests ask for ``redis_url`` and/or
``ray_session``; both are real (an embedded ``redis-server`` or ``REDIS_URL``; a local Ray).
"""

from __future__ import annotations

import os
import time
import uuid
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


class ProcessMark:
    """Tags every process a command starts, to find exactly those afterwards.

    The command runs with ``TICKCAST_TEST_MARK=<uuid>`` in its environment, which every process
    it starts inherits: Ray's gcs_server, raylet, agents and workers, Serve's HAProxy. Other
    agents' Ray and Redis on the machine never carry this uuid, so nothing is matched by name.
    redis-server overwrites its environment with its process title, so an embedded Redis is
    found by its working directory instead: :meth:`watch` the data dir.
    """

    VAR = "TICKCAST_TEST_MARK"

    def __init__(self) -> None:
        self.value = uuid.uuid4().hex
        self._needle = f"{self.VAR}={self.value}".encode()
        self._dirs: list[Path] = []

    def watch(self, directory: Path) -> None:
        """Also count processes whose working directory is in ``directory``."""
        self._dirs.append(Path(directory).resolve())

    def _marked(self, entry: Path) -> bool:
        if self._needle in (entry / "environ").read_bytes().split(b"\0"):
            return True
        if not self._dirs:
            return False
        cwd = Path(os.readlink(entry / "cwd"))
        return any(cwd == d or d in cwd.parents for d in self._dirs)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), self.VAR: self.value}

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of the running (not zombie) processes carrying the mark."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not self._marked(entry):
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append((int(entry.name), argv.strip()[:160]))
        return found

    def remaining(self, grace_s: float = 10.0) -> list[tuple[int, str]]:
        """The marked processes still running after up to ``grace_s`` (processes in exit)."""
        deadline = time.monotonic() + grace_s
        while True:
            left = self.processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


    def kill(self) -> None:
        """SIGKILL whatever carries the mark (a failed test's leftovers)."""
        import signal

        for pid, _ in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def process_mark() -> Iterator[ProcessMark]:
    """A fresh :class:`ProcessMark`; whatever still carries it at teardown is killed."""
    mark = ProcessMark()
    yield mark
    mark.kill()
