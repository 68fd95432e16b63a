"""The request clock: a real uvicorn server (the replica's HTTP server) and the ASGI middleware.

The point of the clock is that a request waiting behind others on the replica's event loop is
late for its client: its latency must include that wait, not only its own handler's time.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from serve_app.app import BodyLimitMiddleware
from serve_app.request_clock import (ARRIVAL_KEY, CLIENT_GONE, TAG_KEY, RequestClock, RequestTag,
                                     endpoint_of, install_arrival_stamp)
from tickcast.net import free_port

BLOCK_S = {"/v1/health": 0.3, "/v1/predict": 0.2, "/v1/predict/batch": 0.2}


class _Server:
    """uvicorn in a thread, serving ``RequestClock(app)``; reports collected per endpoint."""

    def __init__(self, http: str) -> None:
        self.reports: dict[str, tuple[int, float]] = {}
        self.entered: dict[str, float] = {}  # perf_counter when the app itself was called
        self.arrival: dict[str, float] = {}

        async def app(scope: dict[str, Any], receive, send) -> None:  # type: ignore[no-untyped-def]
            tag: RequestTag = scope[TAG_KEY]
            self.entered[tag.endpoint] = time.perf_counter()
            self.arrival[tag.endpoint] = tag.arrival
            while (await receive()).get("more_body", False):
                pass
            time.sleep(BLOCK_S.get(scope["path"], 0.0))  # an inline handler holds the loop
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        def report(tag: RequestTag, status: int, ms: float) -> None:
            self.reports[tag.endpoint] = (status, ms)

        self.port = free_port()
        config = uvicorn.Config(RequestClock(app, report), host="127.0.0.1", port=self.port,
                                http=http, loop="asyncio", lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _send(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    return sock


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_latency_counts_the_wait_behind_other_requests(http: str) -> None:
    assert install_arrival_stamp()  # both parsers are installed with uvicorn[standard]
    with _Server(http) as srv:
        first = _send(srv.port, "/v1/health")  # holds the loop for 0.3 s
        time.sleep(0.1)
        # Both arrive while the loop is held: the server reads them in one go once it is free,
        # then runs them one after the other (0.2 s each).
        second = _send(srv.port, "/v1/predict")
        third = _send(srv.port, "/v1/predict/batch")
        for sock in (first, second, third):
            sock.settimeout(10)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            sock.close()
        deadline = time.monotonic() + 5
        while len(srv.reports) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    waits = {e: srv.entered[e] - srv.arrival[e] for e in ("predict", "batch")}
    later = max(waits, key=waits.__getitem__)
    # The later of the two waited for the earlier one's 0.2 s after the server read it ...
    assert waits[later] >= 0.18, waits
    # ... and its reported latency holds that wait plus its own 0.2 s, where timing from the
    # app's call would have said 0.2 s.
    status, ms = srv.reports[later]
    assert status == 200 and ms >= 1e3 * (waits[later] + 0.2) - 5, (srv.reports, waits)
    assert srv.reports["health"][0] == 200 and srv.reports["health"][1] >= 300


def _run(app, scope_extra: dict[str, Any] | None = None, body: bytes = b"{}",
         more: bool = False) -> list[tuple[RequestTag, int, float]]:
    reports: list[tuple[RequestTag, int, float]] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(b"content-length", str(len(body)).encode())], **(scope_extra or {})}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    clock = RequestClock(app, lambda tag, status, ms: reports.append((tag, status, ms)))
    try:
        asyncio.run(clock(scope, receive, send))
    except RuntimeError:
        pass
    return reports


def test_every_outcome_is_reported_once() -> None:
    async def ok(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        scope[TAG_KEY].slot = "blue"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def broken(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("defect")

    async def silent(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        return None  # the client went away before an answer

    [(tag, status, ms)] = _run(ok)
    assert (tag.endpoint, tag.slot, status) == ("predict", "blue", 200) and ms >= 0
    [(tag, status, _)] = _run(broken)
    assert (status, tag.error) == (500, "internal")
    [(tag, status, _)] = _run(silent)
    assert (status, tag.error) == (CLIENT_GONE, "client_gone")
    # A stamped scope keeps its arrival time: the clock starts there, not at the call.
    [(tag, _, ms)] = _run(ok, {ARRIVAL_KEY: time.perf_counter() - 0.5})
    assert ms >= 500


def test_the_body_limit_413_is_counted_with_its_code() -> None:
    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("the body limit answers first")

    limited = BodyLimitMiddleware(app, lambda: 10, lambda: 0)
    [(tag, status, _)] = _run(limited, body=b"x" * 100)
    assert (status, tag.error) == (413, "too_large")


def test_endpoint_labels_are_a_closed_set() -> None:
    assert {endpoint_of(p) for p in ("/v1/predict", "/v1/predict/batch", "/v1/health", "/v1/models",
                                     "/metrics", "/v1/admin/traffic", "/docs", "/x" * 50)} == {
        "predict", "batch", "health", "models", "metrics", "admin", "other"}
