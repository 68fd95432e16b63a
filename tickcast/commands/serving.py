"""``tickcast serve`` and ``tickcast down``: the prediction API and what feeds it.

``tickcast serve --data-dir DIR`` runs in the foreground until interrupted: it starts (or
reuses) Redis, attaches to Ray (a private local instance unless a cluster is up), starts the
feature feed (``serve.feed``: asset actors, plus the live simulator for demos), and deploys the
Serve app on ``http://<serve.host>:<serve.port>`` (127.0.0.1:8000 by default) with HAProxy
ingress. With ``--detach`` the same runs in a background process and the command returns once
``/v1/health`` reports ready. ``tickcast down --data-dir DIR`` stops everything that process
started: the app, the feed's actors, the private Ray instance, the embedded Redis.

Failing cleanly:

* Before starting anything the server checks that the data dir is writable and, when it will
  start a private Ray, that ``serve.port`` is free; then it writes its state
  (:mod:`tickcast.server_state`), so ``tickcast down`` can stop it while it is still starting.
* An error, SIGINT or SIGTERM while starting unwinds through the same clean-up as a normal stop
  (:mod:`tickcast.signals`); once serving, SIGINT/SIGTERM stop it normally.
* ``--detach`` stops the server it spawned if it fails before handing it over: the server
  exits, does not finish starting within ``--timeout`` (default ``serve.ready_timeout_s``), or
  the command itself is interrupted. A server that is up but not ready (no model yet, stale
  features) is handed over: the command says why and ``tickcast down`` stops it.
* ``tickcast down`` for a data dir with no server exits 2, naming the tickcast servers that do
  run on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tickcast import signals
from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.config import Settings
from tickcast.errors import NotFound, NotRunning, ServiceUnavailable
from tickcast.processes import find_servers, stop_group, terminate
from tickcast.server_state import Phase, ServerState, is_live, read_state, state_path

LOG_FILE = "serve.log"


def _serve_dir(settings: Settings) -> Path:
    from tickcast.preflight import writable_dir

    writable_dir(settings.data_dir)
    d = Path(settings.data_dir) / "serve"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _health(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    import httpx

    try:
        r = httpx.get(f"{url}/v1/health", timeout=timeout_s)
        return dict(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _settings(args: argparse.Namespace) -> Settings:
    overrides: list[str] = []
    if getattr(args, "feed", None):
        overrides.append(f"serve.feed={args.feed}")
    if getattr(args, "port", None):
        overrides.append(f"serve.port={args.port}")
    if getattr(args, "host", None):
        overrides.append(f"serve.host={args.host}")
    args.set = list(args.set or []) + overrides
    return settings_from_args(args)


# ----------------------------------------------------------------------- the server process
def start_closed_loop(settings: Settings, redis_url: str) -> str:
    """The controller (get-or-create, detached); drift and safety run inside the market
    shards that :class:`serve_app.feed.FeatureFeed` starts."""
    from actors.controller import get_or_create_controller
    from actors.market_shard import get_or_create_shards

    if settings.serve.feed == "none":  # no feed started the shards: they run the loop alone
        get_or_create_shards(settings, redis_url, closed_loop=True)
    get_or_create_controller(settings, redis_url)
    return f"drift and safety of {len(settings.assets)} assets in the market shards; controller"


def run_server(settings: Settings, stop: threading.Event, log: Any = None,
               handle_signals: bool = False) -> dict[str, Any]:
    """Start everything, serve until ``stop`` is set, then stop what was started.

    Whatever ends the start early (an error; with ``handle_signals``, SIGINT or SIGTERM, which
    raise :class:`~tickcast.signals.Interrupted` until serving begins) runs the same clean-up
    and is re-raised. Returns a summary of what ran.
    """
    from ray import serve

    from serve_app.app import start_serving, stop_serving
    from serve_app.feed import FeatureFeed
    from tickcast.preflight import require_free_port
    from tickcast.ray_runtime import connect_ray, disconnect_ray, will_start_private
    from tickcast.redis_server import ensure_redis, redact

    def say(msg: str) -> None:
        print(f"[tickcast serve] {msg}", file=log or sys.stderr, flush=True)

    _serve_dir(settings)
    state = ServerState(settings.data_dir)
    state.update()  # first thing: from now on `tickcast down` finds this server
    stops = signals.installed() if handle_signals else None
    redis_srv = None
    conn = None
    feed = None
    try:
        if will_start_private(settings):
            # Serve would start, fail to bind and leave the wait to ready_timeout_s; on a
            # cluster the port is the cluster's business (its Serve may already hold it).
            require_free_port(settings.serve.host, settings.serve.port, field="serve.port",
                              option="--port or --set serve.port=N")
        state.update(step="redis")
        redis_url, redis_srv = ensure_redis(settings.redis, settings.data_dir)
        state.update(redis_started=redis_srv is not None, redis_url=redis_url)
        # The replicas, the actors and this process must use the same Redis.
        settings = settings.with_overrides(**{"redis.url": redis_url})
        say(f"redis {redact(redis_url)} ({'started' if redis_srv else 'reused'})")
        state.update(step="ray")
        conn = connect_ray(settings)
        state.update(ray_started=conn.started)
        say(f"ray {'private instance started' if conn.started else 'connected ' + conn.address}")
        feed = FeatureFeed(settings, redis_url)
        state.update(step="feed")
        feed.start()
        say(f"feed: {json.dumps(feed.status())}")
        if settings.serve.closed_loop:
            state.update(step="closed_loop")
            say(f"closed loop: {start_closed_loop(settings, redis_url)}")
        state.update(step="app")
        url = start_serving(settings, redis_url, wait_ready_s=settings.serve.ready_timeout_s)
        state.update(phase=Phase.SERVING, step="serving", url=url)
        say(f"serving at {url}")
        with stops.graceful() if stops is not None else contextlib.nullcontext():
            while not stop.wait(1.0):
                pass
        say("stopping")
    finally:
        with contextlib.suppress(OSError):
            state.update(phase=Phase.STOPPING)
        if feed is not None:
            feed.stop()
        if conn is not None:
            stop_serving()
            if conn.started:
                try:
                    serve.shutdown()
                except Exception:  # noqa: BLE001 - Serve never started
                    pass
            disconnect_ray(conn)
        if redis_srv is not None:
            redis_srv.stop()
        state.remove()
        if redis_srv is not None or conn is not None:
            say("stopped")
    return {**state.fields, "feed": feed.status() if feed is not None else {}}


def require_some_model(settings: Settings) -> None:
    """Refuse at once, naming the command to run, when no asset has a champion model.

    Serving without any model would start Redis, Ray, the shards and the app only to answer
    503 everywhere; the user needs to train first. Assets without a model are served as soon
    as one is registered (the replicas poll the registry), so one model is enough to start.
    """
    from training.registry import ModelRegistry, registry_root

    registry = ModelRegistry(registry_root(settings))
    if any(registry.aliases(a).get("champion") for a in settings.assets):
        return
    first = settings.assets[0] if settings.assets else "ASSET"
    raise NotFound(
        f"no model to serve: the registry {registry.root} has no champion for any of the "
        f"{len(settings.assets)} configured assets; train one first: tickcast train --asset "
        f"{first} --data-dir {settings.data_dir} (or run `make demo`)", field="model")


def cmd_serve(args: argparse.Namespace) -> int:
    """``tickcast serve``."""
    settings = _settings(args)
    if not args.daemon:
        require_some_model(settings)
    stops = signals.installed()
    stop = stops.stop if stops is not None else threading.Event()
    if args.daemon:
        run_server(settings, stop, handle_signals=True)
        return 0
    existing = read_state(settings.data_dir)
    if existing and is_live(existing):
        health = _health(existing["url"]) if existing.get("url") else None
        print_json_line({"status": "already_running", "url": existing.get("url"),
                         "pid": existing["pid"], "phase": existing.get("phase"),
                         "ready": bool(health and health.get("ready"))})
        return 0
    if not args.detach:
        summary = run_server(settings, stop, handle_signals=True)
        print_json_line({"status": "stopped", **{k: v for k, v in summary.items() if k != "pid"}})
        return 0
    return _detach(args, settings)


def _detach(args: argparse.Namespace, settings: Settings) -> int:
    """Spawn the server in a session of its own; return once it is ready, else stop it."""
    serve_dir = _serve_dir(settings)
    log_path = serve_dir / LOG_FILE
    argv = [sys.executable, "-m", "tickcast.cli", "serve", "--daemon",
            "--data-dir", str(settings.data_dir)]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set or []:
        argv += ["--set", item]
    with open(log_path, "ab") as logf:
        log_offset = logf.tell()
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    try:
        return _await_ready(proc, settings, args.timeout or settings.serve.ready_timeout_s,
                            log_path, log_offset)
    except BaseException:
        # Failed before the server was handed over (it exited, never finished starting, or
        # this command was interrupted): nothing it started may outlive this command.
        _stop_server(proc.pid, Path(settings.data_dir), settings.serve.stop_timeout_s)
        raise


def _await_ready(proc: subprocess.Popen[bytes], settings: Settings, timeout_s: float,
                 log_path: Path, log_offset: int) -> int:
    deadline = time.monotonic() + timeout_s
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    health: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"the server stopped before it was ready: "
                                     f"{_failure_line(log_path, log_offset)} (exit code "
                                     f"{proc.returncode}; log {log_path})")
        state = read_state(settings.data_dir)
        if state and state.get("pid") == proc.pid and state.get("phase") == Phase.SERVING.value:
            health = _health(state["url"])
            if health and health.get("ready"):
                print_json_line({"status": "ready", "url": state["url"], "pid": proc.pid,
                                 "assets": health.get("assets"), "log": str(log_path)})
                return 0
        time.sleep(0.5)
    if not (state and state.get("pid") == proc.pid and state.get("phase") == Phase.SERVING.value):
        step = (state or {}).get("step", "launch")
        raise ServiceUnavailable(f"the server did not finish starting within {timeout_s:g} s (it "
                                 f"was at step {step!r}); stopped it; log {log_path}",
                                 field="serve.ready_timeout_s")
    # Up but not ready (no model yet, stale features): handed over, it says why.
    reasons = (health or {}).get("reasons", ["the app never answered /v1/health"])
    print_json_line({"status": "not_ready", "url": url, "pid": proc.pid, "reasons": reasons,
                     "log": str(log_path), "hint": "still running; `tickcast down` stops it"})
    return 1


def _failure_line(log_path: Path, offset: int) -> str:
    """The line in the server's log (written since ``offset``) that says why it stopped."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "its log is unreadable"
    for line in reversed(lines):
        if line.startswith(("error: ", "interrupted by ")):
            return line.removeprefix("error: ")
    return lines[-1] if lines else "it wrote nothing"


