"""``tickcast serve`` and ``tickcast down``: the prediction API and what feeds it.

``tickcast serve --data-dir DIR`` runs in the foreground until interrupted: it starts (or
reuses) Redis, attaches to Ray (a private local instance unless a cluster is up), starts the
feature feed (``serve.feed``: asset actors, plus the live simulator for demos), and deploys the
Serve app on ``http://<serve.host>:<serve.port>`` (127.0.0.1:8000 by default) with HAProxy
ingress. With ``--detach`` the same runs in a background process and the command returns once
``/v1/health`` reports ready (or fails after ``serve.ready_timeout_s``, leaving it running and
saying why). ``tickcast down --data-dir DIR`` stops everything that process started: the app,
the feed's actors, the private Ray instance, the embedded Redis. What a server started is
recorded in ``<data_dir>/serve/state.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.config import Settings
from tickcast.errors import NotFound, ServiceUnavailable

STATE_FILE = "state.json"
LOG_FILE = "serve.log"


def _serve_dir(settings: Settings) -> Path:
    d = Path(settings.data_dir) / "serve"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_state(settings: Settings) -> dict[str, Any] | None:
    path = Path(settings.data_dir) / "serve" / STATE_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


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
def _on_signals(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set ``stop`` (installed after ``ray.init``, whose own handlers would
    otherwise end the process in the middle of the clean-up)."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())


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

    Returns a summary of what ran.
    """
    from ray import serve

    from serve_app.app import start_serving, stop_serving
    from serve_app.feed import FeatureFeed
    from tickcast.ray_runtime import connect_ray, disconnect_ray
    from tickcast.redis_server import ensure_redis, redact

    def say(msg: str) -> None:
        print(f"[tickcast serve] {msg}", file=log or sys.stderr, flush=True)

    serve_dir = _serve_dir(settings)
    redis_url, redis_srv = ensure_redis(settings.redis, settings.data_dir)
    # The replicas, the actors and this process must use the same Redis.
    settings = settings.with_overrides(**{"redis.url": redis_url})
    say(f"redis {redact(redis_url)} ({'started' if redis_srv else 'reused'})")
    conn = connect_ray(settings)
    if handle_signals:
        _on_signals(stop)
    say(f"ray {'private instance started' if conn.started else 'connected ' + conn.address}")
    feed = FeatureFeed(settings, redis_url)
    state: dict[str, Any] = {"pid": os.getpid(), "redis_started": redis_srv is not None,
                             "redis_url": redis_url,
                             "ray_started": conn.started, "data_dir": str(settings.data_dir)}
    try:
        feed.start()
        say(f"feed: {json.dumps(feed.status())}")
        if settings.serve.closed_loop:
            say(f"closed loop: {start_closed_loop(settings, redis_url)}")
        url = start_serving(settings, redis_url, wait_ready_s=settings.serve.ready_timeout_s)
        state.update({"url": url, "started_ns": time.time_ns()})
        (serve_dir / STATE_FILE).write_text(json.dumps(state))
        say(f"serving at {url}")
        while not stop.wait(1.0):
            pass
        say("stopping")
    finally:
        feed.stop()
        stop_serving()
        if conn.started:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve never started
                pass
        disconnect_ray(conn)
        if redis_srv is not None:
            redis_srv.stop()
        try:
            (serve_dir / STATE_FILE).unlink()
        except FileNotFoundError:
            pass
        say("stopped")
    return {**state, "feed": feed.status()}


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
    if args.daemon:
        stop = threading.Event()
        _on_signals(stop)
        run_server(settings, stop, handle_signals=True)
        return 0
    existing = _read_state(settings)
    if existing and _alive(int(existing.get("pid", 0))):
        health = _health(existing["url"]) if existing.get("url") else None
        print_json_line({"status": "already_running", "url": existing.get("url"),
                         "pid": existing["pid"], "ready": bool(health and health.get("ready"))})
        return 0
    if not args.detach:
        stop = threading.Event()
        _on_signals(stop)
        try:
            summary = run_server(settings, stop, handle_signals=True)
        except KeyboardInterrupt:
            return 130
        print_json_line({"status": "stopped", **{k: v for k, v in summary.items() if k != "pid"}})
        return 0
    return _detach(args, settings)


