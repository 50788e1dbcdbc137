"""What a provider sends is bounded (router/upstream/client.py): headers, a whole answer, its
inflated size, an error body; a stream's waits end at the deadline its caller sets, however the
bytes trickle in. A scripted loopback server plays the hostile provider.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from router.config import Bounds, Timeouts
from router.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout
from router.upstream.client import INFLATE_STEP, Upstream, UpstreamResponse
from router.upstream.providers.base import UpstreamRequest
from tests.faults.hostile import gzip_bomb
from tests.integration.scripted import read_request, scripted_server

MiB = 1 << 20
BLOCK = b"x" * 65536
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Hostile:
    port: int = 0
    script: Script | None = None
    sent: int = 0
    """Bytes the last answer got onto the wire before the client went away."""

    async def write(self, w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(data)
        await w.drain()
        self.sent += len(data)


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    srv = Hostile()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await read_request(reader) is None:
                return
            srv.sent = 0
            assert srv.script is not None
            await srv.script(writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async with scripted_server(handle) as port:
        srv.port = port
        yield srv


TIMEOUTS = Timeouts(connect_s=1.0, read_s=2.0)
BOUNDS = Bounds(max_answer_bytes=MiB, max_error_bytes=4096, max_header_bytes=8192,
                max_headers=20, max_event_bytes=MiB)  # fmt: skip


async def exchange(
    u: Upstream, srv: Hostile, within: float = 10.0, bounds: Bounds = BOUNDS
) -> bytes:
    """Send one request and read its whole answer; every test bounds this in time."""
    loop = asyncio.get_running_loop()
    req = UpstreamRequest(f"http://127.0.0.1:{srv.port}/v1/chat/completions", {}, b"{}")
    async with asyncio.timeout(within):
        resp = await u.send(req, TIMEOUTS, loop.time() + within, bounds)
        try:
            return await resp.read(loop.time() + within)
        finally:
            resp.close()


def head(*lines: bytes, status: bytes = b"200 OK") -> bytes:
    return b"\r\n".join([b"HTTP/1.1 " + status, *lines]) + b"\r\n\r\n"


async def endless(srv: Hostile, w: asyncio.StreamWriter, first: bytes, piece: bytes) -> None:
    await srv.write(w, first)
    while True:
        await srv.write(w, piece)


async def test_a_huge_answer_fails_at_its_bound(upstream: Upstream, hostile: Hostile) -> None:
    hostile.script = lambda w: endless(hostile, w, head(b"Content-Length: 1073741824"), BLOCK)
    with pytest.raises(UpstreamProtocolError, match=f"answer is over {MiB} bytes"):
        await exchange(upstream, hostile)
    assert hostile.sent < 16 * MiB  # read until the bound (and what the kernel buffers), no more


async def test_an_endless_chunked_answer_fails_at_its_bound(
    upstream: Upstream, hostile: Hostile
) -> None:
    chunk = b"10000\r\n" + BLOCK + b"\r\n"
    hostile.script = lambda w: endless(hostile, w, head(b"Transfer-Encoding: chunked"), chunk)
    with pytest.raises(UpstreamProtocolError, match="over"):
        await exchange(upstream, hostile)


BOMB = gzip_bomb(512 * MiB)  # 512 MiB of zeros in about 530 KB


async def test_a_gzip_bomb_is_inflated_only_up_to_the_bound(
    upstream: Upstream, hostile: Hostile
) -> None:
    async def bomb(w: asyncio.StreamWriter) -> None:
        await hostile.write(w, head(b"Content-Encoding: gzip",
                                    f"Content-Length: {len(BOMB)}".encode()) + BOMB)  # fmt: skip

    hostile.script = bomb
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamProtocolError, match=f"inflates to over {MiB} bytes"):
            await exchange(upstream, hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n{len(BOMB)} bytes of gzip (512 MiB inflated): peak {peak / MiB:.1f} MiB allocated")
    assert peak < len(BOMB) * 3 + 3 * MiB  # the bomb as received, once or twice, and one bound


async def test_a_streamed_gzip_bomb_is_inflated_a_step_at_a_time(
    upstream: Upstream, hostile: Hostile
) -> None:
    async def bomb(w: asyncio.StreamWriter) -> None:
        await hostile.write(w, head(b"Content-Encoding: gzip",
                                    f"Content-Length: {len(BOMB)}".encode()) + BOMB)  # fmt: skip

    hostile.script = bomb
    loop = asyncio.get_running_loop()
    req = UpstreamRequest(f"http://127.0.0.1:{hostile.port}/v1/chat/completions", {}, b"{}")
    resp = await upstream.send(req, TIMEOUTS, loop.time() + 10, BOUNDS)
    got, largest = 0, 0
    try:
        async with asyncio.timeout(10):
            async for piece in resp.chunks():
                largest = max(largest, len(piece))
                got += len(piece)
                if got >= 64 * MiB:
                    break
    finally:
        resp.close()
    assert largest <= INFLATE_STEP  # never a received chunk inflated at once (~1000x)


async def test_endless_headers_fail_at_their_bound(upstream: Upstream, hostile: Hostile) -> None:
    value = b"X-Endless: " + b"a" * 65536
    hostile.script = lambda w: endless(hostile, w, b"HTTP/1.1 200 OK\r\n" + value, b"a" * 65536)
    with pytest.raises(UpstreamProtocolError, match="headers are over 8192 bytes"):
        await exchange(upstream, hostile)
    assert hostile.sent < 16 * MiB

    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(100))  # repeated: still one each
    hostile.script = lambda w: endless(hostile, w, b"HTTP/1.1 200 OK\r\n", headers)
    with pytest.raises(UpstreamProtocolError, match="over 20 headers"):
        await exchange(upstream, hostile)


async def test_an_error_body_is_read_only_up_to_its_own_bound(
    upstream: Upstream, hostile: Hostile
) -> None:
    body = b"e" * 10000
    answer = head(f"Content-Length: {len(body)}".encode(), status=b"500 Oops") + body
    hostile.script = lambda w: hostile.write(w, answer)
    with pytest.raises(UpstreamProtocolError, match="over 4096 bytes"):
        await exchange(upstream, hostile)
    ok = head(f"Content-Length: {len(body)}".encode()) + body
    hostile.script = lambda w: hostile.write(w, ok)
    assert await exchange(upstream, hostile) == body  # a 200 of that size is fine


async def test_a_bound_does_not_leak_into_later_answers(
    upstream: Upstream, hostile: Hostile
) -> None:
    hostile.script = lambda w: endless(hostile, w, head(b"Content-Length: 1073741824"), BLOCK)
    with pytest.raises(UpstreamError):
        await exchange(upstream, hostile)
    body = b'{"ok":true}'
    hostile.script = lambda w: hostile.write(w, head(b"Content-Length: 11") + body)
    assert await exchange(upstream, hostile) == body


async def drip(srv: Hostile, w: asyncio.StreamWriter, first: bytes) -> None:
    await srv.write(w, first)
    while True:
        await asyncio.sleep(0.05)
        await srv.write(w, b"x")


async def drain(resp: UpstreamResponse, move_at: int = 0, move_by: float = 0.0) -> None:
    """Read a stream to its end (in 5 s at most: the old client dripped on for good); at
    piece ``move_at``, move its deadline ``move_by`` seconds ahead."""
    loop = asyncio.get_running_loop()
    pieces = 0
    async with asyncio.timeout(5):
        async for _ in resp.chunks():
            pieces += 1
            if pieces == move_at:
                resp.set_deadline(loop.time() + move_by, "no event in time")


async def dripping(upstream: Upstream, hostile: Hostile, within: float) -> UpstreamResponse:
    hostile.script = lambda w: drip(hostile, w, head(b"Content-Type: text/event-stream"))
    loop = asyncio.get_running_loop()
    req = UpstreamRequest(f"http://127.0.0.1:{hostile.port}/v1/chat/completions", {}, b"{}")
    return await upstream.send(req, TIMEOUTS, loop.time() + within, BOUNDS)


async def test_a_dripping_stream_ends_at_its_deadline(upstream: Upstream, hostile: Hostile) -> None:
    # one byte every 50 ms: never silent for read_s (2 s), so only the deadline can end it
    resp = await dripping(upstream, hostile, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout, match="the route's timeout ran out"):
            await drain(resp)
    finally:
        resp.close()
    assert 0.3 < time.monotonic() - started < 2.0


async def test_the_caller_moves_a_streams_deadline(upstream: Upstream, hostile: Hostile) -> None:
    resp = await dripping(upstream, hostile, 60)
    try:
        with pytest.raises(UpstreamTimeout, match="no event in time"):
            await drain(resp, move_at=3, move_by=0.3)
    finally:
        resp.close()
