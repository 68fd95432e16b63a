"""Serving benchmark: HTTP load on the real prediction API, beside Ray Serve's own floor.

``python -m bench.serve [--duration 10] [--batch-assets 1000] [--no-spike] [--no-floor]``

What it sets up (all in a temporary data dir, removed at the end): an embedded Redis; the
shared BTC/USD 1-minute bars (one venue, the consensus a single provider makes) stored as
consensus bars, moved forward in time so that the last one closed just now; two models made by
``tickcast train`` with default settings (:func:`training.pipeline.train_model`: Ray Tune
over walk-forward folds, refit, conformal calibration, ONNX export with parity, registry), the
first on the first seven days (champion), the second on all nine (challenger), so both slots
hold real, different models, and their tree count and depth are reported; ``--batch-assets``
more assets served by the same two model files (a pooled model: each asset has its own
registry versions, hard links to the same files, its own online feature row taken from a
different minute of the real history, and its own last bar in the bar store). Then a private
Ray instance and the Serve app with HAProxy ingress on a free port, with shadow mode on and a
10 % green canary for *every* asset, so every request, single or batch, runs two models per
asset (served + shadow) and writes two prediction-log entries per asset.

Beside it, behind the same HAProxy ingress, the floor: a trivial Serve deployment (reads the
body, returns a constant JSON object) with the same replica settings and autoscaling bounds
(Serve's own request-count policy), at ``/floor``. Every figure is measured on the app and
then on the floor, by the same client at the same concurrency, and reported as a ratio:
the targets are c8 throughput >= 1.0x the floor's and c8 p99 <= 1.5x the floor's.

What it measures, after a warm-up: closed-loop load at 1, 8 and 32 connections on
``POST /v1/predict`` (one asset, online features); the same at 1 connection with
``"explain": true`` (TreeSHAP, the top 5 contributions), to show its cost and that the path
without it is untouched; a batch run of ``--batch-assets`` assets per
``POST /v1/predict/batch`` request; each run is preceded by the same load until the
autoscaler has settled, so it measures the replica count that load settles on (reported as
``replicas``); and (unless ``--no-spike``) an autoscaling spike: 2 connections, then 20 (10x),
then 2 again, each paced at 200 req/s (400, then 4,000 req/s offered), sampling the replica
count. In paced runs each request's latency counts from the time it was meant to be sent (its
slot on a fixed schedule), not from when a late connection got to send it, so a server that
falls behind is charged for the wait (no coordinated omission); requests still owed at the end
of a run are reported as ``backlog``.

The load client is part of this file (:class:`ClosedLoopClient`): raw asyncio protocols over
keep-alive connections, uvloop, request bytes prebuilt once, the next request written from
``data_received`` with no coroutine switch. Its own CPU use (process CPU time during the run
divided by wall time, which also counts the Ray driver threads of this process, so it is an
upper bound) is reported per run as ``*_client_cpu``.

The last line is one JSON object with ``c1_rps, c1_p50_ms, c1_p99_ms, c8_rps, c8_p50_ms,
c8_p99_ms, c32_rps, c32_p99_ms, batch_predictions_per_s, errors``, the floor's figures
(``floor_*``), the ratios (``vs_floor``), the model (``model``) and more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"


# ----------------------------------------------------------------------- the load client
def http_post(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """Bytes of one keep-alive HTTP/1.1 POST with a JSON body."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


@dataclass
class RunResult:
    """Outcome of one closed-loop run."""

    connections: int
    seconds: float
    requests: int
    errors: int
    statuses: dict[int, int]
    latencies_ms: np.ndarray
    client_cpu: float  # process CPU seconds per wall second during the run
    reconnects: int = 0  # keep-alive connections the server closed between requests
    settle_s: float = 0.0  # warm-up load until the replica count was stable
    replicas: int = -1  # running replicas at the end of the run
    backlog: int = 0  # paced runs: requests owed at the end (their slot passed, not answered)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


