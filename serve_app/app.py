"""The prediction API: one Ray Serve FastAPI-ingress deployment, one hop per request.

Hot path (``POST /v1/predict``)::

    client ──HTTP/1.1 keep-alive──► HAProxy (Serve's ingress, RAY_SERVE_ENABLE_HA_PROXY=1)
           ──► a replica's own HTTP server (uvicorn; the app on the replica's event loop,
               ``serve.user_code_thread`` off) ──► :class:`PredictFastPath`, inline:
               pydantic body → ServingView lookup (precomputed feature row per asset & slot)
               → sticky hash → compiled tree kernel (served slot, + shadow slot) → conformal
               interval → JSON; prediction rows appended to an in-memory queue

There is no DeploymentHandle on the request path: every replica holds both slots' models of
every asset (:mod:`serve_app.slots`), a copy of the online features and safety state
(:mod:`serve_app.feature_cache`), and the routing table; background threads keep all three
fresh from Redis and the registry and swap immutable snapshots. On this 2-core machine one
handle hop costs 3-7x throughput. A single prediction costs ~60 µs with the compiled kernel
(9 µs a model), less than handing it to a thread and back, so it runs on the event loop; a
1,000-asset batch (~5 ms) goes to scoring threads so it never stalls the loop. Serve's second
event-loop thread for app code is turned off: each ASGI message crossing threads cost more
than the whole prediction (measured in bench.serve at 8 connections: 2,240 req/s, p99 8.6 ms
with both hops; 3,450 req/s, p99 6.6 ms with neither).

Other endpoints: ``POST /v1/predict/batch`` (vectorized), ``GET /v1/health``,
``GET /v1/models``, ``POST /v1/admin/{traffic,promote,rollback}`` (bearer token),
``GET /metrics`` (Prometheus text merged over replicas), OpenAPI at ``/docs``.
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import orjson
import redis
from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import schemas
from serve_app.autoscaling import BUSY_METRIC, BusyMeter, policy_config
from serve_app.control import RoutingStore, TrafficControl
from serve_app.feature_cache import FeatureCache
from serve_app.metrics import (ModelFault, ModelKey, ServeMetrics, merge_snapshots,
                               render_prometheus)
from serve_app.prediction_log import PredictionLogger, Row
from serve_app.predictor import (AssetView, BatchResult, ModelFailed, ModelUnusable, Scored,
                                 ServingView)
from serve_app.request_clock import (RequestClock, RequestTag, install_arrival_stamp,
                                     tag_of)
from serve_app.routing import sticky_unit
from serve_app.sessions import SessionBook
from serve_app.slots import ModelLoader, SlotManager
from tickcast.config import Settings
from tickcast.errors import (Forbidden, InvalidInput, ServiceUnavailable, TickcastError,
                             Unauthorized)
from tickcast.net import free_port
from tickcast.redis_server import connect, redact
from tickcast.ticks import NS_PER_S
from training.registry import ModelRegistry, registry_root

log = logging.getLogger(__name__)

APP_NAME = "tickcast"
DEPLOYMENT_NAME = "tickcast-predictor"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PREDICT_ENDPOINTS = frozenset({"predict", "batch"})  # what the Ray metrics (Grafana's SLA) cover
_JSON = "application/json"
ERRORS = {code: {"model": schemas.ErrorResponse} for code in (404, 409, 413, 422, 500, 503)}
ADMIN_ERRORS = {code: {"model": schemas.ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 503)}
# Headers the prediction handlers read from the request itself (declaring them as FastAPI
# parameters would cost a dependency resolution per request, ~7 % of a replica's CPU).
REQUEST_HEADERS = {"parameters": [
    {"name": "X-Request-Key", "in": "header", "required": False,
     "description": "Sticky A/B key (`serve.sticky_header`): the same key, the same slot.",
     "schema": {"type": "string", "maxLength": 256}},
    {"name": "X-Request-ID", "in": "header", "required": False,
     "description": "Request id echoed back and logged (letters, digits, `._:-`, at most 64).",
     "schema": {"type": "string", "maxLength": 256}},
]}

app = FastAPI(
    title="tickcast prediction API",
    version="1.0",
    description="Next-bar log-return forecasts with calibrated 90% intervals, served from blue/"
                "green model slots. Admin endpoints need `Authorization: Bearer <token>`.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)


class HeaderGetter(Protocol):
    """Anything with ``get(lowercase_name)``: Starlette headers or a plain dict."""

    def get(self, key: str, default: Any = None) -> Any: ...


class _Runtime:
    """Per-process settings the module-level middleware and handlers need."""

    max_body_bytes: int = 1_048_576
    body_drain_bytes: int = 262_144
    replica: "PredictorReplica | None" = None


_RUNTIME = _Runtime()
# The request clock starts when the replica's HTTP server reads a request (see
# serve_app.request_clock): this module is imported in every replica before its server starts.
ARRIVAL_STAMP = install_arrival_stamp()


# ----------------------------------------------------------------------- errors and limits
class BodyTooLarge(TickcastError):
    """Request body above ``serve.max_body_bytes`` (HTTP 413)."""

    status = 413
    code = "too_large"


class BatchModelsFailed(TickcastError):
    """No asset of a batch could be served and models failed (HTTP 500); each failing model
    is already counted against itself."""

    status = 500
    code = ModelFailed.code


def now_iso() -> str:
    """The server's current time, ISO 8601 UTC with microseconds (``…Z``).

    >>> import re; bool(re.fullmatch(r"\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{6}Z", now_iso()))
    True
    """
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_iso_second(seconds)}.{micros:06d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(seconds: int) -> str:
    # Per second, not per call: datetime formatting cost ~3 % of a request (py-spy).
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def error_body(exc: TickcastError, request_id: str | None = None) -> dict[str, Any]:
    """The JSON object of an error answer (schema :class:`serve_app.schemas.ErrorResponse`)."""
    body = exc.to_dict()
    if request_id:
        body["request_id"] = request_id
    body["timestamp"] = now_iso()
    return body


def _note_error(scope: Scope, code: str) -> None:
    tag = tag_of(scope)
    if tag is not None:
        tag.error = code


def _error_response(exc: TickcastError, request_id: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(error_body(exc, request_id), status_code=exc.status, headers=headers)


@app.exception_handler(TickcastError)
async def _tickcast_error(request: Request, exc: TickcastError) -> JSONResponse:
    _note_error(request.scope, exc.code)
    return _error_response(exc, getattr(exc, "request_id", None))


def _loc_field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_body(errors: list[Any]) -> dict[str, Any]:
    """The 422 body for pydantic / FastAPI validation errors: the first field at fault named."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = "body" if first.get("type") == "json_invalid" else _loc_field(first.get("loc", ("body",)))
    return {"error": "invalid_input", "detail": f"{field}: {first.get('msg', 'invalid')}",
            "field": field,
            "errors": [{"field": _loc_field(e.get("loc", ())), "msg": str(e.get("msg", ""))}
                       for e in errors[:20]],
            "timestamp": now_iso()}


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _note_error(request.scope, "invalid_input")
    return JSONResponse(validation_body(list(exc.errors())), status_code=422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A defect of ours, never a client's mistake: logged with its traceback, answered 500.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    _note_error(request.scope, "internal")
    return JSONResponse({"error": "internal", "detail": f"{type(exc).__name__}",
                         "timestamp": now_iso()}, status_code=500)


class BodyLimitMiddleware:
    """Refuses request bodies above ``serve.max_body_bytes`` with 413 before parsing them.

    A declared ``Content-Length`` above the limit is refused without parsing; a chunked body
    is read here as it arrives and refused as soon as it crosses the limit. Either way up to
    ``drain()`` bytes of the excess (``serve.body_drain_bytes``) are read and discarded first,
    so the connection ends on a message boundary and stays open for the next request, the way
    Go's net/http does it. Answering with the body still unread makes the HTTP server reset
    the connection, and the ingress then drops the client's connection under a client about
    to reuse it. Bigger bodies get the 413 at once, marked ``Connection: close``.
    """

    def __init__(self, app: ASGIApp, limit: Callable[[], int], drain: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, drain = self.limit(), self.drain()
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            if not declared.isdigit():
                await _send_error(scope, send, InvalidInput("Content-Length is not a number",
                                                            field="Content-Length"), close=True)
                return
            if int(declared) > limit:
                ended = int(declared) <= limit + drain and await _drain(receive, drain)
                await _send_error(scope, send, BodyTooLarge(
                    f"request body of {int(declared)} bytes exceeds serve.max_body_bytes = {limit}",
                    field="body"), close=not ended)
                return
            # The HTTP server holds the body to its declared length: nothing more to count.
            await self.app(scope, receive, send)
            return
        # Chunked (no length declared): read it here, up to the limit, then hand it on. An
        # exception raised from inside the app's body read would be turned into a 400 by FastAPI.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                ended = not message.get("more_body", False) or await _drain(receive, drain)
                await _send_error(scope, send, BodyTooLarge(
                    f"request body exceeds serve.max_body_bytes = {limit}", field="body"),
                    close=not ended)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive: Receive, budget: int) -> bool:
    """Reads and discards the rest of a request body, at most ``budget`` bytes; True when the
    body ended within it (False: too big, or the client went away)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if budget < 0:
            return False
        if not message.get("more_body", False):
            return True


async def _send_error(scope: Scope, send: Send, exc: TickcastError, close: bool) -> None:
    _note_error(scope, exc.code)
    body = json.dumps(error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PredictFastPath:
    """``POST /v1/predict`` with a JSON body, served without the framework's routing layers.

    The same model class validates the body (``PredictRequest.model_validate_json``), the same
    replica method scores it and the same error bodies come back; what is skipped is Starlette
    routing, FastAPI's dependency resolution and its middleware stack, ~15 % of a replica's
    interpreter time per request (py-spy, 1.4k req/s). Any other request, or a body that is not
    declared JSON, goes through FastAPI as usual (which also documents this route).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        replica = _RUNTIME.replica
        if (scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST"
                or replica is None):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "")
        if not ctype.startswith("application/json") or "content-length" not in headers:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        tag = tag_of(scope)
        try:
            body = schemas.PredictRequest.model_validate_json(raw)
        except ValidationError as exc:
            _note_error(scope, "invalid_input")
            await _send_json(send, 422, _dumps(validation_body(exc.errors(include_url=False))))
            return
        try:
            if body.explain:  # TreeSHAP takes milliseconds: a scoring thread, never the loop
                out = await replica._scoring(replica.predict_bytes, body, headers, tag)
            else:
                out = await replica._single(replica.predict_bytes, body, headers, tag)
        except TickcastError as exc:
            await _send_json(send, exc.status, _dumps(error_body(exc, getattr(exc, "request_id", None))),
                             [(b"www-authenticate", b"Bearer")] if exc.status == 401 else None)
            return
        await _send_json(send, 200, out)


