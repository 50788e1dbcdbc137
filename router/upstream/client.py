"""The upstream HTTP client on the hot path: HTTP/1.1 keep-alive over asyncio, httptools' parser.

Chosen by measurement (loadtest/bench.py, one core): a proxy hop through ``httpx.AsyncClient``
reached about 420 req/s, through aiohttp about 3,700 (FastAPI in front) to 7,100 (bare ASGI),
and in the router aiohttp's request machinery (timeouts, tracing hooks, cookie jar, URL and
header objects) was still a third of the replica's CPU. A provider call needs little of it:
one POST with a few headers, an answer read whole or relayed as it streams, connections kept
alive per origin. That is what this module does, on ``asyncio.Protocol`` with the same C
parser uvicorn uses (httptools), and nothing else. httpx stays for probes, the CLI and tests.

Everything a provider sends is bounded here (``Provider.bounds``): the status line and
headers, a whole answer's body as received and once inflated, an error answer's body. Past a
bound the attempt fails as ``bad_response`` and the connection is dropped, so a provider
cannot make a replica hold more than about one bound per attempt in flight (unbounded, a
1 GiB answer took the replica to 2.2 GB RSS, a 2 MB gzip bomb to 2.3 to 4.2 GB).

Errors become ``UpstreamError``s here, with messages that name no URL or header (no secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

from router.config import Bounds, Provider, ProviderTLS, Timeouts
from router.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from router.upstream.providers.base import UpstreamRequest
from router.upstream.proxy import Proxy, ProxyEnv, open_tunnel, parse_proxy
from router.upstream.resolver import DNS_TTL_S, Resolver
from router.upstream.tlsfiles import TLS_RECHECK_S, TLSContexts

KEEPALIVE_S = 30.0
"""An idle pooled connection older than this is closed rather than reused."""
HIGH_WATER = 256 * 1024
"""Buffered body bytes at which the connection stops reading until the consumer catches up."""
INFLATE_STEP = HIGH_WATER
"""The most one inflate call of a stream produces: a compressed stream (or bomb) is inflated
as it is consumed, a step at a time, never a received chunk at once (up to ~1000x its size)."""
DEFAULT_BOUNDS = Bounds()
MAX_CACHED_URLS = 1024
"""Parsed request URLs kept (a route's targets: a few; the URLs naming a response id are
parsed each time once this many are held)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a URL goes: its origin (pool key), the request line's path, the Host header, and
    the proxy the environment gives it."""

    scheme: str
    host: str
    port: int
    path: bytes
    host_header: bytes
    proxy: Proxy | None = None


def _target(url: str, env: ProxyEnv) -> _Target:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UpstreamProtocolError("the provider's URL is not http(s)")
    default = 443 if u.scheme == "https" else 80
    port = u.port or default
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    host = u.hostname if ":" not in u.hostname else f"[{u.hostname}]"
    host_header = host if port == default else f"{host}:{port}"
    return _Target(
        u.scheme,
        u.hostname,
        port,
        path.encode("ascii"),
        host_header.encode("ascii"),
        env.for_target(u.scheme, u.hostname),
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool: _Pool | None = None
        """The capped pool this connection counts against (``None``: uncapped)."""
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.tls = False
        self.answered = False
        """Whether an answer came whole on it (a TLS connection lost before: see ``_lost``)."""
        self.idle_since = 0.0
        self.resp: UpstreamResponse | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.tls = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            resp._fail(UpstreamProtocolError("the provider switched protocols"))
            self.abort()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, UpstreamError):  # a callback refused: past a bound
                self._refuse(resp, exc.__context__)
            else:
                resp._fail(UpstreamProtocolError("the provider sent malformed HTTP"))
                self.abort()
        else:
            if not resp._headed:  # every byte so far is status line and headers
                resp._head_bytes += len(data)
                if resp._head_bytes > resp._bounds.max_header_bytes:
                    limit = resp._bounds.max_header_bytes
                    self._refuse(resp, UpstreamProtocolError(f"the headers are over {limit} bytes"))

    def _refuse(self, resp: UpstreamResponse, error: UpstreamError) -> None:
        """Fail an answer past a bound: drop what it buffered, and the connection."""
        resp._fail(error)
        resp._chunks.clear()
        resp._buffered = 0
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            self.resp._lost(self.tls and not self.answered)
        if self.pool is not None:
            self.pool.freed()
            self.pool = None

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        headers = self.resp._raw_headers
        if len(headers) >= self.resp._bounds.max_headers:
            raise UpstreamProtocolError(f"the provider sent over {len(headers)} headers")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.resp is not None
        self.resp._head(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp._data(body)

    def on_message_complete(self) -> None:
        assert self.resp is not None
        self.answered = True
        self.resp._complete(self.parser.should_keep_alive())

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


_CORRUPT = "the provider's compressed body is corrupt"


def _inflate(decoder: zlib._Decompress, data: bytes) -> Iterator[bytes]:
    """``data`` inflated a step at a time (the consumer pulls the next step)."""
    while data:
        try:
            out = decoder.decompress(data, INFLATE_STEP)
        except zlib.error:
            raise UpstreamProtocolError(_CORRUPT) from None
        data = decoder.unconsumed_tail
        if out:
            yield out


class UpstreamResponse:
    """A provider's answer whose headers have arrived; the body is read on demand."""

    def __init__(
        self, conn: _Connection, pool: _Pool, read_timeout: float, bounds: Bounds, until: float
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self._bounds = bounds
        self._cap = bounds.max_answer_bytes
        self._head_bytes = 0
        self._until = until
        self._until_error = "the route's timeout ran out"
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._headed = False
        self._done = False
        self._keep_alive = False
        self._released = False
        self._decoder: zlib._Decompress | None = None
        self._paused = False
        self._streaming = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # from the connection
    def _head(self, status: int) -> None:
        self.status = status
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers
        }
        if not 200 <= status < 300:
            self._cap = self._bounds.max_error_bytes
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # gzip or zlib
        elif encoding not in ("identity", ""):
            self._fail(UpstreamProtocolError(f"unsupported content-encoding {encoding!r}"))
            return
        self._headed = True
        self._wake()

    def _data(self, body: bytes) -> None:
        """Buffer body bytes as received (still compressed: they are inflated when read)."""
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > self._cap:  # unread bytes: a whole answer, or a stream's backlog
            raise UpstreamProtocolError(f"the answer is over {self._cap} bytes")
        if self._streaming and self._buffered > HIGH_WATER and not self._paused:
            assert self._conn.transport is not None
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self._done, self._keep_alive = True, keep_alive
        self._wake()

    def _lost(self, new_tls: bool) -> None:
        if self._done or self._error is not None:
            return
        if not self._headed:
            if new_tls:  # TLS 1.3 refuses a client certificate after the handshake: a bare EOF
                why = "a new TLS connection was closed unanswered (client certificate refused?)"
                self._fail(UpstreamConnectError(why))
            else:
                self._fail(UpstreamConnectError("connection lost sending the request"))
        elif "content-length" not in self.headers and "transfer-encoding" not in self.headers:
            self._complete(False)  # a body delimited by the connection's end
        else:
            self._fail(UpstreamProtocolError("the answer was cut off reading the answer"))

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, until: float, timeout_error: str) -> None:
        """Wait for news from the connection until ``until`` (loop time)."""
        self._waiter = self._conn.loop.create_future()
        try:
            async with asyncio.timeout_at(until):
                await self._waiter
        except TimeoutError:
            self._conn.abort()
            raise UpstreamTimeout(timeout_error) from None
        finally:
            self._waiter = None

    # for the caller
    async def _headers(self, until: float) -> None:
        while not self._headed and self._error is None:
            await self._wait(until, "no answer before the timeout")
        # once headed, the status stands: a body that fails (past its bound, cut) says so
        # when read, so that a 5xx is still a 5xx
        if not self._headed and self._error is not None:
            raise self._error

    async def read(self, deadline: float) -> bytes:
        """The whole body, within ``deadline`` (loop time) and the answer's size bound."""
        loop = self._conn.loop
        while not self._done and self._error is None:
            until = min(deadline, loop.time() + self._read_timeout)
            await self._wait(until, "timed out reading the answer")
        if self._error is not None:
            raise self._error
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body if self._decoder is None else self._inflate_whole(self._decoder, body)

    def set_deadline(self, until: float, error: str) -> None:
        """End the waits of ``chunks`` at ``until`` (loop time) with an ``UpstreamTimeout``
        saying ``error``: the caller moves it as a stream goes (its first event, the next)."""
        self._until, self._until_error = until, error

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the provider sends it, chunk by chunk (never buffered whole).

        A wait ends after the read timeout's silence or at the deadline (``set_deadline``;
        at first the one ``Upstream.send`` was given), whichever comes first.
        """
        loop = self._conn.loop
        self._streaming = True
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused and self._conn.transport is not None:
                    self._paused = False
                    self._conn.transport.resume_reading()
                if self._decoder is None:
                    yield data
                else:
                    for piece in _inflate(self._decoder, data):
                        yield piece
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                tail = self._flush_decoder()
                if tail:
                    yield tail
                return
            stall = loop.time() + self._read_timeout
            if self._until <= stall:
                await self._wait(self._until, self._until_error)
            else:
                await self._wait(stall, "the stream stalled past the read timeout")

    def _inflate_whole(self, decoder: zlib._Decompress, data: bytes) -> bytes:
        """A whole compressed body inflated, never past the answer's bound."""
        cap = self._cap
        try:
            out = decoder.decompress(data, cap + 1)
        except zlib.error:
            raise UpstreamProtocolError(_CORRUPT) from None
        if len(out) > cap:
            raise UpstreamProtocolError(f"the answer inflates to over {cap} bytes")
        tail = self._flush_decoder()  # all input is consumed: at most what zlib still holds
        return out + tail if tail else out

    def _flush_decoder(self) -> bytes:
        if self._decoder is None:
            return b""
        try:
            tail = self._decoder.flush()
        except zlib.error:
            raise UpstreamProtocolError(_CORRUPT) from None
        self._decoder = None
        return tail

    def close(self) -> None:
        """Give the connection back (or drop it when the body was not read to the end)."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.resp = None
        if self._done and self._keep_alive and self._error is None and not conn.closed:
            self._pool.put(conn)
        else:
            conn.abort()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Pool:
    """Idle keep-alive connections of one origin, most recently used first.

    With a ``limit`` (a provider's ``max_connections``) it counts the connections open or
    opening; a request past the limit waits in line (``acquire``) for one given back (handed
    to it directly) or closed (its slot handed on).
    """

    def __init__(
        self, limit: int | None = None, tls: ProviderTLS | None = None, proxy: Proxy | None = None
    ) -> None:
        self.idle: deque[_Connection] = deque()
        self.limit = limit
        self.tls = tls
        self.proxy = proxy
        self.opened = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.closed = False
        """Closed with its client: a connection given back (an answer read after
        ``Upstream.close``, a connect that was under way) is closed, not kept idle."""

    async def acquire(
        self, loop: asyncio.AbstractEventLoop, connect: _Connect, until: float
    ) -> _Connection:
        """A connection within the limit, waiting until ``until`` (loop time) for one."""
        while True:
            conn = self.take()
            if conn is not None:
                return conn
            assert self.limit is not None
            if self.opened < self.limit and not self.waiters:
                self.opened += 1
                return await self._open(connect)
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(until):
                    got = await waiter
            except BaseException as exc:
                self._give_back(waiter)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout("waited for a connection past the deadline") from None
                raise
            if got is None:  # a slot, passed on by a closed connection
                return await self._open(connect)
            if not got.closed:
                return got
            # handed over, then closed by the provider: its slot went on; wait again

    def _give_back(self, waiter: asyncio.Future[_Connection | None]) -> None:
        """A waiter gave up: return what it may have been handed meanwhile."""
        if not waiter.done() or waiter.cancelled():
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            return
        got = waiter.result()
        if got is None:
            self.freed()
        elif not got.closed:
            self.put(got)

    async def _open(self, connect: _Connect) -> _Connection:
        """Open a connection in a slot already counted."""
        try:
            conn = await connect()
        except BaseException:
            self.freed()
            raise
        if conn.closed:  # lost before it was counted: free its slot here
            self.freed()
        else:
            conn.pool = self
        return conn

    def freed(self) -> None:
        """A counted connection closed (or failed to open): its slot goes to the next waiter."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.opened -= 1

    def take(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.abort()
        return None

    def put(self, conn: _Connection) -> None:
        if self.closed:  # nobody would ever take or close it
            conn.abort()
            return
        while self.waiters:  # only ever with a limit
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().abort()


_Connect = Callable[[], Awaitable[_Connection]]
_PoolKey = tuple[str, str, int] | tuple[str, str, int, int | None, ProviderTLS | None, Proxy | None]


class Upstream:
    """Sends provider requests over keep-alive connections pooled per origin (and per egress
    setting: a provider's connection cap, TLS settings and proxy)."""

    def __init__(self, dns_ttl_s: float = DNS_TTL_S, tls_recheck_s: float = TLS_RECHECK_S) -> None:
        self._pools: dict[_PoolKey, _Pool] = {}
        self._resolver = Resolver(dns_ttl_s)
        self._targets: dict[str, _Target] = {}
        self._tls = TLSContexts(tls_recheck_s)
        self._proxies: dict[str, Proxy | None] = {"none": None}
        self._env = ProxyEnv()
        self._started = False

    async def start(self, environ: Mapping[str, str] | None = None) -> None:
        """Get ready to send (inside the running event loop); read the proxy variables of
        ``environ`` (default: the process's environment) once."""
        self._env = ProxyEnv.from_environ(os.environ if environ is None else environ)
        self._targets.clear()  # each holds the environment's proxy for it
        self._started = True

    async def close(self) -> None:
        """Close every pooled connection; one in use is closed when given back (its pool is
        closed: the next request opens a new pool)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def send(
        self,
        req: UpstreamRequest,
        timeouts: Timeouts,
        deadline: float,
        bounds: Bounds = DEFAULT_BOUNDS,
        provider: Provider | None = None,
    ) -> UpstreamResponse:
        """Send ``req`` (its method: POST, or GET/DELETE for a stored response); return once
        the status and headers arrived, by ``deadline`` at latest.

        The answer's waits end by ``deadline`` too (until moved); ``bounds`` caps what it may hold.
        ``provider``'s egress settings apply: ``max_connections`` (a request past it waits for
        a connection, by ``deadline``), ``tls`` and ``proxy``.
        """
        if not self._started:
            raise RuntimeError("Upstream.start() was not awaited")
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise UpstreamTimeout("the route's time ran out before this attempt")
        target = self._targets.get(req.url)
        if target is None:
            target = _target(req.url, self._env)
            if len(self._targets) < MAX_CACHED_URLS:  # (GET /v1/responses/<id>: one per id)
                self._targets[req.url] = target
        pool = self._pool(target, provider)
        head_and_body = _request_bytes(target, req)
        within = min(timeouts.connect_s, left)
        if pool.limit is None:
            conn = pool.take() or await self._connect(loop, target, pool, within)
        else:
            conn = await pool.acquire(
                loop, lambda: self._connect(loop, target, pool, within), deadline
            )
        resp = UpstreamResponse(conn, pool, timeouts.read_s, bounds, deadline)
        conn.resp = resp
        assert conn.transport is not None
        conn.transport.write(head_and_body)
        try:
            await resp._headers(min(deadline, loop.time() + timeouts.read_s))
        except BaseException:
            resp.close()
            raise
        return resp

    def _pool(self, target: _Target, provider: Provider | None) -> _Pool:
        """The pool of ``target``'s origin with ``provider``'s egress settings."""
        key: _PoolKey = (target.scheme, target.host, target.port)
        limit = tls = None
        proxy = target.proxy
        if provider is not None and (provider.max_connections or provider.tls or provider.proxy):
            limit, tls = provider.max_connections, provider.tls
            if provider.proxy is not None:
                proxy = self._proxy(provider.proxy)
            key = (target.scheme, target.host, target.port, limit, tls, proxy)
        elif proxy is not None:
            key = (target.scheme, target.host, target.port, None, None, proxy)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(limit, tls, proxy)
        return pool

    def _proxy(self, setting: str) -> Proxy | None:
        """A provider's ``proxy`` setting parsed (once): ``none`` is no proxy."""
        if setting not in self._proxies:
            try:
                self._proxies[setting] = parse_proxy(setting)
            except ValueError as exc:  # the config's pattern lets a bad port through
                raise UpstreamConnectError(f"the provider's proxy setting: {exc}") from None
        return self._proxies[setting]

    def _tls_context(self, settings: ProviderTLS | None) -> ssl.SSLContext:
        """The TLS context of ``settings`` (re-made when its files change)."""
        return self._tls.get(settings)[0]

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        target: _Target,
        pool: _Pool,
        within: float,
    ) -> _Connection:
        tls = self._tls_context(pool.tls) if target.scheme == "https" else None
        try:
            async with asyncio.timeout(within):
                if pool.proxy is not None:
                    return await self._tunnel(loop, target, tls, pool.proxy)
                return await self._direct(loop, target, tls)
        except TimeoutError:
            raise UpstreamTimeout("timed out connecting") from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(f"TLS handshake failed ({exc.reason})") from None
        except OSError as exc:
            raise UpstreamConnectError(f"could not connect ({exc.strerror or 'refused'})") from None

    async def _direct(
        self, loop: asyncio.AbstractEventLoop, target: _Target, tls: ssl.SSLContext | None
    ) -> _Connection:
        """A connection to the first of ``target``'s addresses that answers; when all of a
        cached answer's refuse, the name is looked up again (the provider moved) and tried."""
        addresses, cached = await self._resolver.resolve(loop, target.host, target.port)
        error: OSError | None = None
        for family, address, port in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    address,
                    port,
                    family=family,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
            except ssl.SSLError:
                raise
            except OSError as exc:
                error = exc
                continue
            return conn
        if cached:
            self._resolver.forget(target.host, target.port)
            return await self._direct(loop, target, tls)
        assert error is not None
        raise error

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        target: _Target,
        tls: ssl.SSLContext | None,
        proxy: Proxy,
    ) -> _Connection:
        """A connection through ``proxy``'s CONNECT tunnel, TLS inside it for https."""
        transport = await open_tunnel(loop, proxy, target.host, target.port)
        conn = _Connection(loop)
        try:
            if tls is not None:
                tunneled = await loop.start_tls(transport, conn, tls, server_hostname=target.host)
                if tunneled is None:
                    raise UpstreamConnectError("TLS could not start in the proxy's tunnel")
                transport = tunneled
            else:
                transport.set_protocol(conn)
        except BaseException:
            transport.abort()
            raise
        conn.connection_made(transport)
        return conn


def _request_bytes(target: _Target, req: UpstreamRequest) -> bytes:
    """The request head and body; a header that would split the head is refused."""
    lines = [
        req.method.encode("ascii") + b" " + target.path + b" HTTP/1.1",
        b"Host: " + target.host_header,
        b"Content-Length: " + str(len(req.body)).encode(),
        b"Accept-Encoding: gzip, deflate",
    ]
    for name, value in req.headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise UpstreamProtocolError("a request header holds a line break")
        try:
            lines.append(f"{name}: {value}".encode("latin-1"))
        except UnicodeEncodeError:
            raise UpstreamProtocolError("a request header is not latin-1 text") from None
    return b"\r\n".join(lines) + b"\r\n\r\n" + req.body