class _Conn(asyncio.Protocol):
    """One keep-alive connection issuing requests back to back (closed loop)."""

    def __init__(self, client: "ClosedLoopClient", requests: list[bytes], offset: int,
                 schedule_ns: int | None = None) -> None:
        self.client = client
        self.requests = requests
        self.i = offset
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.t0 = 0
        self.pending = False  # a request is out and its response not complete
        self.loop = asyncio.get_event_loop()
        self.closed = self.loop.create_future()
        # Paced runs: perf_counter_ns of this connection's next scheduled request. A connection
        # replacing one the server closed takes over its schedule (owed requests stay owed).
        self.next_at = 0
        self.sent_slot = 0  # slot of the last request sent
        self.inherited = schedule_ns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.perf_counter_ns()
        if self.inherited is not None and self.inherited > now:
            self.next_at = self.inherited  # the closed connection's next slot is still ahead
            self.loop.call_later((self.inherited - now) / 1e9, self._send_if_open)
            return
        self.next_at = now if self.inherited is None else self.inherited
        self._send(self.next_at)

    def _send(self, intended_ns: int | None = None) -> None:
        if not self.client.running:
            assert self.transport is not None
            self.transport.close()
            return
        req = self.requests[self.i % len(self.requests)]
        self.i += 1
        # Paced: the clock starts at the request's slot on the schedule, even when the previous
        # response came late and this one goes out after its slot (no coordinated omission).
        self.t0 = time.perf_counter_ns() if intended_ns is None else intended_ns
        self.sent_slot = self.t0
        self.pending = True
        assert self.transport is not None
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            k = head.find(b"content-length:")
            if k < 0:
                length = 0
            else:
                e = head.find(b"\r\n", k)
                length = int(head[k + 15:e if e >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            del buf[:total]
            self.pending = False
            self.client.record(status, time.perf_counter_ns() - self.t0)
            if b"connection: close" in head:
                return  # the server ends this connection: connection_lost reconnects
            self._next()

    def _next(self) -> None:
        interval = self.client.interval_ns
        if not interval:
            self._send()
            return
        # Paced: one request per slot of a fixed schedule. A slot missed because the previous
        # response was late is not skipped: its request goes at once, timed from its slot.
        self.next_at += interval
        now = time.perf_counter_ns()
        if self.next_at <= now:
            self._send(self.next_at)
        else:
            self.loop.call_later((self.next_at - now) / 1e9, self._send_if_open)

    def owed(self, now_ns: int) -> int:
        """Paced: scheduled requests whose slot has passed but which are not sent yet."""
        if not self.client.interval_ns or self.next_at > now_ns:
            return 0
        return int((now_ns - self.next_at) // self.client.interval_ns) + 1

    def _send_if_open(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(self.next_at)

    def connection_lost(self, exc: Exception | None) -> None:
        # A server may close a keep-alive connection between requests (HAProxy does on each
        # reload, e.g. when autoscaling adds a replica): like any HTTP client, reconnect. Only
        # a request that was out without its response counts as an error.
        if self.pending and self.client.recording:
            self.client.errors += 1
            self.client.statuses[0] = self.client.statuses.get(0, 0) + 1
        if self.client.running:
            self.client.reconnect(self.i, self.sent_slot + self.client.interval_ns)
        if not self.closed.done():
            self.closed.set_result(None)


class ClosedLoopClient:
    """Closed-loop HTTP load: ``connections`` connections, each sending its next request as
    soon as the previous response arrives (or, with ``per_connection_rps``, at that pace).

    Parameters
    ----------
    host, port
        Server.
    requests
        Prebuilt request bytes, used round-robin (each connection starts at another offset).
    """

    def __init__(self, host: str, port: int, requests: list[bytes]) -> None:
        self.host = host
        self.port = port
        self.requests = requests
        self.running = False
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self._lat: list[int] = []
        self.recording = False
        self.reconnects = 0
        self._conns: list[_Conn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.interval_ns = 0

    def reconnect(self, offset: int, schedule_ns: int | None = None) -> None:
        """Open a replacement connection (the server closed one); paced, it keeps the closed
        one's schedule from ``schedule_ns`` on."""
        self.reconnects += 1
        loop = asyncio.get_running_loop()
        proto = _Conn(self, self.requests, offset, schedule_ns if self.interval_ns else None)
        self._conns.append(proto)
        task = loop.create_task(loop.create_connection(lambda: proto, self.host, self.port))
        self._tasks.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.recording:
            self.errors += 1  # could not reconnect: the server is gone
            self.statuses[-1] = self.statuses.get(-1, 0) + 1

    def record(self, status: int, ns: int) -> None:
        if not self.recording:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            self.errors += 1
        self._lat.append(ns)

    async def _run(self, connections: int, warmup_s: float, seconds: float,
                   on_tick: Callable[[float], None] | None) -> RunResult:
        loop = asyncio.get_running_loop()
        self.running = True
        self.reconnects = 0
        self._conns = []
        for c in range(connections):
            proto = _Conn(self, self.requests, offset=c * 7919)
            await loop.create_connection(lambda p=proto: p, self.host, self.port)
            self._conns.append(proto)
        await asyncio.sleep(warmup_s)
        self._lat = []
        self.statuses = {}
        self.errors = 0
        self.recording = True
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
            if on_tick is not None:
                on_tick(elapsed)
            await asyncio.sleep(min(0.25, seconds - elapsed))
        wall = time.perf_counter() - t0
        self.recording = False
        now_ns = time.perf_counter_ns()
        backlog = sum(c.owed(now_ns) for c in self._conns
                      if c.transport is not None and not c.transport.is_closing())
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        self.running = False
        await asyncio.wait([c.closed for c in self._conns if c.transport is not None], timeout=10)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        lat = np.asarray(self._lat, dtype=np.float64) / 1e6
        return RunResult(connections, wall, len(lat), self.errors, dict(self.statuses), lat, cpu / wall,
                         self.reconnects, backlog=backlog)

    def run(self, connections: int, seconds: float, warmup_s: float = 1.0,
            on_tick: Callable[[float], None] | None = None,
            per_connection_rps: float | None = None) -> RunResult:
        """Run the load for ``seconds`` after ``warmup_s`` (not recorded); blocking.

        ``per_connection_rps`` paces each connection: one request per slot of a fixed schedule,
        timed from its slot, so that 10x the connections is 10x the offered load and a server
        that falls behind is charged for it.
        """
        self.interval_ns = int(1e9 / per_connection_rps) if per_connection_rps else 0
        try:
            import uvloop

            runner: Callable[..., Any] = uvloop.run
        except ImportError:  # pragma: no cover - uvloop ships with ray[serve]
            runner = asyncio.run
        return runner(self._run(connections, warmup_s, seconds, on_tick))


# ----------------------------------------------------------------------- setup
@dataclass
class Setup:
    """What the benchmark built."""

    data_dir: Path
    redis: Any
    settings: Any
    url: str
    assets: list[str]
    champion: str
    challenger: str
    timings: dict[str, float] = field(default_factory=dict)
    feature_rows: dict[str, Any] = field(default_factory=dict)  # asset -> values (float64)
    closes: dict[str, float] = field(default_factory=dict)  # asset -> close published with them
    models: dict[str, Any] = field(default_factory=dict)  # champion / challenger: trees, depth

    def keep_features_live(self, stop: threading.Event) -> threading.Thread:
        """Re-publish every asset's feature row at each new bar, as the asset actors do live
        (without it the rows would pass serve.feature_max_age_s during a long run)."""
        from tickcast.features.definitions import feature_names, schema_hash
        from tickcast.redis_server import connect
        from tickcast.storage.online_store import OnlineFeatureStore

        freq = self.settings.bars.freq_s * 1_000_000_000
        names = list(feature_names(self.settings.features))
        sh = schema_hash(self.settings.features)
        online = OnlineFeatureStore(connect(self.redis.url))

        def run() -> None:
            last = -1
            while not stop.wait(1.0):
                bar = (time.time_ns() // freq - 1) * freq
                if bar == last:
                    continue
                for asset, values in self.feature_rows.items():
                    online.write(asset, bar, sh, names, values, close=self.closes.get(asset))
                last = bar

        th = threading.Thread(target=run, name="bench-feature-feed", daemon=True)
        th.start()
        return th


def link_version(registry: Any, asset: str, source: Path, alias: str) -> str:
    """Register ``source`` (a registry version directory) for ``asset`` as hard links: the
    registry's layout (a version directory appearing by rename, its card naming the asset and
    version), without a copy of a model file per asset. Returns the new version."""
    from training.registry import CARD_FILE, new_version

    adir = Path(registry.root) / asset
    adir.mkdir(parents=True, exist_ok=True)
    version = new_version()
    while (adir / version).exists():
        version = new_version()
    staging = adir / f".staging-{version}"
    staging.mkdir()
    for f in source.iterdir():
        if f.name != CARD_FILE:
            os.link(f, staging / f.name)
    card = json.loads((source / CARD_FILE).read_text())
    card.update(asset=asset, version=version, note=f"pooled: the files of {source.parent.name}/{source.name}")
    (staging / CARD_FILE).write_text(json.dumps(card))
    os.replace(staging, adir / version)
    registry.set_alias(asset, alias, version)
    return version


def model_shape(registry: Any, asset: str, version: str) -> dict[str, Any]:
    """Trees, depth and hyper-parameters of a registered model, read from its ONNX trees."""
    from training.engine import TreeTables

    tables = TreeTables.from_onnx(registry.model_bytes(asset, version))
    card = registry.card(asset, version)
    params = card.get("params", {})
    return {"version": version, "trees": tables.n_trees, "outputs": tables.n_targets,
            "rounds": params.get("rounds"), "max_depth_param": params.get("max_depth"),
            "depth_max": int(tables.depths.max()), "depth_mean": round(float(tables.depths.mean()), 2),
            "features": tables.n_features, "train_end": card.get("training", {}).get("end")}


def prepare(data_dir: Path, batch_assets: int, log: Callable[[str], None],
            overrides: list[str] | None = None) -> Setup:
    """Bars, models (trained by ``tickcast train``'s pipeline: Ray must be up), features."""
    from serve_app import model_kit as mk
    from tickcast.config import load_settings
    from tickcast.net import free_port
    from tickcast.redis_server import EmbeddedRedis, connect
    from tickcast.storage.bar_store import BarStore
    from tickcast.storage.online_store import OnlineFeatureStore
    from training.pipeline import train_model
    from training.registry import ModelRegistry, registry_root

    timings: dict[str, float] = {}
    srv = EmbeddedRedis.start(data_dir)
    port = free_port()
    settings = load_settings(overrides=[
        f"data_dir={data_dir}", f"redis.url={srv.url}", f"serve.port={port}",
        "serve.admin_token=bench-token", "serve.shadow_default=true", *(overrides or []),
    ])
    freq = settings.bars.freq_s * 1_000_000_000
    bars = mk.venue_bars(SHARED_DATA)
    live = mk.shift_to_live(bars, freq)
    store = BarStore(Path(data_dir) / "bars", fsync=False)
    store.upsert("BTC-USD", "consensus", live)
    log(f"bars: {len(bars)} real BTC/USD 1-minute bars, stored as consensus bars ending now")

    t = time.monotonic()
    seven_days = int(live["ts"].iloc[0]) + 7 * 86_400 * 1_000_000_000
    quiet: Callable[[str], None] = lambda msg: log(f"  train: {msg}")  # noqa: E731
    first = train_model(settings, "BTC-USD", train_end=seven_days, log=quiet)
    second = train_model(settings, "BTC-USD", log=quiet)
    timings["train_s"] = time.monotonic() - t
    registry = ModelRegistry(registry_root(settings))
    champion, challenger = first["version"], second["version"]
    assert (first["alias"], second["alias"]) == ("champion", "challenger"), (first["alias"], second["alias"])
    shapes = {"champion": model_shape(registry, "BTC-USD", champion),
              "challenger": model_shape(registry, "BTC-USD", challenger)}
    log(f"trained two models with tickcast train's defaults in {timings['train_s']:.1f} s: "
        + "; ".join(f"{k} {v['trees']} trees ({v['rounds']} rounds x {v['outputs']}), depth "
                    f"<= {v['depth_max']}" for k, v in shapes.items()))

    feats = mk.feature_rows(settings, live.iloc[-2000:])
    online = OnlineFeatureStore(connect(srv.url))
    closes = {"BTC-USD": float(live["close"].iloc[-1])}
    mk.publish_features(settings, online, "BTC-USD", feats, close=closes["BTC-USD"])
    rows: dict[str, Any] = {"BTC-USD": feats.iloc[-1].to_numpy(np.float64)}

    t = time.monotonic()
    assets = [f"SYN-{i:04d}" for i in range(batch_assets)]
    hist = mk.feature_rows(settings, bars)
    usable = np.flatnonzero(np.isfinite(hist.to_numpy()).all(axis=1))
    picks = usable[np.linspace(0, len(usable) - 1, max(batch_assets, 1)).astype(int)]
    last_ts = int(live["ts"].iloc[-1])
    from tickcast.features.definitions import feature_names, schema_hash

    names = list(feature_names(settings.features))
    sh = schema_hash(settings.features)
    champion_dir = Path(registry.path("BTC-USD", champion))
    challenger_dir = Path(registry.path("BTC-USD", challenger))
    pipe_rows = []
    for asset, row in zip(assets, picks):
        link_version(registry, asset, champion_dir, "champion")
        link_version(registry, asset, challenger_dir, "challenger")
        bar = bars.iloc[[int(row)]].copy()
        bar["ts"] = last_ts
        store.upsert(asset, "consensus", bar)
        pipe_rows.append((asset, hist.iloc[int(row)].to_numpy(np.float64)))
        closes[asset] = float(bar["close"].iloc[0])
    for asset, values in pipe_rows:
        online.write(asset, last_ts, sh, names, values, close=closes[asset])
        rows[asset] = values
    timings["batch_assets_setup_s"] = time.monotonic() - t
    log(f"{batch_assets} pooled-model assets registered (champion + challenger) with features "
        f"and bars in {timings['batch_assets_setup_s']:.1f} s")
    return Setup(data_dir=data_dir, redis=srv, settings=settings,
                 url=f"http://127.0.0.1:{port}", assets=assets, champion=champion,
                 challenger=challenger, timings=timings, feature_rows=rows, closes=closes,
                 models=shapes)


# ----------------------------------------------------------------------- the floor
FLOOR_APP = "floor"
FLOOR_DEPLOYMENT = "floor"
FLOOR_PREFIX = "/floor"


def start_floor(settings: Any) -> None:
    """Ray Serve's floor beside the app: a trivial deployment behind the same HAProxy ingress.

    It reads the request body and returns a constant JSON object through Serve's ordinary
    request path (a Starlette ``Request`` in, a ``JSONResponse`` out). Replica settings are the app's
    (:func:`serve_app.app.deployment_options`: same environment, same bounds on ongoing
    requests and replicas) except the autoscaling policy, which is Serve's own: the app's
    policy reads a load metric only the app's replicas report.
    """
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from serve_app.app import deployment_options

    @serve.deployment(name=FLOOR_DEPLOYMENT)
    class Floor:
        async def __call__(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse({"ok": True})

    options = deployment_options(settings)
    options["autoscaling_config"] = {k: v for k, v in options["autoscaling_config"].items()
                                     if k != "policy"}
    serve.run(Floor.options(**options).bind(),  # type: ignore[attr-defined]
              name=FLOOR_APP, route_prefix=FLOOR_PREFIX,
              blocking=False)


def _running_replicas(app: str | None = None, deployment: str | None = None) -> int:
    from ray import serve

    from serve_app.app import APP_NAME, DEPLOYMENT_NAME

    try:
        status = serve.status().applications[app or APP_NAME].deployments[deployment or DEPLOYMENT_NAME]
        return int(status.replica_states.get("RUNNING", 0))
    except Exception:  # noqa: BLE001
        return -1


def wait_ready(url: str, expect_assets: int, timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Wait until /v1/health is ready and the models of ``expect_assets`` assets are routed."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/v1/health", timeout=30).json()
            models = httpx.get(f"{url}/v1/models", timeout=30).json()
            if last.get("ready") and len(models.get("assets", {})) >= expect_assets:
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s: {json.dumps(last)[:500]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load")
    parser.add_argument("--batch-assets", type=int, default=1000)
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--no-spike", action="store_true", help="skip the autoscaling spike")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch runs")
    parser.add_argument("--no-explain", action="store_true", help="skip the explain run")
    parser.add_argument("--no-floor", action="store_true", help="skip Ray Serve's floor")
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the served app (repeatable)")
    parser.add_argument("--runs", default="1,8,32", help="connection counts of the single-asset runs")
    parser.add_argument("--no-shadow", action="store_true", help="serve one model per request")
    args = parser.parse_args(argv)
    if not SHARED_DATA.exists():
        print(f"shared data not found at {SHARED_DATA}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[bench.serve] {msg}", file=sys.stderr, flush=True)

    import ray
    from ray import serve

    from serve_app.app import start_serving
    from tickcast.redis_server import connect
    from tickcast.streams import prediction_stream_key

    data_dir = Path(tempfile.mkdtemp(prefix="tickcast-bench-serve-"))
    setup: Setup | None = None
    stop_feed = threading.Event()
    result: dict[str, Any] = {}
    floor = not args.no_floor
    try:
        # Ray first: the models are trained by tickcast train's pipeline (Ray Tune) on it.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        setup = prepare(data_dir, args.batch_assets, log, args.set)
        setup.keep_features_live(stop_feed)
        t = time.monotonic()
        url = start_serving(setup.settings, setup.redis.url, wait_ready_s=180)
        health = wait_ready(url, 1 + args.batch_assets, 300, log)
        log(f"serving at {url} (ready in {time.monotonic() - t:.1f} s): {health['status']}")
        import httpx

        if floor:
            start_floor(setup.settings)
            wait_floor(url, 120)
        admin = {"Authorization": "Bearer bench-token"}
        # Shadow and a 10 % canary on every asset (BTC-USD and the batch's).
        r = httpx.post(f"{url}/v1/admin/traffic", json={"green_weight": 0.1, "shadow": not args.no_shadow},
                       headers=admin, timeout=120)
        r.raise_for_status()
        host, port = "127.0.0.1", setup.settings.serve.port
        body = b'{"asset":"BTC-USD"}'
        keys = [{"X-Request-Key": f"client-{i}"} for i in range(64)]
        single = [http_post(host, port, "/v1/predict", body, k) for k in keys]
        floor_single = [http_post(host, port, FLOOR_PREFIX, body, k) for k in keys]
        explain = [http_post(host, port, "/v1/predict", b'{"asset":"BTC-USD","explain":true}', k)
                   for k in keys]
        log("warm-up")
        ClosedLoopClient(host, port, single).run(1, args.warmup, warmup_s=0.5)
        if floor:
            ClosedLoopClient(host, port, floor_single).run(1, args.warmup, warmup_s=0.5)

        def measure(name: str, requests: list[bytes], connections: int, on_floor: bool) -> RunResult:
            client = ClosedLoopClient(host, port, requests)
            target = (FLOOR_APP, FLOOR_DEPLOYMENT) if on_floor else (None, None)
            settled = settle(client, connections, log, *target)
            res = client.run(connections, args.duration, warmup_s=1.0)
            res.settle_s, res.replicas = settled, _running_replicas(*target)
            log(f"{'floor ' if on_floor else ''}{name}: {res.rps:,.1f} req/s p50 {res.pct(50):.2f} ms "
                f"p99 {res.pct(99):.2f} ms errors {res.errors} statuses {res.statuses} "
                f"client cpu {res.client_cpu:.2f} replicas {res.replicas}")
            return res

        runs: dict[str, RunResult] = {}
        floor_runs: dict[str, RunResult] = {}
        for c in (int(x) for x in args.runs.split(",") if x):
            runs[f"c{c}"] = measure(f"c{c}", single, c, False)
            if floor:
                floor_runs[f"c{c}"] = measure(f"c{c}", floor_single, c, True)
        if not args.no_explain:
            runs["explain_c1"] = measure("explain c1", explain, 1, False)
        batch_runs: dict[str, RunResult] = {}
        if not args.no_batch:
            for fmt in ("columns", "records"):
                batch_body = json.dumps({"assets": setup.assets, "format": fmt}).encode()
                batch_runs[fmt] = measure(f"batch x{args.batch_assets} ({fmt})",
                                          [http_post(host, port, "/v1/predict/batch", batch_body)],
                                          args.batch_connections, False)
            if floor:
                batch_body = json.dumps({"assets": setup.assets, "format": "columns"}).encode()
                floor_runs["batch"] = measure(f"batch body x{args.batch_assets}",
                                              [http_post(host, port, FLOOR_PREFIX, batch_body)],
                                              args.batch_connections, True)
        stats = httpx.get(f"{url}/metrics", timeout=30).text
        log_written = _metric(stats, "tickcast_serve_prediction_log_written_total")
        log_dropped = sum(_metric_all(stats, "tickcast_serve_prediction_log_dropped_total"))
        redis = connect(setup.redis.url)
        result = {}
        for name, run in runs.items():
            result.update(_figures(name, run))
        for name, run in floor_runs.items():
            result.update(_figures(f"floor_{name}", run))
        all_runs = list(runs.values()) + list(batch_runs.values())
        if batch_runs:
            bres = batch_runs["columns"]
            result.update({
                "batch_predictions_per_s": round(bres.rps * args.batch_assets, 0),
                "batch_rps": round(bres.rps, 2), "batch_p50_ms": round(bres.pct(50), 2),
                "batch_p99_ms": round(bres.pct(99), 2), "batch_format": "columns",
                "batch_records_predictions_per_s": round(batch_runs["records"].rps * args.batch_assets, 0),
                "batch_records_p99_ms": round(batch_runs["records"].pct(99), 2),
                "batch_assets": args.batch_assets, "batch_connections": args.batch_connections,
                "batch_replicas": {k: v.replicas for k, v in batch_runs.items()},
            })
        ratios: dict[str, Any] = {}
        for name, run in floor_runs.items():
            ours = runs.get(name) if name != "batch" else batch_runs.get("columns")
            if ours is not None and run.rps > 0:
                ratios[name] = {"rps": round(ours.rps / run.rps, 3),
                                "p50": round(ours.pct(50) / run.pct(50), 3),
                                "p99": round(ours.pct(99) / run.pct(99), 3)}
        if "c8" in ratios:
            ratios["targets"] = {"c8_rps_ge_1.0x": ratios["c8"]["rps"] >= 1.0,
                                 "c8_p99_le_1.5x": ratios["c8"]["p99"] <= 1.5}
        if "c1" in runs and "explain_c1" in runs:
            ratios["explain_c1_vs_c1"] = {"rps": round(runs["explain_c1"].rps / runs["c1"].rps, 3),
                                          "p50": round(runs["explain_c1"].pct(50) / runs["c1"].pct(50), 3)}
        result.update({
            "vs_floor": ratios,
            "model": setup.models,
            "errors": int(sum(r.errors for r in all_runs)),
            "floor_errors": int(sum(r.errors for r in floor_runs.values())),
            "client_cpu": {k: round(v.client_cpu, 3) for k, v in runs.items()},
            "replicas": {k: v.replicas for k, v in runs.items()},
            "floor_replicas": {k: v.replicas for k, v in floor_runs.items()},
            "settle_s": {k: round(v.settle_s, 1) for k, v in runs.items()},
            "client_cpu_us_per_request": {k: round(1e6 * v.client_cpu / v.rps, 1) for k, v in runs.items() if v.rps},
            "prediction_log_written": log_written, "prediction_log_dropped": log_dropped,
            "prediction_stream_len": sum(int(redis.xlen(prediction_stream_key(
                setup.settings.serve.prediction_stream, a))) for a in ["BTC-USD", *setup.assets]),
            "setup": {"shadow": not args.no_shadow, "green_weight": 0.1, "shadow_and_canary": "every asset",
                      "models_per_request": 1 if args.no_shadow else 2,
                      "duration_s": args.duration,
                      "autoscaling": setup.settings.serve.autoscaling.model_dump(),
                      "overrides": args.set, **{k: round(v, 1) for k, v in setup.timings.items()}},
        })
        if not args.no_spike:
            result.update(spike(host, port, single, log))
            if floor:
                result.update({f"floor_{k}": v for k, v in spike(
                    host, port, floor_single, log, app=FLOOR_APP, deployment=FLOOR_DEPLOYMENT).items()})
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform(), "load_avg": list(os.getloadavg())}
    finally:
        stop_feed.set()
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - nothing started
            pass
        if ray.is_initialized():
            ray.shutdown()
        if setup is not None:
            setup.redis.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if result.get("errors", 1) == 0 else 1


def _figures(name: str, run: RunResult) -> dict[str, float]:
    return {f"{name}_rps": round(run.rps, 1), f"{name}_p50_ms": round(run.pct(50), 3),
            f"{name}_p99_ms": round(run.pct(99), 3)}


def wait_floor(url: str, timeout_s: float) -> None:
    """Wait until the floor deployment answers through the ingress."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}{FLOOR_PREFIX}", content=b"{}", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the floor deployment did not answer within {timeout_s:.0f} s")


def settle(client: "ClosedLoopClient", connections: int, log: Callable[[str], None],
           app: str | None = None, deployment: str | None = None,
           chunk_s: float = 2.0, stable_chunks: int = 5, max_s: float = 60.0) -> float:
    """Load at ``connections`` until the autoscaler is done: the replica count unchanged for
    ``stable_chunks`` chunks in a row (longer than its look-back plus upscale delay). A run
    then measures the deployment the load settles on, not a scaling transition. Returns the
    seconds it took."""
    t0 = time.monotonic()
    last, same = _running_replicas(app, deployment), 0
    while same < stable_chunks and time.monotonic() - t0 < max_s:
        client.run(connections, chunk_s, warmup_s=0.0)
        now = _running_replicas(app, deployment)
        same = same + 1 if now == last else 0
        if now != last:
            log(f"{app or 'app'} c{connections} warm-up: replicas {last} -> {now}")
        last = now
    return time.monotonic() - t0


def spike(host: str, port: int, requests: list[bytes], log: Callable[[str], None],
          base: int = 2, burst_factor: int = 10, base_s: float = 8.0, burst_s: float = 20.0,
          after_s: float = 30.0, per_connection_rps: float = 200.0, app: str | None = None,
          deployment: str | None = None) -> dict[str, Any]:
    """A 10x burst: ``base`` connections paced at ``per_connection_rps``, then ten times as
    many, then ``base`` again; replicas sampled every 0.5 s throughout. Latency counts from
    each request's slot on the schedule (see :meth:`ClosedLoopClient.run`)."""
    deadline = time.monotonic() + 90
    while _running_replicas(app, deployment) > 1 and time.monotonic() < deadline:  # from one replica
        time.sleep(1.0)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, _running_replicas(app, deployment)))
            stop.wait(0.5)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    client = ClosedLoopClient(host, port, requests)
    pace = per_connection_rps
    before = client.run(base, base_s, warmup_s=0.5, per_connection_rps=pace)
    t_burst = time.monotonic() - t0
    burst = client.run(base * burst_factor, burst_s, warmup_s=0.0, per_connection_rps=pace)
    t_after = time.monotonic() - t0
    after = client.run(base, after_s, warmup_s=0.0, per_connection_rps=pace)
    stop.set()
    th.join()
    during = [n for t, n in samples if t_burst <= t <= t_after]
    tail = [n for t, n in samples if t >= t_after + after_s - 5]
    out = {
        "spike_base_connections": base, "spike_burst_connections": base * burst_factor,
        "spike_per_connection_rps": pace, "spike_offered_burst_rps": pace * base * burst_factor,
        "spike_base_rps": round(before.rps, 1),
        "spike_replicas_before": max((n for t, n in samples if t < t_burst), default=-1),
        "spike_replicas_max": max(during, default=-1),
        "spike_replicas_end": min(tail, default=-1),
        "spike_burst_rps": round(burst.rps, 1), "spike_burst_p50_ms": round(burst.pct(50), 2),
        "spike_burst_p99_ms": round(burst.pct(99), 2), "spike_burst_backlog": burst.backlog,
        "spike_base_p99_ms": round(before.pct(99), 2), "spike_after_p99_ms": round(after.pct(99), 2),
        "spike_errors": before.errors + burst.errors + after.errors,
        "spike_statuses": {"base": before.statuses, "burst": burst.statuses, "after": after.statuses},
        "spike_reconnects": before.reconnects + burst.reconnects + after.reconnects,
        "spike_replica_timeline": [(round(t, 1), n) for t, n in samples[::2]],
    }
    log(f"{app or 'app'} spike: replicas {out['spike_replicas_before']} -> {out['spike_replicas_max']} -> "
        f"{out['spike_replicas_end']}; burst {burst.rps:,.0f} of {out['spike_offered_burst_rps']:,.0f} "
        f"req/s offered, p50 {burst.pct(50):.2f} ms p99 {burst.pct(99):.2f} ms from the intended "
        f"send time, backlog {burst.backlog}; errors {out['spike_errors']}")
    return out


def _metric_all(text: str, name: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            try:
                out.append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return out


def _metric(text: str, name: str) -> float:
    vals = _metric_all(text, name)
    return vals[0] if vals else float("nan")


if __name__ == "__main__":
    sys.exit(main())