def _detach(args: argparse.Namespace, settings: Settings) -> int:
    serve_dir = _serve_dir(settings)
    log_path = serve_dir / LOG_FILE
    argv = [sys.executable, "-m", "tickcast.cli", "serve", "--daemon",
            "--data-dir", str(settings.data_dir)]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set or []:
        argv += ["--set", item]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    timeout = args.timeout or settings.serve.ready_timeout_s
    deadline = time.monotonic() + timeout
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    health: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise ServiceUnavailable(f"the server exited with code {proc.returncode}; log "
                                     f"{log_path}:\n{tail}")
        state = _read_state(settings)
        if state and state.get("pid") == proc.pid:
            health = _health(state["url"])
            if health and health.get("ready"):
                print_json_line({"status": "ready", "url": state["url"], "pid": proc.pid,
                                 "assets": health.get("assets"), "log": str(log_path)})
                return 0
        time.sleep(0.5)
    reasons = (health or {}).get("reasons", ["the app never answered /v1/health"])
    print_json_line({"status": "not_ready", "url": url, "pid": proc.pid, "reasons": reasons,
                     "log": str(log_path), "hint": "still running; `tickcast down` stops it"})
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    """``tickcast down``: stop what ``tickcast serve`` started for this data dir."""
    settings = settings_from_args(args)
    state = _read_state(settings)
    if not state:
        print_json_line({"status": "not_running", "data_dir": str(settings.data_dir)})
        return 0
    if not _alive(int(state.get("pid", 0))):
        # The server died without cleaning up: stop what it left (its group, its Redis).
        leftovers = _stop_group(int(state.get("pid", 0))) if state.get("pid") else 0
        if state.get("redis_started"):
            _stop_own_redis(Path(settings.data_dir))
        (Path(settings.data_dir) / "serve" / STATE_FILE).unlink(missing_ok=True)
        print_json_line({"status": "not_running", "data_dir": str(settings.data_dir),
                         "leftover_processes_stopped": leftovers})
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + (args.timeout or 120.0)
    while _alive(pid) and time.monotonic() < deadline:
        try:
            # Reap it when it is our child (a test that started it in-process); else just wait.
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    forced = False
    leftovers = _stop_group(pid) if not _alive(pid) else 0
    if _alive(pid):
        forced = True
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)  # a detached server leads its own process group
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if state.get("redis_started"):
        _stop_own_redis(Path(settings.data_dir))  # its own session: not reached by the kills
    (Path(settings.data_dir) / "serve" / STATE_FILE).unlink(missing_ok=True)
    print_json_line({"status": "stopped", "pid": pid, "forced": forced, "url": state.get("url"),
                     "leftover_processes_stopped": leftovers})
    return 0


def _stop_own_redis(data_dir: Path) -> None:
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
        return
    if cwd.resolve() == (data_dir / "redis").resolve():
        stop_embedded(data_dir)


def _stop_group(pgid: int) -> int:
    """Stop processes left in a detached server's process group after it exited.

    Ray's per-node agents (dashboard agent, runtime-env agent) of the server's private Ray
    instance can outlive ``ray.shutdown()`` by minutes; they are in the server's group (it led
    a session of its own), so nothing outside what it started is touched.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return 0
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return 1
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``down``."""
    p = subparsers.add_parser("serve", help="run the prediction API (Ray Serve) and its feature feed")
    add_common(p)
    p.add_argument("--detach", action="store_true", help="run in the background; return once ready")
    p.add_argument("--feed", choices=["simulator", "streams", "none"],
                   help="what feeds the online features (default: serve.feed)")
    p.add_argument("--host", help="bind address (default: serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    p.add_argument("--timeout", type=float, help="seconds --detach waits for ready")
    p.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    d = subparsers.add_parser("down", help="stop what `tickcast serve` started")
    add_common(d)
    d.add_argument("--timeout", type=float, help="seconds to wait before killing")
    d.set_defaults(func=cmd_down)