def _stop_server(pid: int, data_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Stop the server ``pid`` of ``data_dir`` and whatever it leaves (its process group, its
    embedded Redis). It gets ``timeout_s`` for its own clean-up before SIGKILL."""
    state = read_state(data_dir) or {}
    forced = terminate(pid, timeout_s)
    leftovers = _stop_leftover_group(state)
    redis_stopped = _stop_own_redis(data_dir) if state.get("redis_started") else False
    current = read_state(data_dir)
    if current is not None and current.get("pid") == pid:
        state_path(data_dir).unlink(missing_ok=True)
    return {"pid": pid, "forced": forced, "url": state.get("url"),
            "leftover_processes_stopped": leftovers, "redis_stopped": redis_stopped}


def cmd_down(args: argparse.Namespace) -> int:
    """``tickcast down``: stop what ``tickcast serve`` started for this data dir."""
    settings = settings_from_args(args)
    data_dir = Path(settings.data_dir).resolve()
    state = read_state(data_dir)
    timeout_s = args.timeout or settings.serve.stop_timeout_s
    if state and is_live(state):
        summary = _stop_server(int(state["pid"]), data_dir, timeout_s)
        print_json_line({"status": "stopped", **summary})
        return 0
    # A server process so young it has not written its state yet (it is still importing):
    # found by its command line, stopped before it starts anything.
    young = [s.pid for s in find_servers() if s.data_dir == data_dir]
    if young:
        summary = _stop_server(young[0], data_dir, timeout_s)
        for pid in young[1:]:
            _stop_server(pid, data_dir, timeout_s)
        print_json_line({"status": "stopped", **summary})
        return 0
    if state:
        # The server died without cleaning up: stop what it left (its group, its Redis).
        pid = int(state.get("pid") or 0)
        leftovers = _stop_leftover_group(state)
        redis_stopped = _stop_own_redis(data_dir) if state.get("redis_started") else False
        state_path(data_dir).unlink(missing_ok=True)
        if leftovers or redis_stopped:
            print_json_line({"status": "cleaned_up", "data_dir": str(data_dir), "pid": pid,
                             "leftover_processes_stopped": leftovers, "redis_stopped": redis_stopped})
            return 0
    raise NotRunning(f"no tickcast server runs for data dir {data_dir}; {_other_servers(data_dir)}")


def _stop_leftover_group(state: dict[str, Any]) -> int:
    """Stop what is left in the process group of a server that has exited: Ray's agents of its
    private instance can outlive it by minutes. Only for a server that led a session of its
    own (``--detach``): a foreground server's group is its shell job, which may hold other
    programs of the user's pipeline."""
    pid = int(state.get("pid") or 0)
    if pid <= 0 or not state.get("session_leader"):
        return 0
    return int(stop_group(pid))


def _other_servers(data_dir: Path) -> str:
    """The running servers, as `tickcast down` names them when its data dir has none."""
    others = []
    for server in find_servers():
        if server.data_dir == data_dir:
            continue  # a server of this data dir that has not written its state yet
        url = (read_state(server.data_dir) or {}).get("url")
        others.append(f"pid {server.pid} for data dir {server.data_dir}" + (f" ({url})" if url else ""))
    if not others:
        return "no tickcast server runs on this machine (for this user)"
    return (f"running tickcast servers: {'; '.join(others)}; `tickcast down --data-dir DIR` "
            f"stops one")


def _stop_own_redis(data_dir: Path) -> bool:
    """Stop the embedded Redis the server started, if a server that died mid-clean-up left it.

    Only a process whose working directory is this data dir's ``redis`` folder is stopped (a
    recycled pid in the pid file must never take an unrelated process down).
    """
    from tickcast.redis_server import stop_embedded

    pid_file = data_dir / "redis" / "pid"
    try:
        pid = int(pid_file.read_text())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return False
    if cwd.resolve() == (data_dir / "redis").resolve():
        return stop_embedded(data_dir)
    return False


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``down``."""
    p = subparsers.add_parser("serve", help="run the prediction API (Ray Serve) and its feature feed")
    add_common(p)
    p.add_argument("--detach", action="store_true", help="run in the background; return once ready")
    p.add_argument("--feed", choices=["simulator", "streams", "none"],
                   help="what feeds the online features (default: serve.feed)")
    p.add_argument("--host", help="bind address (default: serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    p.add_argument("--timeout", type=float,
                   help="seconds --detach waits for ready (default: serve.ready_timeout_s)")
    p.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    d = subparsers.add_parser("down", help="stop what `tickcast serve` started")
    add_common(d)
    d.add_argument("--timeout", type=float,
                   help="seconds the server gets to clean up before it is killed "
                        "(default: serve.stop_timeout_s)")
    d.set_defaults(func=cmd_down)
