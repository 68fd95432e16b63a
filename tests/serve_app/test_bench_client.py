"""bench.serve's load client against a local server of known speed: paced runs are timed from
each request's slot on the schedule (no coordinated omission), across reconnections too."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from bench.serve import ClosedLoopClient, http_post
from tickcast.net import free_port

SERVICE_S = 0.02  # the server answers one request every 20 ms: at most 50 a second


class _SlowServer:
    """HTTP/1.1 keep-alive server answering after ``SERVICE_S``, one request at a time per
    connection; with ``close_every`` it ends the connection after that many answers."""

    def __init__(self, close_every: int | None = None) -> None:
        self.port = free_port()
        self.close_every = close_every
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(SERVICE_S)
                served += 1
                close = self.close_every is not None and served % self.close_every == 0
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             + (b"Connection: close\r\n" if close else b"") + b"\r\nok")
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()
        server.close()

    def __enter__(self) -> "_SlowServer":
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _client(port: int) -> ClosedLoopClient:
    return ClosedLoopClient("127.0.0.1", port, [http_post("127.0.0.1", port, "/", b"{}")])


def test_a_paced_run_charges_the_server_for_falling_behind() -> None:
    with _SlowServer() as srv:
        # 100 requests a second offered on one connection, 50 served: the queue grows.
        res = _client(srv.port).run(1, 2.0, warmup_s=0.0, per_connection_rps=100)
    assert res.errors == 0 and 60 <= res.requests <= 110
    lat = np.sort(res.latencies_ms)
    # Timed from its slot, the k-th answer is about k * 10 ms late: the last ones wait ~1 s,
    # where timing from the actual send would say 20 ms every time.
    assert lat[-1] > 700 and res.pct(50) > 200
    assert res.backlog > 50  # slots passed and still owed when the run ended


def test_closed_loop_runs_time_each_request_from_its_send() -> None:
    with _SlowServer() as srv:
        res = _client(srv.port).run(1, 1.0, warmup_s=0.0)
    assert res.errors == 0 and res.backlog == 0
    assert SERVICE_S * 1e3 <= res.pct(50) < SERVICE_S * 1e3 + 15


def test_a_reconnection_keeps_the_schedule() -> None:
    with _SlowServer(close_every=5) as srv:
        # 25 a second offered, 50 possible: the server keeps up, closing every 5th answer.
        client = _client(srv.port)
        t0 = time.monotonic()
        res = client.run(1, 2.0, warmup_s=0.0, per_connection_rps=25)
        wall = time.monotonic() - t0
    assert res.reconnects >= 5 and res.errors == 0
    # About 25 a second kept across the reconnections (a fresh schedule per connection would
    # send its first request at once: more), and no slot was lost (fewer).
    assert 45 <= res.requests <= 51, (res.requests, wall)
    assert res.pct(99) < 200
