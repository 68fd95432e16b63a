"""Serving benchmark: closed-loop HTTP load on the real prediction API.

``python -m bench.serve [--duration 10] [--batch-assets 1000] [--no-spike]``

What it sets up (all in a temporary data dir, removed at the end): an embedded Redis, a real
model (XGBoost quantile regression on the shared BTC/USD bars, exported to ONNX, conformal
calibrated, registered as champion) and a second one as challenger, so both slots hold real,
different models; the BTC-USD online features computed from those bars replayed at live time;
``--batch-assets`` more assets served by the same model file (a pooled model: each asset has
its own registry version, its own online feature row taken from a different minute of the real
history, and its own last bar in the bar store). Then a private Ray instance and the Serve app
with HAProxy ingress on a free port, shadow mode on and a 10 % green canary, so every request
runs two models (served + shadow) and writes two prediction-log entries.

What it measures, after a warm-up: closed-loop load at 1, 8 and 32 connections on
``POST /v1/predict`` (one asset, online features); a batch run of ``--batch-assets`` assets
per ``POST /v1/predict/batch`` request (each run preceded by the same load until the
autoscaler has settled, so it measures the replica count that load settles on, reported as
``replicas``); and (unless ``--no-spike``) an autoscaling spike:
2 connections, then 20 (10x), then 2 again, each paced at 200 req/s (400, then 4,000 req/s
offered: more than one replica serves here), sampling the replica count; it starts once the batch runs' extra replica is gone.

The load client is part of this file (:class:`ClosedLoopClient`): raw asyncio protocols over
keep-alive connections, uvloop, request bytes prebuilt once, the next request written from
``data_received`` with no coroutine switch. Its own CPU use (process CPU time during the run
divided by wall time, which also counts the Ray driver threads of this process, so it is an
upper bound) is reported per run as ``*_client_cpu``.

The last line is one JSON object with ``c1_rps, c1_p50_ms, c1_p99_ms, c8_rps, c8_p50_ms,
c8_p99_ms, c32_rps, c32_p99_ms, batch_predictions_per_s, errors`` and more.
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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


class _Conn(asyncio.Protocol):
    """One keep-alive connection issuing requests back to back (closed loop)."""

    def __init__(self, client: "ClosedLoopClient", requests: list[bytes], offset: int) -> None:
        self.client = client
        self.requests = requests
        self.i = offset
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.t0 = 0
        self.pending = False  # a request is out and its response not complete
        self.loop = asyncio.get_event_loop()
        self.closed = self.loop.create_future()
        self.next_at = 0.0  # paced runs: loop time of this connection's next request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        if not self.client.running:
            assert self.transport is not None
            self.transport.close()
            return
        req = self.requests[self.i % len(self.requests)]
        self.i += 1
        self.t0 = time.perf_counter_ns()
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
        interval = self.client.interval_s
        if not interval:
            self._send()
            return
        # Paced: one request per interval on a fixed schedule; a late one goes at once.
        now = self.loop.time()
        self.next_at = max(self.next_at + interval, now)
        if self.next_at <= now:
            self._send()
        else:
            self.loop.call_at(self.next_at, self._send_if_open)

    def _send_if_open(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        # A server may close a keep-alive connection between requests (HAProxy does on each
        # reload, e.g. when autoscaling adds a replica): like any HTTP client, reconnect. Only
        # a request that was out without its response counts as an error.
        if self.pending and self.client.recording:
            self.client.errors += 1
            self.client.statuses[0] = self.client.statuses.get(0, 0) + 1
        if self.client.running:
            self.client.reconnect(self.i)
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
        self.interval_s = 0.0

    def reconnect(self, offset: int) -> None:
        """Open a replacement connection (the server closed one)."""
        self.reconnects += 1
        loop = asyncio.get_running_loop()
        proto = _Conn(self, self.requests, offset)
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
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        self.running = False
        await asyncio.wait([c.closed for c in self._conns if c.transport is not None], timeout=10)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        lat = np.asarray(self._lat, dtype=np.float64) / 1e6
        return RunResult(connections, wall, len(lat), self.errors, dict(self.statuses), lat, cpu / wall,
                         self.reconnects)

    def run(self, connections: int, seconds: float, warmup_s: float = 1.0,
            on_tick: Callable[[float], None] | None = None,
            per_connection_rps: float | None = None) -> RunResult:
        """Run the load for ``seconds`` after ``warmup_s`` (not recorded); blocking.

        ``per_connection_rps`` paces each connection (at most that many requests a second),
        so that 10x the connections is 10x the offered load while the server keeps up.
        """
        self.interval_s = 1.0 / per_connection_rps if per_connection_rps else 0.0
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


def prepare(data_dir: Path, batch_assets: int, rounds: int, log: Callable[[str], None],
            overrides: list[str] | None = None) -> Setup:
    """Models, features and bars in a fresh data dir (no Ray yet)."""
    from serve_app import model_kit as mk
    from tickcast.config import load_settings
    from tickcast.net import free_port
    from tickcast.redis_server import EmbeddedRedis, connect
    from tickcast.storage.bar_store import BarStore
    from tickcast.storage.online_store import OnlineFeatureStore
    from training.registry import ModelRegistry, registry_root

    timings: dict[str, float] = {}
    t = time.monotonic()
    srv = EmbeddedRedis.start(data_dir)
    port = free_port()
    settings = load_settings(overrides=[
        f"data_dir={data_dir}", f"redis.url={srv.url}", f"serve.port={port}",
        "serve.admin_token=bench-token", "serve.shadow_default=true", *(overrides or []),
    ])
    freq = settings.bars.freq_s * 1_000_000_000
    bars = mk.venue_bars(SHARED_DATA)
    log(f"bars: {len(bars)} real BTC/USD 1-minute bars")
    half = len(bars) // 2
    champion_model = mk.train_quick_model(settings, bars.iloc[:half], rounds=rounds, seed=1)
    challenger_model = mk.train_quick_model(settings, bars.iloc[half // 2: half + half // 2],
                                            rounds=rounds, seed=2)
    timings["train_s"] = time.monotonic() - t
    log(f"trained two models ({rounds} rounds x 3 quantiles) in {timings['train_s']:.1f} s")
    registry = ModelRegistry(registry_root(settings))
    champion = mk.register_model(registry, "BTC-USD", champion_model, alias="champion")
    challenger = mk.register_model(registry, "BTC-USD", challenger_model, alias="challenger")

    live = mk.shift_to_live(bars, freq)
    store = BarStore(Path(data_dir) / "bars", fsync=False)
    store.upsert("BTC-USD", "consensus", live.iloc[-2000:])
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
    pipe_rows = []
    for asset, row in zip(assets, picks):
        mk.register_model(registry, asset, champion_model, alias="champion")
        bar = bars.iloc[[int(row)]].copy()
        bar["ts"] = last_ts
        store.upsert(asset, "consensus", bar)
        pipe_rows.append((asset, hist.iloc[int(row)].to_numpy(np.float64)))
        closes[asset] = float(bar["close"].iloc[0])
    for asset, values in pipe_rows:
        online.write(asset, last_ts, sh, names, values, close=closes[asset])
        rows[asset] = values
    timings["batch_assets_setup_s"] = time.monotonic() - t
    log(f"{batch_assets} pooled-model assets registered with features and bars in "
        f"{timings['batch_assets_setup_s']:.1f} s")
    return Setup(data_dir=data_dir, redis=srv, settings=settings,
                 url=f"http://127.0.0.1:{port}", assets=assets, champion=champion,
                 challenger=challenger, timings=timings, feature_rows=rows, closes=closes)


def _running_replicas() -> int:
    from ray import serve

    from serve_app.app import APP_NAME, DEPLOYMENT_NAME

    try:
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
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
    parser.add_argument("--rounds", type=int, default=80, help="boosting rounds of the models")
    parser.add_argument("--no-spike", action="store_true", help="skip the autoscaling spike")
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
    try:
        setup = prepare(data_dir, args.batch_assets, args.rounds, log, args.set)
        setup.keep_features_live(stop_feed)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        t = time.monotonic()
        url = start_serving(setup.settings, setup.redis.url, wait_ready_s=180)
        health = wait_ready(url, 1 + args.batch_assets, 300, log)
        log(f"serving at {url} (ready in {time.monotonic() - t:.1f} s): {health['status']}")
        import httpx

        admin = {"Authorization": "Bearer bench-token"}
        r = httpx.post(f"{url}/v1/admin/traffic", json={"green_weight": 0.1, "shadow": not args.no_shadow,
                                                         "assets": ["BTC-USD"]}, headers=admin, timeout=60)
        r.raise_for_status()
        host, port = "127.0.0.1", setup.settings.serve.port
        single = [http_post(host, port, "/v1/predict", b'{"asset":"BTC-USD"}',
                            {"X-Request-Key": f"client-{i}"}) for i in range(64)]
        client = ClosedLoopClient(host, port, single)
        log("warm-up")
        client.run(1, args.warmup, warmup_s=0.5)
        runs: dict[str, RunResult] = {}
        for c in (int(x) for x in args.runs.split(",") if x):
            settled = settle(client, c, log)
            res = client.run(c, args.duration, warmup_s=1.0)
            res.settle_s, res.replicas = settled, _running_replicas()
            runs[f"c{c}"] = res
            log(f"c{c}: {res.rps:,.0f} req/s p50 {res.pct(50):.2f} ms p99 {res.pct(99):.2f} ms "
                f"errors {res.errors} statuses {res.statuses} client cpu {res.client_cpu:.2f} "
                f"replicas {res.replicas}")
        batch_runs: dict[str, RunResult] = {}
        for fmt in ("columns", "records"):
            batch_body = json.dumps({"assets": setup.assets, "format": fmt}).encode()
            bclient = ClosedLoopClient(host, port, [http_post(host, port, "/v1/predict/batch", batch_body)])
            settled = settle(bclient, args.batch_connections, log)
            res = bclient.run(args.batch_connections, args.duration, warmup_s=1.0)
            res.settle_s, res.replicas = settled, _running_replicas()
            batch_runs[fmt] = res
            log(f"batch x{args.batch_assets} ({fmt}): {res.rps:,.1f} req/s = "
                f"{res.rps * args.batch_assets:,.0f} predictions/s p50 {res.pct(50):.1f} ms "
                f"p99 {res.pct(99):.1f} ms errors {res.errors} replicas {res.replicas}")
        bres = batch_runs["columns"]
        stats = httpx.get(f"{url}/metrics", timeout=30).text
        log_written = _metric(stats, "tickcast_serve_prediction_log_written_total")
        log_dropped = sum(_metric_all(stats, "tickcast_serve_prediction_log_dropped_total"))
        redis = connect(setup.redis.url)
        result = {}
        for name, run in runs.items():
            result.update({f"{name}_rps": round(run.rps, 1), f"{name}_p50_ms": round(run.pct(50), 3),
                           f"{name}_p99_ms": round(run.pct(99), 3)})
        result.update({
            "batch_predictions_per_s": round(bres.rps * args.batch_assets, 0),
            "batch_rps": round(bres.rps, 2), "batch_p99_ms": round(bres.pct(99), 2),
            "batch_format": "columns",
            "batch_records_predictions_per_s": round(batch_runs["records"].rps * args.batch_assets, 0),
            "batch_records_p99_ms": round(batch_runs["records"].pct(99), 2),
            "batch_assets": args.batch_assets, "batch_connections": args.batch_connections,
            "errors": int(sum(r.errors for r in runs.values()) + sum(r.errors for r in batch_runs.values())),
            "client_cpu": {k: round(v.client_cpu, 3) for k, v in runs.items()} | {"batch": round(bres.client_cpu, 3)},
            "replicas": {k: v.replicas for k, v in runs.items()} | {f"batch_{k}": v.replicas for k, v in batch_runs.items()},
            "settle_s": {k: round(v.settle_s, 1) for k, v in runs.items()} | {f"batch_{k}": round(v.settle_s, 1) for k, v in batch_runs.items()},
            "client_cpu_us_per_request": {k: round(1e6 * v.client_cpu / v.rps, 1) for k, v in runs.items() if v.rps},
            "prediction_log_written": log_written, "prediction_log_dropped": log_dropped,
            "prediction_stream_len": sum(int(redis.xlen(prediction_stream_key(setup.settings.serve.prediction_stream, a))) for a in ["BTC-USD", *setup.assets]),
            "setup": {"shadow": not args.no_shadow, "green_weight": 0.1,
                      "models_per_request": 1 if args.no_shadow else 2,
                      "rounds": args.rounds, "duration_s": args.duration,
                      "autoscaling": setup.settings.serve.autoscaling.model_dump(),
                      "overrides": args.set, **{k: round(v, 1) for k, v in setup.timings.items()}},
        })
        if not args.no_spike:
            result.update(spike(host, port, single, log))
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


def settle(client: "ClosedLoopClient", connections: int, log: Callable[[str], None],
           chunk_s: float = 2.0, stable_chunks: int = 5, max_s: float = 60.0) -> float:
    """Load at ``connections`` until the autoscaler is done: the replica count unchanged for
    ``stable_chunks`` chunks in a row (longer than its look-back plus upscale delay). A run
    then measures the deployment the load settles on, not a scaling transition. Returns the
    seconds it took."""
    t0 = time.monotonic()
    last, same = _running_replicas(), 0
    while same < stable_chunks and time.monotonic() - t0 < max_s:
        client.run(connections, chunk_s, warmup_s=0.0)
        now = _running_replicas()
        same = same + 1 if now == last else 0
        if now != last:
            log(f"c{connections} warm-up: replicas {last} -> {now}")
        last = now
    return time.monotonic() - t0


def spike(host: str, port: int, requests: list[bytes], log: Callable[[str], None],
          base: int = 2, burst_factor: int = 10, base_s: float = 8.0, burst_s: float = 20.0,
          after_s: float = 30.0, per_connection_rps: float = 200.0) -> dict[str, Any]:
    """A 10x burst: ``base`` connections paced at ``per_connection_rps``, then ten times as
    many, then ``base`` again; replicas sampled every 0.5 s throughout."""
    deadline = time.monotonic() + 90
    while _running_replicas() > 1 and time.monotonic() < deadline:  # start from one replica
        time.sleep(1.0)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, _running_replicas()))
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
        "spike_per_connection_rps": pace, "spike_base_rps": round(before.rps, 1),
        "spike_replicas_before": max((n for t, n in samples if t < t_burst), default=-1),
        "spike_replicas_max": max(during, default=-1),
        "spike_replicas_end": min(tail, default=-1),
        "spike_burst_rps": round(burst.rps, 1), "spike_burst_p99_ms": round(burst.pct(99), 2),
        "spike_base_p99_ms": round(before.pct(99), 2), "spike_after_p99_ms": round(after.pct(99), 2),
        "spike_errors": before.errors + burst.errors + after.errors,
        "spike_statuses": {"base": before.statuses, "burst": burst.statuses, "after": after.statuses},
        "spike_reconnects": before.reconnects + burst.reconnects + after.reconnects,
        "spike_replica_timeline": [(round(t, 1), n) for t, n in samples[::2]],
    }
    log(f"spike: replicas {out['spike_replicas_before']} -> {out['spike_replicas_max']} -> "
        f"{out['spike_replicas_end']}; burst {burst.rps:,.0f} req/s p99 {burst.pct(99):.2f} ms; "
        f"errors {out['spike_errors']} statuses {out['spike_statuses']}")
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
