"""A hostile OpenAI-compatible provider for the fault suite: answers that never end or never
stop growing, in each place an answer can grow (headers, body, compressed body, stream).

It runs its own asyncio loop in a background thread (as ``proxy.Proxy`` does), speaks raw
HTTP/1.1 (aiohttp, under the mock provider, cannot send endless headers) and answers every
POST as its ``mode`` says; the test's thread sets the mode (``hostile.mode = "gzip_bomb"``):

- ``ok``: a valid chat completion, or a valid stream when the request asked for one;
- ``huge_body``: a 200 announcing 1 GiB, sent until the client leaves;
- ``endless_body``: a chunked 200 that never ends;
- ``gzip_bomb``: 1 GiB of zeros gzipped into 1 MB (as an event stream when one was asked);
- ``endless_headers``: a status line, then one header whose value never ends;
- ``many_headers``: a status line, then header after header, never the blank line;
- ``huge_error``: a 500 whose body is 1 GiB;
- ``drip_first``: an event stream that drips a byte every 100 ms, never completing an event;
- ``drip_after``: one complete event, then the same drip;
- ``giant_event``: an event stream whose first event never ends (``data: xxxx...``);
- ``endless_events``: a valid event every 10 ms, forever.

``served`` counts the requests answered in each mode, ``sent`` the bytes written.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

import orjson

GiB = 1 << 30
BLOCK = b"x" * 65536
DRIP_S = 0.1
EVENT_EVERY_S = 0.01
CONTROL_TIMEOUT_S = 10.0
MODES = ("ok", "huge_body", "endless_body", "gzip_bomb", "endless_headers", "many_headers",
         "huge_error", "drip_first", "drip_after", "giant_event", "endless_events")  # fmt: skip
STREAM_MODES = frozenset({"drip_first", "drip_after", "giant_event", "endless_events"})
"""Modes that only make sense for a streamed request."""
KEEP_ALIVE = frozenset({"ok", "gzip_bomb"})
"""Modes whose answer is complete HTTP: the connection may carry the next request."""

COMPLETION = orjson.dumps({
    "id": "chatcmpl-hostile", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
})  # fmt: skip
TOKEN_EVENT = b"data: " + orjson.dumps({
    "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 0, "model": "m",
    "choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}],
}) + b"\n\n"  # fmt: skip
USAGE_EVENT = b"data: " + orjson.dumps({
    "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 0, "model": "m",
    "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
}) + b"\n\n"  # fmt: skip
EVENT_STREAM = b"Content-Type: text/event-stream"


def gzip_bomb(inflated: int = GiB) -> bytes:
    """``inflated`` bytes of zeros (a multiple of 1 MiB) as a gzip stream of ~1/1000 the size.

    Each MiB is compressed after a full flush, so every block after the first is the same
    bytes: one is repeated rather than compressing the whole. No trailer: it is never read.
    """
    zeros = bytes(1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    return first + block * (inflated // len(zeros) - 1)


def _head(status: bytes, *lines: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 " + status, *lines]) + b"\r\n\r\n"


class Hostile:
    """The hostile provider on ``127.0.0.1:<port>``; ``base_url`` is what the router gets."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.port = 0
        self.served: Counter[str] = Counter()
        self.sent = 0
        self._bomb = gzip_bomb()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hostile-provider")  # fmt: skip
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Hostile:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(CONTROL_TIMEOUT_S)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(CONTROL_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> Hostile:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the loop ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while (stream := await _read_request(reader)) is not None:
                mode = self.mode
                self.served[mode] += 1
                if not await self._answer(mode, stream, writer):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the router gave up on us: that is the point
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.sent += len(data)

    async def _answer(self, mode: str, stream: bool, w: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the connection may carry another."""
        if mode == "ok":
            await self._write(w, self._ok(stream))
        else:
            await self._ANSWERS[mode](self, w, stream)
        return mode in KEEP_ALIVE

    @staticmethod
    def _ok(stream: bool) -> bytes:
        if not stream:
            length = f"Content-Length: {len(COMPLETION)}".encode()
            return _head(b"200 OK", b"Content-Type: application/json", length) + COMPLETION
        body = TOKEN_EVENT * 3 + USAGE_EVENT + b"data: [DONE]\n\n"
        return _head(b"200 OK", EVENT_STREAM, f"Content-Length: {len(body)}".encode()) + body

    async def _forever(self, w: asyncio.StreamWriter, first: bytes, piece: bytes) -> None:
        await self._write(w, first)
        while True:
            await self._write(w, piece)

    async def _huge_body(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._forever(w, _head(b"200 OK", b"Content-Length: %d" % GiB), BLOCK)

    async def _endless_body(self, w: asyncio.StreamWriter, stream: bool) -> None:
        chunk = b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n"
        await self._forever(w, _head(b"200 OK", b"Transfer-Encoding: chunked"), chunk)

    async def _gzip_bomb(self, w: asyncio.StreamWriter, stream: bool) -> None:
        kind = EVENT_STREAM if stream else b"Content-Type: application/json"
        length = f"Content-Length: {len(self._bomb)}".encode()
        await self._write(w, _head(b"200 OK", kind, b"Content-Encoding: gzip", length))
        await self._write(w, self._bomb)

    async def _endless_headers(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._forever(w, b"HTTP/1.1 200 OK\r\nX-Endless: ", BLOCK)

    async def _many_headers(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._write(w, b"HTTP/1.1 200 OK\r\n")
        n = 0
        while True:
            await self._write(w, b"".join(b"X-H%d: 1\r\n" % (n + i) for i in range(1000)))
            n += 1000

    async def _huge_error(self, w: asyncio.StreamWriter, stream: bool) -> None:
        head = _head(b"500 Internal Server Error", b"Content-Type: application/json",
                     b"Content-Length: %d" % GiB)  # fmt: skip
        await self._forever(w, head + b'{"error": {"message": "', BLOCK)

    async def _drip(self, w: asyncio.StreamWriter, first: bytes) -> None:
        await self._write(w, _head(b"200 OK", EVENT_STREAM) + first + b"data: ")
        while True:
            await asyncio.sleep(DRIP_S)
            await self._write(w, b"x")

    async def _drip_first(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._drip(w, b"")

    async def _drip_after(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._drip(w, TOKEN_EVENT)

    async def _giant_event(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._forever(w, _head(b"200 OK", EVENT_STREAM) + b"data: ", BLOCK)

    async def _endless_events(self, w: asyncio.StreamWriter, stream: bool) -> None:
        await self._write(w, _head(b"200 OK", EVENT_STREAM))
        while True:
            await self._write(w, TOKEN_EVENT)
            await asyncio.sleep(EVENT_EVERY_S)

    _ANSWERS: dict[str, Callable[[Hostile, asyncio.StreamWriter, bool], Awaitable[None]]] = {
        "huge_body": _huge_body,
        "endless_body": _endless_body,
        "gzip_bomb": _gzip_bomb,
        "endless_headers": _endless_headers,
        "many_headers": _many_headers,
        "huge_error": _huge_error,
        "drip_first": _drip_first,
        "drip_after": _drip_after,
        "giant_event": _giant_event,
        "endless_events": _endless_events,
    }


async def _read_request(reader: asyncio.StreamReader) -> bool | None:
    """Read one request; whether it asked for a stream (None: the connection ended)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = orjson.loads(await reader.readexactly(length) or b"{}")
    return isinstance(body, dict) and body.get("stream") is True
