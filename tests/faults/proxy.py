"""A small fault-injecting TCP proxy for tests (toxiproxy is not packaged in Debian).

It runs its own asyncio event loop in a background thread, listens on a free loopback port
and forwards every connection to one target ``host:port``. The test thread changes its
behaviour at run time:

- ``delay(ms, jitter_ms, direction)``: each chunk read from either side (or one: ``up`` is
  client to target, ``down`` target to client) is forwarded ``ms`` (give or take up to
  ``jitter_ms``, uniformly) after it was read, never before the chunk ahead of it: a delay
  line, so chunks in flight overlap their waits as on a slow network;
- ``cut()``: close every current connection (both sides get a FIN);
- ``reset()``: abort every current connection with ``SO_LINGER 0`` (both sides get an RST);
- ``blackhole(True)``: keep accepting and holding connections, but forward nothing and answer
  nothing; bytes that arrive meanwhile are dropped, as a network hole drops packets, and
  ``blackhole(False)`` closes the connections that lost bytes (their protocol is broken);
- ``disable()`` / ``enable()``: stop listening (new connections are refused, existing ones
  keep working) and listen again on the same port.

``stats()`` counts connections and bytes; ``capture(limit)`` keeps the first ``limit`` bytes
that clients send from then on, for ``captured()``. Either side closing or failing ends the
whole connection (no half-close): enough for HTTP/1.1 and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536
LINE_CHUNKS = 256
"""Chunks a delay line holds before the reading side waits (backpressure)."""
CONTROL_TIMEOUT_S = 10.0
"""Longest a control call waits for the proxy's loop (it never blocks on a connection)."""


_Line = asyncio.Queue[tuple[float, bytes] | None]
"""One direction of a connection: chunks read and the time each is due, then None at its end."""


@dataclass(slots=True)
class ProxyStats:
    """Connection and byte counters of one proxy."""

    accepted: int = 0
    """Client connections accepted, in total."""
    active: int = 0
    """Connections open now."""
    upstream_failures: int = 0
    """Accepted connections whose target could not be reached (closed at once)."""
    cut: int = 0
    """Connections closed by ``cut()`` or because they lost bytes in a blackhole."""
    reset: int = 0
    """Connections aborted with an RST by ``reset()``."""
    bytes_up: int = 0
    """Bytes forwarded from clients to the target."""
    bytes_down: int = 0
    """Bytes forwarded from the target to clients."""
    dropped: int = 0
    """Bytes swallowed by the blackhole."""


