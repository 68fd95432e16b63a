"""This machine's processes as ``tickcast`` sees them (Linux ``/proc``).

* which ``tickcast serve`` servers run, and for which data dir (:func:`find_servers`), so that
  ``tickcast down`` can name them when the data dir it was given has none;
* which process listens on a TCP port (:func:`listeners`), so that "port in use" names it;
* stopping a process and what is left in its process group (:func:`terminate`,
  :func:`stop_group`).

Nothing here matches processes by name alone: other users' Redis and Ray run on the same
machines, and only processes identified by pid, process group or command line are touched.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def started_at(pid: int) -> float | None:
    """When ``pid`` started, in UNIX seconds (None when it is gone): tells a process from a
    later one that was given the same pid."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in (_PROC / "stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` ([] when it is gone or unreadable)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def describe(pid: int) -> str:
    """``pid 123 (haproxy)``: a process as an error message names it."""
    try:
        name = (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        name = "?"
    return f"pid {pid} ({name})"


@dataclass(frozen=True)
class ServerProcess:
    """A running ``tickcast serve`` (foreground, or the detached server process)."""

    pid: int
    data_dir: Path


def _subcommand_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``tickcast`` (the script, or ``-m tickcast.cli``), else None."""
    for i, arg in enumerate(argv):
        if arg == "tickcast.cli" and i > 0 and argv[i - 1] == "-m":
            return argv[i + 1:]
        if Path(arg).name == "tickcast" and i <= 1:  # the console script (after its interpreter)
            return argv[i + 1:]
    return None


def _data_dir_arg(args: list[str]) -> str | None:
    value: str | None = None
    for i, arg in enumerate(args):
        if arg == "--data-dir" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--data-dir="):
            value = arg.split("=", 1)[1]
        elif arg == "--set" and i + 1 < len(args) and args[i + 1].startswith("data_dir="):
            value = value or args[i + 1].split("=", 1)[1]
    return value


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, v in pairs}


def server_data_dir(pid: int) -> Path | None:
    """The data dir of ``pid`` when it is a ``tickcast serve`` process, else None.

    Read from its command line (``--data-dir``, ``--set data_dir=``), else its environment
    (``TICKCAST_DATA_DIR``), else the default ``data``; relative paths against its working dir.
    """
    args = _subcommand_args(cmdline(pid))
    if not args or args[0] != "serve" or "--detach" in args:
        return None  # (a `serve --detach` only waits for the server process it spawned)
    value = _data_dir_arg(args) or _environ(pid).get("TICKCAST_DATA_DIR") or "data"
    path = Path(value)
    if not path.is_absolute():
        try:
            path = Path(os.readlink(_PROC / str(pid) / "cwd")) / path
        except OSError:
            pass
    return Path(os.path.realpath(path))


def find_servers() -> list[ServerProcess]:
    """Every ``tickcast serve`` process on this machine that this user can see, by pid."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        data_dir = server_data_dir(int(entry.name))
        if data_dir is not None and alive(int(entry.name)):
            found.append(ServerProcess(int(entry.name), data_dir))
    return sorted(found, key=lambda s: s.pid)


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; column 9 is the inode.
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def listeners(port: int) -> list[int]:
    """Pids of the processes holding a listening TCP socket on ``port`` (any address)."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return []
    pids = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(pids)


def stop_group(pgid: int, grace_s: float = 5.0) -> bool:
    """SIGTERM the process group ``pgid``, SIGKILL what is left after ``grace_s``.

    For the group a detached server led (it starts a session of its own): Ray's per-node agents
    of its private instance can outlive ``ray.shutdown()`` by minutes. Returns True when the
    group still had members.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our child (a test that started it): reap the zombie
    except ChildProcessError:
        pass


def terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM ``pid`` and wait up to ``timeout_s`` for it to exit (its clean-up); then SIGKILL
    it, with its whole group when it leads one. Returns True when it had to be killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            return False
        time.sleep(0.2)
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    _reap(pid)
    return True


__all__ = ["ServerProcess", "alive", "cmdline", "describe", "find_servers", "listeners",
           "server_data_dir", "started_at", "stop_group", "terminate"]
