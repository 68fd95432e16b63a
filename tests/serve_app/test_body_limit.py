"""The body-size limit at the ASGI level: what is refused, and when the connection stays usable.

Driven with plain ASGI messages, the way the replica's HTTP server calls the middleware.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.app import BodyLimitMiddleware

LIMIT = 1024
DRAIN = 256 * 1024


def _call(chunks: list[bytes], content_length: int | None,
          ends: bool = True) -> tuple[list[dict[str, Any]], int, list[bytes]]:
    """Runs one request through the middleware; returns what it sent, how many body messages
    it read, and the bodies the app behind it saw. ``ends=False``: the client leaves after the
    last chunk although it announced more."""
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or not ends}
                for i, c in enumerate(chunks)]
    read = 0
    sent: list[dict[str, Any]] = []
    seen: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read < len(incoming):
            read += 1
            return incoming[read - 1]
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: dict[str, Any], receive, send) -> None:  # type: ignore[no-untyped-def]
        while True:
            message = await receive()
            seen.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app, lambda: LIMIT, lambda: DRAIN)(scope, receive, send))
    return sent, read, seen


def _status_and_close(sent: list[dict[str, Any]]) -> tuple[int, bool]:
    start = sent[0]
    return start["status"], (b"connection", b"close") in start["headers"]


@pytest.mark.parametrize("declared", [True, False])
def test_within_limit_passes_through_untouched(declared: bool) -> None:
    chunks = [b"a" * 300, b"b" * 300, b"c" * 300]
    sent, _, seen = _call(chunks, 900 if declared else None)
    assert _status_and_close(sent) == (200, False)
    assert b"".join(seen) == b"".join(chunks)


@pytest.mark.parametrize("declared", [True, False])
def test_moderately_oversized_body_is_drained_and_keeps_the_connection(declared: bool) -> None:
    chunks = [b"x" * 4096] * 20  # 80 KiB: over the limit, within the drain allowance
    sent, read, seen = _call(chunks, 20 * 4096 if declared else None)
    assert _status_and_close(sent) == (413, False)
    assert read == len(chunks)  # the whole body was consumed: the next request can follow
    assert seen == []  # the app never saw it
    body = json.loads(sent[1]["body"])
    assert body["error"] == "too_large" and body["field"] == "body"


def test_huge_declared_body_is_refused_at_once_and_closes() -> None:
    sent, read, _ = _call([b"x" * 4096], LIMIT + DRAIN + 1)
    assert _status_and_close(sent) == (413, True)
    assert read == 0  # not a byte read


def test_huge_chunked_body_is_drained_only_up_to_the_allowance() -> None:
    chunks = [b"x" * 65536] * 16  # 1 MiB, far past limit + allowance
    sent, read, _ = _call(chunks, None)
    assert _status_and_close(sent) == (413, True)
    assert read < len(chunks)


def test_client_gone_mid_drain_is_answered_with_close() -> None:
    # Over the limit, more announced, then a disconnect: the refusal still goes out, marked final.
    sent, read, _ = _call([b"x" * 4096] * 3, None, ends=False)
    assert _status_and_close(sent) == (413, True)
    assert read == 3  # every chunk read, then the disconnect ended the drain


def test_malformed_content_length_is_a_400_naming_the_header() -> None:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"12x")]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(*_: Any) -> None:
        raise AssertionError("must not be called")

    asyncio.run(BodyLimitMiddleware(app, lambda: LIMIT, lambda: DRAIN)(scope, receive, send))
    status, close = _status_and_close(sent)
    assert close and json.loads(sent[1]["body"])["field"] == "Content-Length"
    assert status == 422


def test_no_drain_allowance_refuses_at_once() -> None:
    # serve.body_drain_bytes = 0: nothing past the limit is read; the refusal closes.
    incoming = iter([{"type": "http.request", "body": b"x" * 2048, "more_body": True},
                     {"type": "http.request", "body": b"x", "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(*_: Any) -> None:
        raise AssertionError("must not be called")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"2049")]}
    asyncio.run(BodyLimitMiddleware(app, lambda: LIMIT, lambda: 0)(scope, receive, send))
    assert _status_and_close(sent) == (413, True)
    assert next(incoming)["body"] == b"x" * 2048  # not a byte was read
