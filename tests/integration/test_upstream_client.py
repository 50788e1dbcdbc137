"""The hot path's HTTP client (router/upstream/client.py) against real HTTP servers on loopback.

A scripted asyncio server answers each request with raw bytes, so framings the mock provider
never produces (gzip, chunked, close-delimited, malformed) are covered too; the mock provider
itself is behind every router test.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from loadtest.procs import free_port
from router.config import Provider, Timeouts
from router.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from router.upstream.client import Upstream
from router.upstream.providers.base import UpstreamRequest
from tests.helpers import async_wait_until
from tests.integration.scripted import read_request, scripted_server

Answer = Callable[[bytes], list[bytes] | None]
"""Given the request bytes, what to send back, piece by piece (``None``: close at once; an
empty piece: close after the pieces before it)."""


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    closed: int = 0
    """Connections ended (the client closed them, or the answer did)."""
    requests: list[bytes] = field(default_factory=list)
    answer: Answer = lambda _req: [ok_response(b'{"ok":true}')]
    gap_s: float = 0.0
    """Pause between the pieces of an answer."""
    hang: bool = False


def ok_response(body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(), *extra]  # fmt: skip
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv.connections += 1
        try:
            while (req := await read_request(reader)) is not None:
                srv.requests.append(req)
                if srv.hang:
                    await asyncio.sleep(30)
                pieces = srv.answer(req)
                if pieces is None or b"" in pieces:
                    for piece in (pieces or [])[: (pieces or [b""]).index(b"")]:
                        writer.write(piece)
                    await writer.drain()
                    break
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    if srv.gap_s:
                        await asyncio.sleep(srv.gap_s)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            srv.closed += 1
            writer.close()

    async with scripted_server(handle) as port:
        srv.port = port
        yield srv


def request(srv: Server, headers: dict[str, str] | None = None) -> UpstreamRequest:
    return UpstreamRequest(
        f"http://127.0.0.1:{srv.port}/v1/chat/completions",
        {"content-type": "application/json", **(headers or {})},
        b'{"model":"m"}',
    )


def deadline(s: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + s


TIMEOUTS = Timeouts(connect_s=1.0, read_s=1.0)


async def fetch(u: Upstream, srv: Server, **kw: dict[str, str]) -> tuple[int, bytes]:
    resp = await u.send(request(srv, **kw), TIMEOUTS, deadline())
    try:
        return resp.status, await resp.read(deadline())
    finally:
        resp.close()


async def test_keeps_connections_alive_and_sends_a_well_formed_request(
    upstream: Upstream, server: Server
) -> None:
    for _ in range(5):
        assert await fetch(upstream, server, headers={"authorization": "Bearer k"}) == (
            200,
            b'{"ok":true}',
        )
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in head
    assert b"Content-Length: 13" in head
    assert b"authorization: Bearer k" in head
    assert server.requests[0].endswith(b'{"model":"m"}')


async def test_a_connection_in_use_when_the_client_closes_is_closed_once_given_back(
    upstream: Upstream, server: Server
) -> None:
    """``Upstream.close()`` while an answer is still read (a stream at shutdown): its
    connection is closed when the answer is, not put in a pool nobody closes any more (a
    socket left open past the event loop: a ResourceWarning, an fd held)."""
    resp = await upstream.send(request(server), TIMEOUTS, deadline())
    await upstream.close()
    assert await resp.read(deadline()) == b'{"ok":true}'
    resp.close()

    async def closed() -> bool:
        return server.closed == 1

    await async_wait_until(closed, what="the provider to see the connection closed")
    assert await fetch(upstream, server) == (200, b'{"ok":true}')  # a new pool, a new one
    assert server.connections == 2


async def test_concurrent_requests_use_separate_connections(
    upstream: Upstream, server: Server
) -> None:
    server.gap_s = 0.05
    results = await asyncio.gather(*(fetch(upstream, server) for _ in range(4)))
    assert all(r == (200, b'{"ok":true}') for r in results)
    assert server.connections == 4
    await asyncio.gather(*(fetch(upstream, server) for _ in range(4)))
    assert server.connections == 4  # all four were pooled and reused


async def test_reads_gzip_chunked_and_close_delimited_bodies(
    upstream: Upstream, server: Server
) -> None:
    body = b'{"choices":[]}' * 100
    server.answer = lambda _req: [ok_response(gzip.compress(body), b"Content-Encoding: gzip")]
    assert await fetch(upstream, server) == (200, body)

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    server.answer = lambda _req: [chunked]
    assert await fetch(upstream, server) == (200, b"hello")

    server.answer = lambda _req: [b"HTTP/1.1 200 OK\r\n\r\nuntil-eof", b""]
    assert await fetch(upstream, server) == (200, b"until-eof")
    before = server.connections
    server.answer = lambda _req: [ok_response(b"{}")]
    assert await fetch(upstream, server) == (200, b"{}")
    assert server.connections == before + 1  # a close-delimited answer's connection is gone


async def test_streams_chunks_as_they_come(upstream: Upstream, server: Server) -> None:
    frames = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    pieces = [head] + [f"{len(f):x}\r\n".encode() + f + b"\r\n" for f in frames] + [b"0\r\n\r\n"]
    server.answer = lambda _req: pieces
    server.gap_s = 0.05
    resp = await upstream.send(request(server), TIMEOUTS, deadline())
    loop = asyncio.get_running_loop()
    got, times = [], []
    async for data in resp.chunks():
        got.append(data)
        times.append(loop.time())
    resp.close()
    assert b"".join(got) == b"".join(frames)
    assert len(got) >= 3  # relayed one by one, not buffered whole
    assert times[-1] - times[0] >= 0.08


async def test_a_stream_times_out_only_when_silent_for_the_read_timeout(
    upstream: Upstream, server: Server
) -> None:
    """The read timeout is a silence, not a total: a stream whose chunks come every 0.1 s
    goes on for 1 s under a 0.3 s read timeout, and one that stops is cut once it has been
    silent for the read timeout."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    frames = [f"{len(f):x}\r\n".encode() + f + b"\r\n" for f in [b"data: x\n\n"] * 10]
    timeouts = Timeouts(connect_s=1.0, read_s=0.3)
    loop = asyncio.get_running_loop()

    server.answer = lambda _req: [head, *frames, b"0\r\n\r\n"]
    server.gap_s = 0.1
    resp = await upstream.send(request(server), timeouts, deadline())
    got = [data async for data in resp.chunks()]
    resp.close()
    assert len(got) >= 10

    # three chunks, then silence: the server waits for a next request on the connection
    server.answer = lambda _req: [head, *frames[:3]]
    server.gap_s = 0.0
    resp = await upstream.send(request(server), timeouts, deadline())
    last = [loop.time()]

    async def drain() -> None:
        async for _ in resp.chunks():
            last.append(loop.time())

    with pytest.raises(UpstreamTimeout):
        await drain()
    silent = loop.time() - last[-1]
    resp.close()
    assert 0.25 <= silent < 3.0, silent