async def _send_json(send: Send, status: int, body: bytes,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


# Module-level functions, not lambdas: Serve pickles the FastAPI app, and a lambda would carry
# a frozen copy of _RUNTIME instead of reading the replica's live settings.
def _body_limit() -> int:
    return _RUNTIME.max_body_bytes


def _body_drain() -> int:
    return _RUNTIME.body_drain_bytes


def _report(tag: RequestTag, status: int, latency_ms: float) -> None:
    replica = _RUNTIME.replica
    if replica is not None:
        replica.record_request(tag, status, latency_ms)


app.add_middleware(PredictFastPath)
# The size limit applies before anything reads a body.
app.add_middleware(BodyLimitMiddleware, limit=_body_limit, drain=_body_drain)
# Added last, so outermost: every request is timed and counted, whatever answers it.
app.add_middleware(RequestClock, report=_report)


def require_admin(authorization: str | None = Header(None, description="Bearer <admin token>")) -> None:
    """Admin guard: 403 when admin is disabled (no token configured), 401 on a bad token."""
    replica = _RUNTIME.replica
    token = replica.admin_token if replica is not None else None
    if not token:
        raise Forbidden("admin endpoints are disabled: set serve.admin_token or TICKCAST_ADMIN_TOKEN",
                        field="Authorization")
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized("missing bearer token", field="Authorization")
    given = authorization[len("Bearer "):].strip().encode()
    if not hmac.compare_digest(given, token.encode()):
        raise Unauthorized("invalid bearer token", field="Authorization")


# ----------------------------------------------------------------------- helpers
def _finite(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return x


@functools.lru_cache(maxsize=4096)
def _iso(ns: int | None) -> str | None:
    # Cached: bar times change once a bar per asset, and formatting cost ~1.5 % of a replica.
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / NS_PER_S, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _price_fields(s: Scored) -> tuple[float | None, float | None, float | None]:
    if s.price is None:
        return None, None, None
    try:
        return (_finite(s.price * math.exp(s.pred)), _finite(s.price * math.exp(s.lo)),
                _finite(s.price * math.exp(s.hi)))
    except OverflowError:
        return None, None, None


def forecast_status(halted: bool, calibrated: bool) -> str:
    """A forecast's ``status`` (:class:`serve_app.schemas.ForecastStatus`): ``halted`` when the
    safety breaker holds exposure at zero, ``uncalibrated`` when the model has no conformal
    state (the raw quantiles are served), else ``ok``."""
    if halted:
        return schemas.ForecastStatus.HALTED.value
    return schemas.ForecastStatus.OK.value if calibrated else schemas.ForecastStatus.UNCALIBRATED.value


def prediction_body(s: Scored, latency_ms: float | None, request_id: str | None) -> dict[str, Any]:
    """The JSON object of one prediction (schema :class:`serve_app.schemas.Prediction`)."""
    pred_price, lo_price, hi_price = _price_fields(s)
    return {
        "asset": s.asset, "slot": s.slot, "model_version": s.version,
        "status": forecast_status(s.safety.halted, s.calibrated),
        "pred_log_return": _finite(s.pred), "lo_log_return": _finite(s.lo),
        "hi_log_return": _finite(s.hi), "coverage": s.coverage,
        "price": s.price, "pred_price": pred_price, "lo_price": lo_price, "hi_price": hi_price,
        "bar_ts": s.bar_ts, "bar_time": _iso(s.bar_ts),
        "feature_age_s": None if s.age_s is None else round(s.age_s, 3),
        "regime": s.safety.regime, "multiplier": s.safety.multiplier, "halted": s.safety.halted,
        "timestamp": now_iso(), "latency_ms": latency_ms, "request_id": request_id,
    }


def batch_columns(res: BatchResult) -> dict[str, list[Any] | np.ndarray]:
    """The fields of :class:`serve_app.schemas.Prediction` (minus latency and request id) as
    one column per field, computed on whole arrays.

    Numeric columns stay float64 arrays: :func:`_dumps` writes them directly, NaN and
    infinities (a missing price, an overflowing exponent) as ``null``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        pred_price = res.price * np.exp(res.pred)
        lo_price = res.price * np.exp(res.lo)
        hi_price = res.price * np.exp(res.hi)
    bar_ts = [None if b < 0 else b for b in res.bar_ts.tolist()]  # -1: explicit features
    times = {b: _iso(b) for b in set(bar_ts)}
    halted = np.asarray(res.halted, dtype=bool)
    calibrated = np.ones(len(res), dtype=bool) if res.calibrated is None else res.calibrated
    status = np.where(halted, schemas.ForecastStatus.HALTED.value,
                      np.where(calibrated, schemas.ForecastStatus.OK.value,
                               schemas.ForecastStatus.UNCALIBRATED.value)).tolist()
    return {
        "asset": res.asset, "slot": res.slot, "model_version": res.version, "status": status,
        "pred_log_return": res.pred, "lo_log_return": res.lo, "hi_log_return": res.hi,
        "coverage": res.coverage, "price": res.price, "pred_price": pred_price,
        "lo_price": lo_price, "hi_price": hi_price,
        "bar_ts": bar_ts, "bar_time": [times[b] for b in bar_ts],
        "feature_age_s": np.round(res.age_s, 3), "regime": res.regime,
        "multiplier": res.multiplier, "halted": res.halted,
    }


def _count_slots(slots: list[str]) -> tuple[int, int]:
    blue = slots.count("blue")
    return blue, len(slots) - blue


def result_from_scored(served: list[Scored], shadows: list[Scored]) -> BatchResult:
    """A :class:`BatchResult` from single predictions (the explicit-rows path)."""
    def arr(items: list[Scored], attr: str, dtype: Any = np.float64) -> np.ndarray:
        return np.asarray([np.nan if getattr(s, attr) is None else getattr(s, attr) for s in items], dtype=dtype)

    return BatchResult(
        asset=[s.asset for s in served], slot=[s.slot for s in served],
        version=[s.version for s in served], pred=arr(served, "pred"), lo=arr(served, "lo"),
        hi=arr(served, "hi"), coverage=arr(served, "coverage"), price=arr(served, "price"),
        bar_ts=np.asarray([-1 if s.bar_ts is None else s.bar_ts for s in served], dtype=np.int64),
        age_s=arr(served, "age_s"), regime=[s.safety.regime for s in served],
        multiplier=[s.safety.multiplier for s in served], halted=[s.safety.halted for s in served],
        shadow_asset=[s.asset for s in shadows], shadow_slot=[s.slot for s in shadows],
        shadow_version=[s.version for s in shadows], shadow_pred=arr(shadows, "pred"),
        shadow_lo=arr(shadows, "lo"), shadow_hi=arr(shadows, "hi"), shadow_price=arr(shadows, "price"),
        shadow_bar_ts=np.asarray([-1 if s.bar_ts is None else s.bar_ts for s in shadows], dtype=np.int64),
        errors=[], calibrated=np.asarray([s.calibrated for s in served], dtype=bool))


def _dumps(obj: Any) -> bytes:
    """Compact JSON; numpy arrays written natively, NaN and infinities as ``null``.

    orjson, because the standard encoder took 3.5 of the 6 ms a 1,000-asset batch cost.
    """
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _log_row(request_id: str, s: Scored, shadow: bool) -> Row:
    return (request_id, s.asset, s.slot, s.version, s.bar_ts, s.pred, s.lo, s.hi, s.price, shadow)


def haproxy_env(drain_period_s: float = 5.0, threads: int = 1,
                run_dir: str | Path | None = None, isolated: bool = True) -> dict[str, str]:
    """Environment for Serve's controller (inherited by its proxies and replicas).

    HAProxy ingress on. Its stats and Prometheus ports, its fallback proxy's ports (8500, 9500)
    and its files (config, admin socket, server state, metrics socket: all under
    ``/tmp/haproxy-serve``) default to fixed values, and on a shared host two Serve instances
    would collide: one's HAProxy reloads the other's config. So each instance gets free ports
    and its own ``run_dir`` (a fresh temporary directory when not given). A stopping
    replica stays reachable for ``drain_period_s`` so HAProxy (reloaded within about half a
    second on one node) stops sending it requests before it closes: scale-down drops nothing.
    Ray's default of 30 s would make every deletion and downscale take that long. HAProxy's
    thread count defaults to 4 in Ray; on a 2-core host one thread is enough and contends less.

    ``isolated=False`` (a deployment config for a cluster whose Serve is alone on its nodes,
    ``tickcast.serve_deploy``) keeps Ray's fixed ports and files, so the config is the same
    wherever it is generated.
    """
    if not isolated:
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(drain_period_s),
                "RAY_SERVE_HAPROXY_NBTHREAD": str(threads)}
    run = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="tickcast-haproxy-"))
    run.mkdir(parents=True, exist_ok=True)
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run / "metrics.sock"),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(drain_period_s),
            "RAY_SERVE_HAPROXY_NBTHREAD": str(threads)}


# ----------------------------------------------------------------------- the replica
class PredictorReplica:
    """One serving replica: models, features, routing and logging, all in process.

    Parameters
    ----------
    settings_json
        The whole configuration (``Settings.model_dump_json()``).
    redis_url
        Redis to read features, safety and routing from and to log predictions to.
    """

    def __init__(self, settings_json: str, redis_url: str) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.settings = settings
        cfg = settings.serve
        self.redis_url = redis_url
        self.admin_token = cfg.admin_token or None
        self.sticky_header = cfg.sticky_header
        self.sticky_salt = cfg.sticky_salt
        self.freq_ns = settings.bars.freq_s * NS_PER_S
        self.sessions = SessionBook.from_settings(settings)  # markets that close (serve_app/sessions.py)
        self.prefix = cfg.redis_prefix
        _RUNTIME.max_body_bytes = cfg.max_body_bytes
        _RUNTIME.body_drain_bytes = cfg.body_drain_bytes
        _RUNTIME.replica = self
        # A request thread waiting for the interpreter lock behind a background thread (a
        # feature refresh, the log writer) waits up to one switch interval: keep it short.
        sys.setswitchinterval(cfg.gil_switch_interval_s)
        self.replica_id = self._replica_id()
        timeout = settings.redis.socket_timeout_s

        def client() -> redis.Redis:
            return connect(redis_url, timeout_s=timeout)

        self._client_factory = client
        self.client = client()
        self.registry = ModelRegistry(registry_root(settings))
        self.store = RoutingStore(self.client, prefix=self.prefix)
        self.control = TrafficControl(self.store, self.registry, shadow_default=cfg.shadow_default)
        loader = ModelLoader(self.registry, native_min_rows=settings.model.native_min_rows,
                             onnx_threads=cfg.onnx_threads, native_threads=cfg.native_threads,
                             compiled=settings.model.compiled_engine,
                             parity_tol=settings.model.onnx_parity_tol)
        self.slots = SlotManager(self.store, self.control, loader, refresh_s=cfg.feature_refresh_s,
                                 registry_poll_s=cfg.registry_poll_s)
        bars_root = Path(settings.data_dir) / "bars"
        self.features = FeatureCache(client, refresh_s=cfg.feature_refresh_s,
                                     resync_s=cfg.feature_resync_s,
                                     bar_close=self._bar_close_reader(bars_root),
                                     assets=settings.assets)
        self.metrics = ServeMetrics(cfg.sla_latency_ms)
        self.logger = PredictionLogger(client, cfg.prediction_stream, cfg.prediction_stream_maxlen_per_asset,
                                       cfg.prediction_log_batch, cfg.prediction_log_queue,
                                       settings.breaker, flush_s=cfg.prediction_log_flush_s,
                                       max_busy=cfg.prediction_log_max_busy)
        self._view_lock = threading.Lock()
        self._view: ServingView | None = None
        self._view_key: tuple[int, int] = (-1, -1)
        self._latencies: deque[tuple[str, int, float]] = deque(maxlen=50_000)
        self._stop = threading.Event()
        self._busy = BusyMeter()
        # Persistent scoring threads: onnxruntime and XGBoost release the GIL while they run,
        # so the event loop keeps parsing the next requests meanwhile.
        self._pool = (ThreadPoolExecutor(cfg.handler_threads, thread_name_prefix="score")
                      if cfg.handler_threads > 0 else None)
        self._slow_pool = ThreadPoolExecutor(2, thread_name_prefix="admin")
        self._inline = cfg.predict_inline or self._pool is None
        self.slots.start()
        self.features.track(self.slots.state.table.assets)
        self.features.start()
        self.logger.start()
        self._publisher = threading.Thread(target=self._publish_loop, name="metrics-publish",
                                           daemon=True)
        self._publisher.start()
        log.info("replica %s serving routing rev %d from %s", self.replica_id,
                 self.slots.state.rev, redact(redis_url))

    # ------------------------------------------------------------------ plumbing
    async def _scoring(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a batch prediction on a scoring thread (inline with ``serve.handler_threads = 0``)."""
        if self._pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _single(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a single prediction: on the event loop with ``serve.predict_inline``, where its
        ~60 µs cost less than a hop to a scoring thread and back (measured: c8 2,640 → 3,450
        req/s, p99 7.8 → 6.6 ms), else on a scoring thread."""
        if self._inline:
            return fn(*args)
        return await self._scoring(fn, *args)

    async def _background(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run Redis- or registry-bound work (health, metrics, admin) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._slow_pool, fn, *args)

    @staticmethod
    def _replica_id() -> str:
        try:
            return str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - outside Serve (a direct instantiation)
            return f"{socket.gethostname()}-{os.getpid()}"

    @staticmethod
    def _bar_close_reader(root: Path) -> Callable[[str, int], float | None]:
        from tickcast.storage.bar_store import BarStore

        store = BarStore(root, fsync=False)

        def close(asset: str, bar_ts: int) -> float | None:
            try:
                bars = store.read(asset, start_ns=bar_ts, end_ns=bar_ts + 1)
            except (TickcastError, OSError, ValueError):
                return None
            if bars.empty:
                return None
            value = float(bars["close"].iloc[-1])
            return value if math.isfinite(value) and value > 0 else None

        return close

    def _current_view(self) -> ServingView:
        state = self.slots.state
        snap = self.features.snapshot
        key = (id(state), snap.version)
        view = self._view
        if view is not None and self._view_key == key:
            return view
        with self._view_lock:
            if self._view is not None and self._view_key == key:
                return self._view
            view = ServingView(state, snap, self.settings.assets, self.freq_ns,
                               self.settings.serve.feature_max_age_s, self.sessions)
            self._view, self._view_key = view, key
            return view

    def _request_id(self, headers: HeaderGetter) -> str:
        given = headers.get("x-request-id")
        if given and _REQUEST_ID_RE.match(given):
            return given
        return f"{random.getrandbits(64):016x}"  # unique enough for a log key; no syscall

    def _unit(self, headers: HeaderGetter) -> float:
        key = headers.get(self.sticky_header.lower())
        if key:
            return sticky_unit(key[:256], self.sticky_salt)
        return random.random()

    def _failed(self, tag: RequestTag, exc: TickcastError, request_id: str) -> TickcastError:
        """Note a failed request on its tag (counted when its response is written) and, when
        the failure is the served model's own, against that model."""
        tag.error = exc.code
        if isinstance(exc, (ModelFailed, ModelUnusable)):
            self.metrics.count_model_errors([exc.fault])
        else:  # no model served it (a client's mistake, stale features): no model's request
            tag.slot, tag.models = "none", ()
        exc.request_id = request_id  # type: ignore[attr-defined]
        return exc

    def record_request(self, tag: RequestTag, status: int, latency_ms: float) -> None:
        """Count one answered request (called by :class:`serve_app.request_clock.RequestClock`
        once its last byte is written): every status, latency from arrival."""
        error = tag.error if tag.error is not None or status < 400 else f"http_{status}"
        self.metrics.observe(tag.endpoint, tag.slot, status, latency_ms, error=error,
                             models=tag.models)
        if tag.endpoint in _PREDICT_ENDPOINTS:
            self._latencies.append((tag.slot, status, latency_ms))

    def _apply(self, rev: int) -> bool:
        """Make this replica serve revision ``rev`` now (others follow within a refresh)."""
        deadline = time.monotonic() + self.settings.serve.switch_timeout_s
        while self.slots.state.rev < rev and time.monotonic() < deadline:
            self.slots.sync()
            if self.slots.state.rev < rev:
                time.sleep(0.02)
        self.features.track(self.slots.state.table.assets)
        return self.slots.state.rev >= rev

    def _publish_loop(self) -> None:
        period = self.settings.serve.metrics_publish_s
        ray_metrics = _RayMetrics.create()
        while not self._stop.wait(period):
            try:
                self.features.track(self.slots.state.table.assets)
                key = f"{self.prefix}metrics:{self.replica_id}"
                doc = {"metrics": self.metrics.snapshot(), "log": self.logger.stats(),
                       "replica": self.replica_id, "rev": self.slots.state.rev}
                pipe = self.client.pipeline(transaction=False)
                pipe.set(key, json.dumps(doc), ex=max(5, int(period * 10)))
                pipe.zadd(f"{self.prefix}metrics:replicas", {self.replica_id: time.time()})
                pipe.execute()
            except Exception as exc:  # noqa: BLE001 - metrics must never take a replica down
                log.warning("metrics publish failed: %s", exc)
            if ray_metrics is not None:
                ray_metrics.flush(self._latencies, self.settings.serve.sla_latency_ms)

    def check_health(self) -> None:
        """Ray Serve's replica health check: background threads must be alive."""
        logger = self.logger._thread
        for name, running in (("slot-sync", self.slots.running), ("feature-cache", self.features.running),
                              ("prediction-log", logger is not None and logger.is_alive()),
                              ("metrics", self._publisher.is_alive())):
            if not running:
                raise RuntimeError(f"background thread {name} is not running")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics hook: how busy this replica's event loop was
        (share of wall time) since the previous report (read by :class:`serve_app.autoscaling.LoadPolicy`).

        ``async`` so that Serve runs it on the event loop it measures (a ``def`` method would
        run on Serve's thread pool)."""
        return {BUSY_METRIC: self._busy.sample()}

    def __del__(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ predict
    def _predict(self, body: schemas.PredictRequest, headers: HeaderGetter,
                 tag: RequestTag | None) -> Response:
        return Response(self.predict_bytes(body, headers, tag), media_type=_JSON)

    def predict_bytes(self, body: schemas.PredictRequest, headers: HeaderGetter,
                      tag: RequestTag | None = None) -> bytes:
        """One prediction as response bytes (raises :class:`TickcastError` on failure).

        ``tag`` is the request's (:class:`serve_app.request_clock.RequestTag`); the slot and
        model that served it, or the error, are noted there and counted once the response is
        written. Without one (a direct call) the clock starts here.
        """
        tag = tag if tag is not None else RequestTag(time.perf_counter(), "predict")
        rid = self._request_id(headers)
        try:
            view = self._current_view()
            av = view.asset_view(body.asset)
            slot = av.route.choose(self._unit(headers))
            shadow_slot = av.route.shadow_of(slot)
            shadow: Scored | None = None
            online = body.features is None
            age = view.check_fresh(av, time.time_ns()) if online else None
            inp = av.slot_input(slot)
            if inp is not None:  # from here on, a failure may be the model's own
                tag.slot = slot
                tag.models = ((av.asset, slot, inp.model.version),)
            if online:
                served = view.score_online(av, slot, age)  # type: ignore[arg-type]
            else:
                served = view.score_explicit(av, slot, body.features, body.price)  # type: ignore[assignment,arg-type]
            if shadow_slot is not None:
                shadow = self._shadow(view, av, shadow_slot, body, age)
            explanation = self._explain(served) if body.explain else None
        except TickcastError as exc:
            raise self._failed(tag, exc, rid) from None
        out = prediction_body(served, round(tag.elapsed_ms(), 3), rid)
        if explanation is not None:
            out["explanation"] = explanation
        rows = [_log_row(rid, served, False)]
        if shadow is not None:
            rows.append(_log_row(rid, shadow, True))
            self.metrics.count_predictions(shadow.slot, "shadow")
        self.logger.submit(rows)
        self.metrics.count_predictions(served.slot, "served")
        return _dumps(out)

    def _shadow(self, view: ServingView, av: AssetView, slot: str, body: schemas.PredictRequest,
                age: float | None) -> Scored | None:
        """The shadow slot's prediction, or None when it cannot make one: it is never served,
        so its failure fails no request (a model's own failure is counted under the
        ``shadow`` endpoint)."""
        try:
            if body.features is None:
                return view.score_online(av, slot, age)  # type: ignore[arg-type]
            return view.score_explicit(av, slot, body.features, body.price, strict=False)
        except (ModelFailed, ModelUnusable) as exc:
            self.metrics.observe("shadow", slot, exc.status, 0.0, error=exc.code)
            return None
        except ServiceUnavailable:
            return None

    @staticmethod
    def _explain(s: Scored) -> dict[str, Any]:
        """TreeSHAP of the served median (loads the model's native booster on first use)."""
        model = s.model
        if model is None or model.explainer is None or s.x is None:
            raise ServiceUnavailable("no explanation available for this prediction", field="explain")
        return model.explainer.explain(s.x).to_dict()

    def _predict_batch(self, body: schemas.BatchPredictRequest, headers: HeaderGetter,
                       tag: RequestTag | None) -> Response:
        tag = tag if tag is not None else RequestTag(time.perf_counter(), "batch")
        rid = self._request_id(headers)
        limit = self.settings.serve.max_batch_assets
        n = len(body.assets) if body.assets is not None else len(body.rows or [])
        try:
            if n > limit:
                raise InvalidInput(f"{n} items exceed serve.max_batch_assets = {limit}",
                                   field="assets" if body.assets is not None else "rows")
            view = self._current_view()
            u = self._unit(headers)
            if body.assets is not None:
                res = view.score_batch(body.assets, u, time.time_ns())
            else:
                res = self._explicit_rows(view, body.rows or [], u)
            # Every model the batch asked for, served or failing on its own account.
            models: list[ModelKey] = list(zip(res.asset, res.slot, res.version))
            models.extend((a, sl, v) for a, sl, v, _, _ in res.faults)
            tag.models = models
            tag.slot = res.slot[0] if len(res) else (res.faults[0][1] if res.faults else "none")
            if res.faults:
                self.metrics.count_model_errors(res.faults)
            if res.shadow_faults:
                for _, sl, _, code, status in res.shadow_faults:
                    self.metrics.observe("shadow", sl, status, 0.0, error=code)
        except TickcastError as exc:
            raise self._failed(tag, exc, rid) from None
        if not len(res) and res.errors:
            # Nothing served. The models that failed are counted against themselves (above)
            # and keep this request; stale features or missing models blame no model.
            why = "no asset of the batch could be served: " + res.errors[0][2]
            failure: TickcastError = (BatchModelsFailed(why) if any(
                f[4] == ModelFailed.status for f in res.faults) else ServiceUnavailable(why))
            tag.error = failure.code
            failure.request_id = rid  # type: ignore[attr-defined]
            raise failure
        columns = batch_columns(res)
        out: dict[str, Any] = {"request_id": rid, "count": len(res)}
        if body.format == "columns":
            out["columns"] = columns
        else:
            keys = list(columns)
            lists = [c.tolist() if isinstance(c, np.ndarray) else c for c in columns.values()]
            out["predictions"] = [dict(zip(keys, values)) for values in zip(*lists)]
        out["errors"] = [{"asset": a, "error": code, "detail": d} for a, code, d in res.errors]
        out["timestamp"] = now_iso()
        out["latency_ms"] = round(tag.elapsed_ms(), 3)
        price = [None if p != p else p for p in res.price.tolist()]
        rows: list[Row] = [(rid, a, sl, v, b, p, lo, hi, pr, False) for a, sl, v, b, p, lo, hi, pr in zip(
            res.asset, res.slot, res.version, res.bar_ts.tolist(), res.pred.tolist(), res.lo.tolist(),
            res.hi.tolist(), price)]
        sprice = [None if p != p else p for p in res.shadow_price.tolist()]
        rows.extend((rid, a, sl, v, b, p, lo, hi, pr, True) for a, sl, v, b, p, lo, hi, pr in zip(
            res.shadow_asset, res.shadow_slot, res.shadow_version, res.shadow_bar_ts.tolist(),
            res.shadow_pred.tolist(), res.shadow_lo.tolist(), res.shadow_hi.tolist(), sprice))
        self.logger.submit(rows)
        for name, k in zip(("blue", "green"), _count_slots(res.slot)):
            if k:
                self.metrics.count_predictions(name, "served", k)
        for name, k in zip(("blue", "green"), _count_slots(res.shadow_slot)):
            if k:
                self.metrics.count_predictions(name, "shadow", k)
        return Response(_dumps(out), media_type=_JSON)

    @staticmethod
    def _explicit_rows(view: ServingView, rows: list[schemas.BatchRow], u: float) -> BatchResult:
        """Explicit feature rows, scored one by one (validated against each model's schema)."""
        served: list[Scored] = []
        shadows: list[Scored] = []
        errors: list[tuple[str, str, str]] = []
        faults: list[ModelFault] = []
        shadow_faults: list[ModelFault] = []
        for i, row in enumerate(rows):
            av = view.asset_view(row.asset)
            slot = av.route.choose(u)
            try:
                s = view.score_explicit(av, slot, row.features, row.price)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, field=f"rows.{i}.{exc.field}") from None
            except ModelFailed as exc:  # this row's model failed: the other rows still count
                errors.append((row.asset, exc.code, f"{row.asset}: {exc.message}"))
                faults.append(exc.fault)
                continue
            if s is not None:
                served.append(s)
            other = av.route.shadow_of(slot)
            if other is not None:
                try:
                    sh = view.score_explicit(av, other, row.features, row.price, strict=False)
                except ModelFailed as exc:
                    shadow_faults.append(exc.fault)
                    sh = None
                if sh is not None:
                    shadows.append(sh)
        res = result_from_scored(served, shadows)
        res.errors.extend(errors)
        res.faults.extend(faults)
        res.shadow_faults.extend(shadow_faults)
        return res

    # ------------------------------------------------------------------ health and models
    def _health(self, probe: str | None) -> Response:
        view = self._current_view()
        ready, reasons, assets = view.readiness(time.time_ns(), self.settings.assets)
        if self.slots.last_error:
            reasons.append(f"routing sync: {self.slots.last_error}")
        snap = self.features.snapshot
        if snap.error:
            reasons.append(f"feature refresh: {snap.error}")
        body = {"status": "ok" if ready else "degraded", "live": True, "ready": ready,
                "reasons": reasons, "replica": self.replica_id, "routing_rev": view.state.rev,
                "assets": assets}
        status = 503 if (probe == "ready" and not ready) else 200
        return JSONResponse(body, status_code=status)

    def _merged_metrics(self) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
        own = {"metrics": self.metrics.snapshot(), "log": self.logger.stats(),
               "replica": self.replica_id}
        docs = [own]
        try:
            zkey = f"{self.prefix}metrics:replicas"
            horizon = time.time() - max(5.0, self.settings.serve.metrics_publish_s * 10)
            self.client.zremrangebyscore(zkey, "-inf", horizon)
            ids = [i.decode() for i in self.client.zrange(zkey, 0, -1) if i.decode() != self.replica_id]
            if ids:
                raws = self.client.mget([f"{self.prefix}metrics:{i}" for i in ids])
                docs.extend(json.loads(r) for r in raws if r is not None)
        except (redis.RedisError, ValueError) as exc:
            log.warning("reading other replicas' metrics failed: %s", exc)
        merged = merge_snapshots(d["metrics"] for d in docs)
        logs: dict[str, float] = {}
        for d in docs:
            for k, v in d.get("log", {}).items():
                if isinstance(v, (int, float)):
                    logs[k] = logs.get(k, 0) + v
        return merged, logs, docs

    def _metrics_text(self) -> Response:
        merged, logs, docs = self._merged_metrics()
        view = self._current_view()
        now = time.time_ns()
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        counters: list[tuple[str, str, dict[str, str], float]] = [
            ("prediction_log_written_total", "Prediction log entries written to the stream.", {},
             logs.get("written", 0)),
            ("prediction_log_dropped_total", "Prediction log entries dropped.",
             {"reason": "queue_full"}, logs.get("dropped_queue_full", 0)),
            ("prediction_log_dropped_total", "Prediction log entries dropped.",
             {"reason": "write_failed"}, logs.get("dropped_write_failed", 0)),
        ]
        gauges.append(("prediction_log_queued", "Prediction log entries waiting.", {},
                       logs.get("queued", 0)))
        gauges.append(("routing_rev", "Routing revision served by the answering replica.", {},
                       view.state.rev))
        for asset, av in sorted(view.assets.items()):
            route = av.route
            gauges.append(("green_weight", "Share of traffic routed to the green slot.",
                           {"asset": asset}, route.green_weight))
            gauges.append(("shadow_enabled", "Shadow mode (1 on).", {"asset": asset},
                           1.0 if route.shadow else 0.0))
            for slot in ("blue", "green"):
                v = route.version(slot)
                if v is not None:
                    gauges.append(("model_info", "Model version held by a slot (value 1).",
                                   {"asset": asset, "slot": slot, "version": v,
                                    "champion": str(slot == route.champion_slot).lower()}, 1.0))
            if av.feature is not None:
                gauges.append(("feature_age_seconds", "Age of the online features (since bar close).",
                               {"asset": asset}, av.feature.age_s(now, self.freq_ns)))
            gauges.append(("position_multiplier", "Safety multiplier served with predictions.",
                           {"asset": asset}, av.safety.multiplier))
        return PlainTextResponse(render_prometheus(merged, gauges=gauges, counters=counters),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def _models(self) -> dict[str, Any]:
        view = self._current_view()
        merged, logs, docs = self._merged_metrics()
        per_slot: dict[str, dict[str, int]] = {"blue": {}, "green": {}}
        for key, count in merged["predictions"].items():
            slot, role = key.split("|", 1)
            if slot in per_slot:
                per_slot[slot][role] = per_slot[slot].get(role, 0) + count
        for key, count in merged["requests"].items():
            _, slot, code = key.split("|", 2)
            if slot in per_slot:
                per_slot[slot][f"http_{code}"] = per_slot[slot].get(f"http_{code}", 0) + count
        assets: dict[str, Any] = {}
        for asset, av in sorted(view.assets.items()):
            route = av.route
            entry: dict[str, Any] = {"green_weight": route.green_weight, "shadow": route.shadow,
                                     "champion_slot": route.champion_slot,
                                     "registry_champion": route.registry_champion}
            for slot in ("blue", "green"):
                inp = av.slot_input(slot)
                if inp is None:
                    entry[slot] = None
                    continue
                m = inp.model
                entry[slot] = {"version": m.version, "loaded": True,
                               "features_usable": inp.x is not None,
                               "problem": inp.problem or None, "n_features": len(m.feature_names),
                               "schema_hash": m.schema_hash,
                               "engine": m.predictor.engine_summary,
                               "conformal_offset": None if m.calibrator is None else m.calibrator.offset}
            assets[asset] = entry
        return {"routing_rev": view.state.rev, "replica": self.replica_id,
                "replicas_reporting": merged.get("replicas", 1), "assets": assets,
                "errors": dict(view.state.errors), "counters": per_slot,
                "feature_names": {a: list(av.blue.model.feature_names) for a, av in
                                  sorted(view.assets.items())[:50] if av.blue is not None}}

    def _admin(self, action: str, fn: Callable[[], tuple[Any, list[Any]]]) -> Response:
        table, changes = fn()
        applied = self._apply(table.rev)
        body = {"action": action, "rev": table.rev, "applied": applied,
                "routes": {c.asset: c.after.to_dict() for c in changes if c.after is not None},
                "changes": [c.to_dict() for c in changes]}
        return JSONResponse(body)


class _RayMetrics:
    """Serving metrics under the names of :mod:`tickcast.monitoring.metrics_names`, exported
    through Ray's metrics agent (the Ray dashboard and its Prometheus endpoint).

    Fed from the publisher thread (never the request path): per-request samples queued by the
    handlers are drained once a second.
    """

    def __init__(self) -> None:
        from ray.util import metrics as rm

        from tickcast.monitoring import metrics_names as mn

        self.latency = rm.Histogram(mn.REQUEST_LATENCY_MS, description="Prediction request latency, ms",
                                    boundaries=list(mn.LATENCY_BOUNDARIES_MS), tag_keys=(mn.SLOT,))
        self.requests = rm.Counter(mn.REQUESTS_TOTAL, description="Prediction requests, by HTTP code",
                                   tag_keys=(mn.SLOT, mn.CODE))
        self.sla = rm.Counter(mn.SLA_VIOLATIONS_TOTAL, description="Requests slower than the latency SLA",
                              tag_keys=(mn.SLOT,))

    @classmethod
    def create(cls) -> "_RayMetrics | None":
        try:
            return cls()
        except Exception as exc:  # noqa: BLE001 - outside Ray: the /metrics endpoint still works
            log.info("Ray metrics unavailable: %s", exc)
            return None

    def flush(self, samples: deque[tuple[str, int, float]], sla_ms: float) -> None:
        counts: dict[tuple[str, int], int] = {}
        slow: dict[str, int] = {}
        n = len(samples)
        for _ in range(n):
            try:
                slot, code, ms = samples.popleft()
            except IndexError:
                break
            self.latency.observe(ms, tags={"slot": slot})
            counts[(slot, code)] = counts.get((slot, code), 0) + 1
            if ms > sla_ms:
                slow[slot] = slow.get(slot, 0) + 1
        for (slot, code), c in counts.items():
            self.requests.inc(c, tags={"slot": slot, "code": str(code)})
        for slot, c in slow.items():
            self.sla.inc(c, tags={"slot": slot})


# ----------------------------------------------------------------------- the deployment
@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=5, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class PredictorDeployment(PredictorReplica):
    """The Ray Serve deployment: :class:`PredictorReplica` behind the FastAPI routes.

    Handlers are ``async``. A single prediction (~60 µs) runs on the event loop
    (``serve.predict_inline``); a batch goes to the replica's persistent scoring threads
    (``serve.handler_threads``), where the compiled kernel runs without the interpreter lock.
    FastAPI's own path for ``def`` handlers, anyio's worker threads, ties each worker to the
    task that started it; in a Serve replica that is the request's task, so every request
    would start and stop a thread (10 % of the replica's CPU at 600 req/s, measured with py-spy).
    """

    @app.post("/v1/predict", response_model=schemas.Prediction, responses=ERRORS,
              summary="Forecast one asset's next bar", openapi_extra=REQUEST_HEADERS)
    async def predict(self, request: Request, body: schemas.PredictRequest = Body(...)) -> Response:
        """Forecast from the asset's online features, or from explicit ``features``; with
        ``explain``, each feature's contribution to the median (TreeSHAP, top 5)."""
        if body.explain:
            return await self._scoring(self._predict, body, request.headers, tag_of(request.scope))
        return await self._single(self._predict, body, request.headers, tag_of(request.scope))

    @app.post("/v1/predict/batch", response_model=schemas.BatchPredictResponse, responses=ERRORS,
              summary="Forecast many assets in one call (vectorized)", openapi_extra=REQUEST_HEADERS)
    async def predict_batch(self, request: Request, body: schemas.BatchPredictRequest = Body(...)) -> Response:
        """One engine call per model group; per-asset failures listed in ``errors``."""
        return await self._scoring(self._predict_batch, body, request.headers, tag_of(request.scope))

    @app.get("/v1/health", response_model=schemas.HealthResponse, responses={503: {"model": schemas.HealthResponse}},
             summary="Liveness (the 200) and readiness (models loaded, features fresh)")
    async def health(self, probe: str | None = Query(None, pattern="^(live|ready)$",
                                                     description="`ready`: answer 503 when not ready")) -> Response:
        """Always 200 while the replica lives, unless ``probe=ready`` and it is not ready."""
        return await self._background(self._health, probe)

    @app.get("/v1/models", summary="Slots, versions, traffic split, shadow flag, per-slot counters")
    async def models(self) -> dict[str, Any]:
        """What every asset's slots hold and how traffic is split."""
        return await self._background(self._models)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (all replicas)")
    async def metrics_endpoint(self) -> Response:
        """Request counts, latency histogram, SLA violations and errors by code, per slot."""
        return await self._background(self._metrics_text)

    @app.post("/v1/admin/traffic", response_model=schemas.AdminResponse, responses=ADMIN_ERRORS,
              dependencies=[Depends(require_admin)], summary="Set the green weight and/or shadow mode")
    async def admin_traffic(self, body: schemas.TrafficRequest = Body(...)) -> Response:
        """Atomic and hot: every replica switches within one refresh, no request fails."""
        return await self._background(self._admin, "traffic", lambda: self.control.set_traffic(
            body.green_weight, body.shadow, body.assets))

    @app.post("/v1/admin/promote", response_model=schemas.AdminResponse, responses=ADMIN_ERRORS,
              dependencies=[Depends(require_admin)], summary="Promote a version to champion")
    async def admin_promote(self, body: schemas.PromoteRequest | None = Body(None)) -> Response:
        """All traffic to the promoted version; the old champion stays warm for a rollback."""
        req = body or schemas.PromoteRequest()
        return await self._background(self._admin, "promote",
                                      lambda: self.control.promote(req.asset, req.version))

    @app.post("/v1/admin/rollback", response_model=schemas.AdminResponse, responses=ADMIN_ERRORS,
              dependencies=[Depends(require_admin)], summary="Roll back to the previous champion")
    async def admin_rollback(self, body: schemas.RollbackRequest | None = Body(None)) -> Response:
        """The registry's ``previous`` version serves all traffic again."""
        req = body or schemas.RollbackRequest()
        return await self._background(self._admin, "rollback", lambda: self.control.rollback(req.asset))


def replica_env(settings: Settings) -> dict[str, str]:
    """Environment of the replica processes (Ray Serve reads these at import).

    ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` (``serve.user_code_thread`` off) runs the
    app on the replica's own event loop instead of a second loop in another thread: each ASGI
    message then stops crossing threads, which on this 2-core host moved c8 from 2,240 to
    2,930 req/s and its p99 from 8.6 to 6.7 ms (bench.serve). It is safe here because every
    handler hands its blocking work to the replica's thread pools. The draining period must be
    known to the replica as well as to the controller.
    """
    cfg = settings.serve
    return {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1" if cfg.user_code_thread else "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(cfg.drain_period_s)}


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve options of the deployment, from ``serve`` config (autoscaling included)."""
    a = settings.serve.autoscaling
    return {
        "max_ongoing_requests": settings.serve.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": a.min_replicas,
            "max_replicas": max(a.max_replicas, a.min_replicas),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
            "metrics_interval_s": a.metrics_interval_s,
            **({"policy": policy_config(a.target_busy, a.downscale_fill)} if a.target_busy > 0 else {}),
        },
        "ray_actor_options": {"num_cpus": settings.serve.replica_num_cpus,
                              "runtime_env": {"env_vars": replica_env(settings)}},
        # Serve calls logger.info per request even with the access log off (the record is
        # built, then filtered): a WARNING level stops it at the first check.
        "logging_config": {"enable_access_log": settings.serve.access_log,
                           "log_level": "INFO" if settings.serve.access_log else "WARNING"},
    }


def build_app(settings: Settings, redis_url: str) -> serve.Application:
    """The Serve application: one FastAPI-ingress deployment, options from config."""
    return PredictorDeployment.options(**deployment_options(settings)).bind(
        settings.model_dump_json(), redis_url)


def start_serving(settings: Settings, redis_url: str, *, wait_ready_s: float | None = None) -> str:
    """Start Serve (HAProxy ingress when ``serve.use_haproxy``) and deploy the app.

    Ray must be initialized. Returns the base URL. With ``wait_ready_s`` it also waits that long
    for ``/v1/health`` to answer (liveness; readiness is the caller's business).

    Raises
    ------
    ServiceUnavailable
        The app did not answer in time.
    """
    cfg = settings.serve
    controller_env: dict[str, str] = {}
    if cfg.use_haproxy:
        # One directory per serving port (one Serve instance per port), emptied at each start.
        run_dir = Path(tempfile.gettempdir()) / f"tickcast-haproxy-{cfg.port}"
        shutil.rmtree(run_dir, ignore_errors=True)
        controller_env = haproxy_env(cfg.drain_period_s, cfg.haproxy_threads, run_dir)
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                controller_options={"runtime_env": {"env_vars": controller_env}} if controller_env else None)
    serve.run(build_app(settings, redis_url), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.host}:{cfg.port}"
    if wait_ready_s:
        import httpx

        deadline = time.monotonic() + wait_ready_s
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"serving app did not answer at {url} within {wait_ready_s:.0f} s")
            time.sleep(0.2)
    return url


def stop_serving() -> None:
    """Delete the app (Serve itself stays up for other apps)."""
    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - nothing deployed
        log.info("no serving app to delete: %s", exc)
