"""Checks a command makes before it starts anything: the data dir and the ports it needs.

Each failure is a :class:`~tickcast.errors.TickcastError` that names the path or port, the
process in the way when one can be found, and what to do, so the CLI prints one line and the
command has nothing to clean up yet.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

from tickcast.errors import NotWritable, PortInUse
from tickcast.processes import describe, find_servers, listeners


def writable_dir(path: str | os.PathLike[str], *, field: str = "data_dir") -> Path:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it.

    A real write, not ``os.access``: root passes every permission check, yet not a read-only
    file system or an immutable directory.

    Returns
    -------
    Path
        ``path``, absolute.

    Raises
    ------
    NotWritable
        Naming the path, the system's reason and the option that chooses another.
    """
    target = Path(path).resolve()
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise NotWritable(
            f"data dir {target} is not writable ({reason}); choose another with --data-dir or "
            f"TICKCAST_DATA_DIR, or make it writable", field=field) from None
    return target


def port_free(host: str, port: int) -> bool:
    """True when a server could listen on ``host:port`` now (bound as servers bind, with
    SO_REUSEADDR, so a closed connection in TIME_WAIT does not count as use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def holder(port: int) -> str:
    """Who listens on ``port``: a ``tickcast serve`` named by its data dir, else the process,
    else "another process" (one of another user, whose sockets are not visible)."""
    pids = listeners(port)
    if not pids:
        return "another process"
    servers = {s.pid: s for s in find_servers()}
    for pid in pids:
        # A server's HTTP ingress (HAProxy, a Serve proxy) runs in the server's process group.
        server = servers.get(pid) or servers.get(_pgid(pid))
        if server is not None:
            return (f"{describe(pid)} of the tickcast server pid {server.pid} for data dir "
                    f"{server.data_dir} (`tickcast down --data-dir {server.data_dir}` stops it)")
    return ", ".join(describe(pid) for pid in pids)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def require_free_port(host: str, port: int, *, field: str, option: str) -> None:
    """Raise :class:`~tickcast.errors.PortInUse` when ``host:port`` is taken.

    ``option`` is how the user picks another port (``--port`` / ``--set serve.port=N``).
    """
    if port_free(host, port):
        return
    raise PortInUse(f"port {port} on {host} is in use by {holder(port)}; stop it or choose "
                    f"another port with {option}", field=field)


__all__ = ["holder", "port_free", "require_free_port", "writable_dir"]