async def test_refused_hung_cut_and_malformed_answers_are_upstream_errors(
    upstream: Upstream, server: Server
) -> None:
    closed = Server(port=free_port())
    with pytest.raises(UpstreamConnectError, match="could not connect"):
        await upstream.send(request(closed), TIMEOUTS, deadline())

    server.hang = True
    with pytest.raises(UpstreamTimeout):
        await upstream.send(request(server), Timeouts(connect_s=1, read_s=0.2), deadline())
    server.hang = False

    server.answer = lambda _req: None  # closes without answering
    with pytest.raises(UpstreamConnectError, match="connection lost"):
        await upstream.send(request(server), TIMEOUTS, deadline())

    server.answer = lambda _req: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b""]
    resp = await upstream.send(request(server), TIMEOUTS, deadline())
    with pytest.raises(UpstreamProtocolError, match="cut off"):
        await resp.read(deadline())
    resp.close()

    server.answer = lambda _req: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"]
    resp = await upstream.send(request(server), TIMEOUTS, deadline())
    with pytest.raises(UpstreamTimeout):  # the server holds the connection: read times out
        await resp.read(deadline(0.3))
    resp.close()

    server.answer = lambda _req: [b"NOT HTTP AT ALL\r\n\r\n"]
    with pytest.raises(UpstreamProtocolError, match="malformed"):
        await upstream.send(request(server), TIMEOUTS, deadline())


async def test_a_header_with_a_line_break_is_refused_before_sending(
    upstream: Upstream, server: Server
) -> None:
    with pytest.raises(UpstreamProtocolError, match="line break"):
        await upstream.send(
            request(server, headers={"traceparent": "x\r\nX-Injected: 1"}), TIMEOUTS, deadline()
        )
    assert server.requests == []


async def test_a_capped_provider_that_closes_each_connection_hands_the_slots_on(
    upstream: Upstream, server: Server
) -> None:
    """With ``max_connections``, a connection the provider closes frees its slot for the
    next waiter (no request waits out its deadline)."""
    server.answer = lambda _req: [ok_response(b'{"ok":true}', b"Connection: close"), b""]
    prov = Provider.model_validate(
        {"name": "p", "kind": "openai", "base_url": "http://x", "max_connections": 2}
    )

    async def one() -> tuple[int, bytes]:
        resp = await upstream.send(request(server), TIMEOUTS, deadline(), provider=prov)
        async with resp:
            return resp.status, await resp.read(deadline())

    results = await asyncio.gather(*(one() for _ in range(12)))
    assert results == [(200, b'{"ok":true}')] * 12
    assert server.connections == 12
