"""What a ``tickcast serve`` process has started, in ``<data_dir>/serve/state.json``.

The server writes the file first thing, before it starts anything, and rewrites it at every
step, so ``tickcast down`` finds a server that is still starting, and learns what a server
that died left behind (its process group, an embedded Redis). Each write replaces the file
atomically: a reader never sees half of one.

Fields: ``pid``, ``data_dir``, ``started_ns``, ``phase`` (:class:`Phase`), ``step`` (what it
is starting), ``redis_started``, ``redis_url`` (``tickcast shards`` reads the live mapping
there), ``ray_started``, ``session_leader`` (detached: its process group holds only what it
started), and, once serving, ``url``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

from tickcast.processes import alive, started_at

STATE_FILE = "state.json"


class Phase(str, Enum):
    """Where a server is in its life."""

    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


def state_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "serve" / STATE_FILE


def read_state(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state a server wrote for ``data_dir`` (None: none, or unreadable)."""
    try:
        return dict(json.loads(state_path(data_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_live(state: dict[str, Any]) -> bool:
    """True when the process the state names still runs, and is the one that wrote it (not a
    later process given the same pid)."""
    pid = int(state.get("pid") or 0)
    if not alive(pid):
        return False
    began = started_at(pid)
    # /proc's boot time has 1 s resolution: allow 2 s.
    return began is None or began <= int(state.get("started_ns") or 0) / 1e9 + 2.0


class ServerState:
    """The state file of the server running in this process.

    Parameters
    ----------
    data_dir
        The server's data dir.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = state_path(data_dir)
        self.fields: dict[str, Any] = {
            "pid": os.getpid(), "data_dir": str(Path(data_dir).resolve()),
            "started_ns": time.time_ns(), "phase": Phase.STARTING.value, "step": "checks",
            "redis_started": False, "ray_started": False,
            # A detached server leads a session: its process group holds only what it started.
            "session_leader": os.getsid(0) == os.getpid(),
        }

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` and write the whole state (temp file, then ``os.replace``)."""
        self.fields.update({k: v.value if isinstance(v, Enum) else v for k, v in fields.items()})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.fields))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Delete the file if it is still this process's (a newer server may own it)."""
        current = read_state(self.path.parent.parent)
        if current is not None and current.get("pid") != self.fields["pid"]:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


__all__ = ["STATE_FILE", "Phase", "ServerState", "is_live", "read_state", "state_path"]
