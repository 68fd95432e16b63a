"""Process discovery and preflight checks (tickcast/processes.py, preflight.py, server_state.py)
against real processes, sockets and files of this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickcast.errors import NotWritable, PortInUse
from tickcast.preflight import port_free, require_free_port, writable_dir
from tickcast.processes import (
    alive,
    find_servers,
    listeners,
    server_data_dir,
    started_at,
    stop_group,
    terminate,
)
from tickcast.server_state import Phase, ServerState, is_live, read_state

SLEEP = "import time; time.sleep(120)"


@pytest.fixture
def spawn() -> Iterator:
    """Start processes for a test; each is killed at its end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(argv, **kw))  # type: ignore[call-overload]
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_tickcast_serve_process_and_its_data_dir_are_found(spawn, tmp_path: Path) -> None:
    # Real processes whose argv reads as `python -m tickcast.cli serve ...` (the interpreter
    # runs -c and ignores the rest): one with a relative data dir, one with it in the
    # environment, a `serve --detach` waiting for its server, and an `ingest`.
    argv = [sys.executable, "-c", SLEEP, "-m", "tickcast.cli"]
    rel = spawn([*argv, "serve", "--data-dir", "d1", "--port", "9"], cwd=tmp_path)
    env = spawn([*argv, "serve"], cwd=tmp_path, env={**os.environ, "TICKCAST_DATA_DIR": "/srv/tc"})
    detach = spawn([*argv, "serve", "--detach", "--data-dir", "d3"], cwd=tmp_path)
    ingest = spawn([*argv, "ingest", "--data-dir", "d4"], cwd=tmp_path)
    time.sleep(0.3)
    assert server_data_dir(rel.pid) == (tmp_path / "d1").resolve()
    assert server_data_dir(env.pid) == Path("/srv/tc")
    assert server_data_dir(detach.pid) is None and server_data_dir(ingest.pid) is None
    assert server_data_dir(os.getpid()) is None
    found = {s.pid: s.data_dir for s in find_servers()}
    assert found.get(rel.pid) == (tmp_path / "d1").resolve() and env.pid in found
    assert detach.pid not in found and ingest.pid not in found


def test_alive_and_started_at_tell_a_running_process_from_a_gone_one(spawn) -> None:
    t0 = time.time()
    child = spawn([sys.executable, "-c", "pass"])
    while child.poll() is None:  # exited and reaped
        time.sleep(0.05)
    assert not alive(child.pid) and started_at(child.pid) is None
    zombie = spawn([sys.executable, "-c", "pass"])
    time.sleep(1.0)  # exited, not reaped: a zombie is gone too
    assert not alive(zombie.pid)
    running = spawn([sys.executable, "-c", SLEEP])
    assert alive(running.pid)
    began = started_at(running.pid)
    assert began is not None and t0 - 2 <= began <= time.time() + 1


def test_listeners_names_the_process_holding_a_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listeners(port) == [os.getpid()]
        assert not port_free("127.0.0.1", port)
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is in use by pid {os.getpid()} "
                                            r"\(.*\); stop it or choose another port with --port"):
            require_free_port("127.0.0.1", port, field="serve.port", option="--port")
    assert listeners(port) == [] and port_free("127.0.0.1", port)
    require_free_port("127.0.0.1", port, field="serve.port", option="--port")


def test_stop_group_stops_every_member_and_terminate_kills_a_process_ignoring_sigterm(spawn) -> None:
    leader = spawn(["sh", "-c", "sleep 120 & sleep 120 & wait"], start_new_session=True)
    time.sleep(0.3)
    members = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
               if _pgid(p) == leader.pid]
    assert len(members) == 3
    assert stop_group(leader.pid, grace_s=5.0)
    leader.wait(timeout=10)
    assert not any(alive(p) for p in members)
    assert not stop_group(leader.pid)  # nothing left in it

    ignore_sigterm = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ready', flush=True); time.sleep(120)")
    stubborn = spawn([sys.executable, "-c", ignore_sigterm], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    # terminate() reaps its own children, so Popen may no longer see the exit status: what
    # counts is that it had to kill (True) and that the process is gone.
    assert terminate(stubborn.pid, timeout_s=1.0) is True
    stubborn.wait(timeout=10)
    assert not alive(stubborn.pid)
    polite = spawn([sys.executable, "-c", SLEEP])
    assert terminate(polite.pid, timeout_s=10.0) is False
    polite.wait(timeout=10)
    assert not alive(polite.pid)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def test_writable_dir_creates_the_dir_and_names_why_it_cannot(tmp_path: Path) -> None:
    made = writable_dir(tmp_path / "a" / "b")
    assert made.is_dir() and made.is_absolute() and list(made.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotWritable, match=f"data dir {blocker / 'data'} is not writable "
                                          r"\(Not a directory\); choose another with --data-dir") as info:
        writable_dir(blocker / "data")
    assert info.value.field == "data_dir"


def test_server_state_is_written_whole_and_recognises_its_own_process(tmp_path: Path) -> None:
    (tmp_path / "serve").mkdir()
    state = ServerState(tmp_path)
    state.update(step="redis")
    got = read_state(tmp_path)
    assert got is not None and got["pid"] == os.getpid() and got["phase"] == "starting"
    assert got["step"] == "redis" and is_live(got)
    state.update(phase=Phase.SERVING, url="http://x")
    assert read_state(tmp_path)["phase"] == "serving"  # type: ignore[index]
    assert [p.name for p in (tmp_path / "serve").iterdir()] == ["state.json"]  # no temp left
    # The same pid in a state written before this process started: a recycled pid.
    assert not is_live({**got, "started_ns": 0})
    assert not is_live({**got, "pid": 2 ** 22 + 7})
    # A newer server's state is not removed by an older one's clean-up.
    newer = ServerState(tmp_path)
    newer.fields["pid"] = os.getpid() + 1
    newer.update()
    state.remove()
    assert read_state(tmp_path)["pid"] == os.getpid() + 1  # type: ignore[index]
    newer.remove()
    assert read_state(tmp_path) is None
