"""The request clock: every request timed from its arrival at the replica to its last byte.

A request that waits costs its client as much as one that computes. The replica's HTTP
server (uvicorn, started by Ray Serve inside the replica) reads a request off its socket when
its event loop gets to it; the request then waits for the loop again (behind the requests read
with it, which run inline one after another), for a Serve ongoing-request slot, and for our
handler; its response is encoded and handed to the socket. Timing only the handler, as the
replica did before, hides all of that waiting, and with it the queue that builds under load.

So the clock starts when the server reads the request's first bytes: :func:`install_arrival_stamp`
wraps the HTTP protocols' ``data_received`` so that the request's ASGI scope carries
``time.perf_counter()`` of that read under :data:`ARRIVAL_KEY`. It stops in
:class:`RequestClock`, the app's outermost middleware, once the response's last body message
has been handed to the server (``await send`` returned: the bytes are in the socket or its
transport buffer). A scope without the stamp (another server, a pipelined request read in the
same chunk as the one before it) starts the clock when the app is called. What the replica
cannot see is time spent before its process reads the socket: in the kernel's socket buffer and
in the ingress (HAProxy). ``bench.serve`` measures that from the client's side.

Handlers say what a request was (endpoint, slot, models, error code) through the
:class:`RequestTag` the middleware puts in the scope under :data:`TAG_KEY`; the middleware reports
``(tag, status, latency_ms)`` to a callback once per request, whatever its status, including
the 413s of the body limit, the 422s of validation and unhandled 500s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.metrics import ModelKey

ARRIVAL_KEY = "tickcast.arrival"
TAG_KEY = "tickcast.request"
CLIENT_GONE = 499  # nginx's convention: the client closed the connection before the response

_ENDPOINTS = {"/v1/predict": "predict", "/v1/predict/batch": "batch", "/v1/health": "health",
              "/v1/models": "models", "/metrics": "metrics"}


def endpoint_of(path: str) -> str:
    """The metrics' endpoint label of a request path (a closed set: no path is a label).

    >>> endpoint_of("/v1/predict"), endpoint_of("/v1/admin/promote"), endpoint_of("/nope")
    ('predict', 'admin', 'other')
    """
    name = _ENDPOINTS.get(path)
    if name is not None:
        return name
    return "admin" if path.startswith("/v1/admin/") else "other"


@dataclass(slots=True)
class RequestTag:
    """What a request was, filled in by its handler for the metrics.

    Attributes
    ----------
    arrival
        ``time.perf_counter()`` when the replica read the request.
    endpoint
        Metrics label of the route (:func:`endpoint_of`).
    slot
        Slot that served it (``none`` until a model was chosen).
    models
        ``(asset, slot, version)`` of each model it was served by, or whose own failure
        answered it (a batch names one per asset).
    error
        Error code of a failed request (None: derived from the status).
    """

    arrival: float
    endpoint: str
    slot: str = "none"
    models: Sequence[ModelKey] = ()
    error: str | None = None

    def elapsed_ms(self) -> float:
        """Milliseconds since arrival."""
        return (time.perf_counter() - self.arrival) * 1e3


def tag_of(scope: Scope) -> RequestTag | None:
    """The request's tag (None outside :class:`RequestClock`)."""
    return scope.get(TAG_KEY)


def install_arrival_stamp() -> list[str]:
    """Stamp each request's ASGI scope with the time the server read its first bytes.

    Wraps ``data_received`` of uvicorn's HTTP protocols (httptools and h11) in this process;
    idempotent. Returns the protocols wrapped (empty when uvicorn is not importable: the clock
    then starts when the app is called).
    """
    wrapped: list[str] = []
    targets: list[tuple[str, str]] = [("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
                                      ("uvicorn.protocols.http.h11_impl", "H11Protocol")]
    for module_name, class_name in targets:
        try:
            module = __import__(module_name, fromlist=[class_name])
            cls = getattr(module, class_name)
        except (ImportError, AttributeError):
            continue  # that parser is not installed
        original = cls.data_received
        if getattr(original, "_tickcast_stamp", False):
            wrapped.append(class_name)
            continue
        cls.data_received = _stamping(original)
        wrapped.append(class_name)
    return wrapped


def _stamping(original: Callable[[Any, bytes], None]) -> Callable[[Any, bytes], None]:
    def data_received(self: Any, data: bytes) -> None:
        t = time.perf_counter()
        original(self, data)
        # The parser has (re)built ``self.scope`` for a request that began in this chunk; the
        # task that will run the app was created with that same dict and has not run yet.
        scope = getattr(self, "scope", None)
        if scope is not None and ARRIVAL_KEY not in scope:
            scope[ARRIVAL_KEY] = t

    data_received._tickcast_stamp = True  # type: ignore[attr-defined]
    return data_received


class RequestClock:
    """Outermost middleware: times every HTTP request to its last byte and reports it.

    Parameters
    ----------
    app
        The application.
    report
        Called once per request with ``(tag, status, latency_ms)``; a request that got no
        response (the client went away) reports :data:`CLIENT_GONE`, an exception out of the
        app 500 (the framework's error middleware answers it).
    """

    def __init__(self, app: ASGIApp, report: Callable[[RequestTag, int, float], None]) -> None:
        self.app = app
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tag = RequestTag(scope.get(ARRIVAL_KEY) or time.perf_counter(), endpoint_of(scope["path"]))
        scope[TAG_KEY] = tag
        status = 0
        done = False

        async def timed_send(message: Message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self.report(tag, status, tag.elapsed_ms())

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not done:
                done = True
                tag.error = tag.error or "internal"
                self.report(tag, 500, tag.elapsed_ms())
            raise
        if not done:
            tag.error = tag.error or "client_gone"
            self.report(tag, status or CLIENT_GONE, tag.elapsed_ms())