@dataclass(eq=False, slots=True)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    poisoned: bool = False
    """Lost bytes in the blackhole: its byte stream is broken."""


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort the connection so that the peer gets an RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._stats = ProxyStats()
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._delayed = {"up": True, "down": True}
        self._blackhole = False
        self._capture = bytearray()
        self._capture_limit = 0
        self._conns: set[_Conn] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"proxy->{target_port}")  # fmt: skip
        self._started = False

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> Proxy:
        """Start the loop thread and listen on a free loopback port."""
        self._thread.start()
        self._started = True
        self._call(self._listen(0))
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then stop the loop and its thread."""
        if not self._started:
            self._loop.close()
            return
        self._started = False
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the proxy's address as an HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    # -- faults (called from the test's thread) -------------------------------------------

    def delay(self, ms: float, jitter_ms: float = 0, direction: str = "both") -> None:
        """Forward every chunk ``ms`` ± up to ``jitter_ms`` milliseconds after it was read
        (0: at once), in ``direction``: ``both``, ``up`` (to the target) or ``down``."""
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction must be both, up or down, not {direction!r}")
        self._delay_s, self._jitter_s = max(0.0, ms) / 1000, max(0.0, jitter_ms) / 1000
        self._delayed = {"up": direction != "down", "down": direction != "up"}

    def cut(self) -> int:
        """Close every current connection; return how many were closed."""
        return self._call(self._close_all(rst=False))

    def reset(self) -> int:
        """Abort every current connection with an RST; return how many were aborted."""
        return self._call(self._close_all(rst=True))

    def blackhole(self, on: bool = True) -> None:
        """Swallow all traffic (``True``) or forward it again (``False``)."""
        self._call(self._set_blackhole(on))

    def disable(self) -> None:
        """Stop listening: new connections are refused; current ones go on."""
        self._call(self._unlisten())

    def enable(self) -> None:
        """Listen again, on the same port."""
        self._call(self._listen(self.port))

    def capture(self, limit: int = 1 << 20) -> None:
        """Keep the first ``limit`` bytes clients send from now on (0: stop capturing)."""
        self._call(self._set_capture(limit))

    def captured(self) -> bytes:
        """What ``capture`` kept so far."""
        return self._call(self._captured())

    def stats(self) -> ProxyStats:
        """A copy of the counters."""
        return self._call(self._snapshot())

    # -- inside the loop ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _snapshot(self) -> ProxyStats:
        return replace(self._stats, active=len(self._conns))

    async def _set_capture(self, limit: int) -> None:
        self._capture, self._capture_limit = bytearray(), limit

    async def _captured(self) -> bytes:
        return bytes(self._capture)

    async def _listen(self, port: int) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, reuse_address=True, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_blackhole(self, on: bool) -> None:
        self._blackhole = on
        if not on:
            for conn in [c for c in self._conns if c.poisoned]:
                self._stats.cut += 1
                await self._end(conn, rst=False)

    async def _close_all(self, rst: bool) -> int:
        conns = list(self._conns)
        for conn in conns:
            if rst:
                self._stats.reset += 1
            else:
                self._stats.cut += 1
            await self._end(conn, rst=rst)
        return len(conns)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._close_all(rst=False)
        await asyncio.gather(*self._closers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.target)
        except OSError:
            self._stats.upstream_failures += 1
            await self._end(conn, rst=False)
            return
        if conn not in self._conns:  # cut while connecting
            await self._end(conn, rst=False)
            return
        up_line: _Line = asyncio.Queue(LINE_CHUNKS)
        down_line: _Line = asyncio.Queue(LINE_CHUNKS)
        conn.tasks = [
            asyncio.create_task(self._read(conn, reader, up_line, up=True)),
            asyncio.create_task(self._deliver(conn, up_line, conn.upstream, up=True)),
            asyncio.create_task(self._read(conn, up_reader, down_line, up=False)),
            asyncio.create_task(self._deliver(conn, down_line, writer, up=False)),
        ]

    def _hold_s(self, up: bool) -> float:
        if not self._delay_s or not self._delayed["up" if up else "down"]:
            return 0.0
        return max(0.0, self._delay_s + random.uniform(-self._jitter_s, self._jitter_s))

    async def _read(self, conn: _Conn, src: asyncio.StreamReader, line: _Line, *, up: bool) -> None:
        """Put each chunk on the line with the time it is due (never before the one ahead)."""
        loop = asyncio.get_running_loop()
        due = 0.0
        try:
            while data := await src.read(CHUNK):
                due = max(due, loop.time() + self._hold_s(up))
                await line.put((due, data))
        except (OSError, asyncio.IncompleteReadError):
            self._end_later(conn)  # the side went away: the connection ends now
            return
        await line.put(None)  # end of stream: the connection ends once the line is delivered

    async def _deliver(
        self, conn: _Conn, line: _Line, dst: asyncio.StreamWriter, *, up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await line.get()) is not None:
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if self._blackhole:
                    conn.poisoned = True
                    self._stats.dropped += len(data)
                    continue
                dst.write(data)
                await dst.drain()
                self._count(data, up)
        except OSError:
            pass  # either side went away: the connection ends below
        finally:
            self._end_later(conn)

    def _count(self, data: bytes, up: bool) -> None:
        if up:
            self._stats.bytes_up += len(data)
            room = self._capture_limit - len(self._capture)
            if room > 0:
                self._capture += data[:room]
        else:
            self._stats.bytes_down += len(data)

    def _end_later(self, conn: _Conn) -> None:
        if conn in self._conns:
            # the other tasks are cancelled by _end; this one is ending by itself
            asyncio.get_running_loop().call_soon(self._end_soon, conn)

    def _end_soon(self, conn: _Conn) -> None:
        if conn in self._conns:
            task = asyncio.get_running_loop().create_task(self._end(conn, rst=False))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def _end(self, conn: _Conn, *, rst: bool) -> None:
        """Close both sides of ``conn`` and wait for its pipes to finish."""
        self._conns.discard(conn)
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            if rst:
                _rst(writer)
            else:
                writer.close()
        current = asyncio.current_task()
        pending = [t for t in conn.tasks if t is not current and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for writer in (conn.client, conn.upstream):
            if writer is not None:
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()


class ProxyPool:
    """Proxies made for one test (or module), all stopped together."""

    def __init__(self) -> None:
        self.proxies: list[Proxy] = []

    def __call__(self, target_port: int, target_host: str = "127.0.0.1") -> Proxy:
        """A started proxy to ``target_host:target_port``."""
        proxy = Proxy(target_port, target_host).start()
        self.proxies.append(proxy)
        return proxy

    def stop_all(self) -> None:
        for proxy in reversed(self.proxies):
            proxy.stop()
        self.proxies.clear()


@contextlib.contextmanager
def proxies() -> Iterator[ProxyPool]:
    """A ``ProxyPool`` whose proxies are stopped when the block ends."""
    pool = ProxyPool()
    try:
        yield pool
    finally:
        pool.stop_all()
