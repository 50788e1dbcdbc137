"""One pipelined Redis connection shared by every request of a replica: the scripts' path.

Every request makes two script calls (acquire, release). Through redis-py each call borrows a
pooled connection, packs, writes, reads and returns it, about a fifth of a replica's CPU under
load. Here all callers share one connection: a call packs its command (hiredis, in C), queues
it, and awaits a future; the commands queued in one turn of the event loop go out in one
write, and the replies, which Redis sends in order, resolve the futures in order.

Failure behaves as redis-py's does, with its exception types: a call not answered within the
timeout fails with ``TimeoutError``. While Redis keeps answering (slowly) the connection
stays: the calls behind a late one get their own replies, in order, and only the late ones
fail. Once Redis has sent nothing for a whole timeout while calls wait, the connection is
given up: every call queued on it fails with ``TimeoutError`` and it is closed. (Closing at
the first late reply failed every call queued behind it, so a Redis answering most calls
within the timeout still failed most of them.) A lost connection fails every call queued on
it with ``ConnectionError``; the next call connects again. A script Redis does not know
(restarted, ``SCRIPT FLUSH``) is sent once in full with ``EVAL``, which also caches it.

Given a ``resolver`` (Sentinel, Cluster), each new connection asks it where to connect, and
one of these replies gives the connection up, so that the next call asks again: ``READONLY``
(the server became a replica), ``NOREPLICAS`` (the primary has not heard from its replicas
for longer than its ``min-replicas-max-lag``: it is cut off, a failover is likely under way)
and ``CLUSTERDOWN`` (a cluster node cut off from the majority). ``retire`` does the same
without failing anything: the calls already sent finish on the old connection, the next ones
go to where the resolver says (the topology heard of a switch). Without a resolver the URL's
address is fixed and nothing else changes.

A Redis Cluster moving the pool's slot to another node (resharding) answers in three ways,
and each is followed within the call's timeout (none of them ran the command):

- ``MOVED``: another node owns the slot now. The connection is given up and the call sent
  again on a new one, where the resolver says now.
- ``ASK``: the slot is being migrated and the call's keys are gone (or were never there):
  the call is sent to the named node, preceded by ``ASKING``, on a side connection to it
  (pipelined too: the two are queued together, so nothing comes between them). Side
  connections are closed once a ``MOVED`` says the migration ended.
- ``TRYAGAIN``: some of a multi-key call's keys have moved and some not yet, or (on the
  importing node) some do not exist, as an empty lease set: sent again after a short pause
  (1 ms, doubling up to 20 ms) while the timeout allows. A call naming a key that exists
  on neither node gets it until the migration ends: past its timeout it fails as any
  Redis failure does (that request decides locally).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import parse_url


def _pack(*args: Any) -> bytes:
    """One command in RESP, packed in C."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class NoReplicasError(rx.ResponseError):
    """``NOREPLICAS``: the primary refuses writes, having heard from too few replicas lately
    (its ``min-replicas-to-write`` and ``min-replicas-max-lag``)."""


def _reply_error(err: hiredis.ReplyError) -> rx.RedisError:
    text = str(err)
    if text.startswith("NOSCRIPT"):
        return rx.NoScriptError(text)
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return rx.AuthenticationError(text)
    if text.startswith("READONLY"):
        return rx.ReadOnlyError(text)
    if text.startswith("MOVED "):
        return rx.MovedError(text.split(" ", 1)[1])
    if text.startswith("ASK "):
        return rx.AskError(text.split(" ", 1)[1])
    if text.startswith("TRYAGAIN"):
        return rx.TryAgainError(text)
    if text.startswith("NOREPLICAS"):
        return NoReplicasError(text)
    if text.startswith("CLUSTERDOWN"):
        return rx.ClusterDownError(text)
    return rx.ResponseError(text)


class _Protocol(asyncio.Protocol):
    """The connection: queued commands out, replies in, matched first in, first out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        """Every call sent and not answered yet, in order (some may have failed already)."""
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        """The calls of ``pending`` still within their timeout, with their deadlines: the
        newest part of it (calls are queued in order, with one timeout)."""
        self.heard = loop.time()
        """When Redis last sent anything on this connection."""
        self.out: list[bytes] = []
        self.closed: rx.RedisError | None = None
        self.retired: rx.RedisError | None = None
        """Set when the server no longer owns the pool's slot: closed with this error
        once the calls already sent have their replies (which redirect them too)."""
        self.gone: asyncio.Future[None] = loop.create_future()
        """Done once the transport has closed its socket."""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; its reply resolves the returned future."""
        if self.closed is not None:
            raise self.closed
        fut = self.loop.create_future()
        deadline = self.loop.time() + self.timeout
        if not self.waiting:
            self._arm(deadline)
        self.pending.append(fut)
        self.waiting.append((fut, deadline))
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(packed)
        return fut

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and self.closed is None and out:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                fut = self.pending.popleft()
                if self.waiting and self.waiting[0][0] is fut:
                    self.waiting.popleft()
                if fut.done():  # its caller was cancelled, or it failed as late
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(_reply_error(reply))
                else:
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(rx.ConnectionError(f"bad reply from Redis: {exc!r}"))
        if self.retired is not None and not self.pending:
            self.fail(self.retired)

    def retire(self, error: rx.RedisError) -> None:
        """Take no new calls; close once the calls already sent are answered."""
        if self.retired is None:
            self.retired = error
        if not self.pending:
            self.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        self.fail(rx.ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def fail(self, error: rx.RedisError) -> None:
        """Close the connection; every call still queued on it fails with ``error``."""
        if self.closed is None:
            self.closed = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        self.waiting.clear()
        while self.pending:
            _settle(self.pending.popleft(), error)

    def _arm(self, when: float) -> None:
        if self._timer is None:
            self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        """The oldest waiting call's deadline came: fail the late calls, and give the
        connection up if Redis has gone silent."""
        self._timer = None
        now = self.loop.time()
        if not self.waiting:
            return
        if self.waiting[0][1] > now:
            self._arm(self.waiting[0][1])
            return
        late = rx.TimeoutError(f"Redis did not answer within {self.timeout * 1000:g} ms")
        if now - self.heard >= self.timeout:  # nothing at all for a whole timeout
            self.fail(late)
            return
        while self.waiting and self.waiting[0][1] <= now:  # slow, not silent: only these
            _settle(self.waiting.popleft()[0], late)
        if self.waiting:
            self._arm(self.waiting[0][1])


TRYAGAIN_FIRST_S = 0.001
"""The first pause before a call answered ``TRYAGAIN`` is sent again (doubling each time)."""
TRYAGAIN_MAX_S = 0.02
"""The longest pause between two tries of a ``TRYAGAIN`` call."""
_PACKED_ASKING = _pack("ASKING")


class _Again:
    """Whether, and after what pause, a redirected call is sent again: until its timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.deadline = loop.time() + timeout
        self.pause = TRYAGAIN_FIRST_S
        self.tries = 0

    async def wait(self, pause: bool = True) -> bool:
        """Pause (when ``pause``; doubling each time) and say whether to try again: not if
        that would pass the deadline."""
        delay = self.pause if pause else 0.0
        if self.loop.time() + delay >= self.deadline:
            return False
        self.tries += 1
        if delay:
            await asyncio.sleep(delay)
            self.pause = min(2 * self.pause, TRYAGAIN_MAX_S)
        return True


class MuxRedis:
    """Commands and scripts over one shared, pipelined connection (``redis://`` or ``unix://``)."""

    def __init__(
        self, url: str, timeout: float,
        resolver: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:  # fmt: skip
        if not url.startswith(("redis://", "unix://")):
            raise ValueError("the shared connection takes redis:// or unix:// URLs")
        # redis-py's own parser, so this connection and the pool read one URL the same way
        kw = parse_url(url)
        self.path: str | None = kw.get("path")
        self.host: str = kw.get("host") or "127.0.0.1"
        self.port: int = kw.get("port") or 6379
        self.username: str | None = kw.get("username")
        self.password: str | None = kw.get("password")
        self.db: int = kw.get("db") or 0
        self.timeout = timeout
        self.resolver = resolver
        """Where to connect, asked before each new connection (``None``: the URL's host)."""
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._side: dict[tuple[str, int], _Protocol] = {}
        """Connections to the nodes an ``ASK`` named (a slot being migrated), by address."""
        self._retired: set[_Protocol] = set()
        """Retired connections still waiting for replies (``close`` closes them too)."""

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (redis-py's exceptions on failure)."""
        proto = await self._current()
        if self.resolver is None:
            return await proto.send(_pack(*args))
        return await self._follow(proto, _pack(*args))

    async def _current(self) -> _Protocol:
        proto = self._proto
        if proto is None or proto.closed is not None or proto.retired is not None:
            proto = await self._connection()
        return proto

    async def _follow(self, proto: _Protocol, packed: bytes) -> Any:
        """Send ``packed`` on ``proto``; follow a cluster's ``MOVED``, ``ASK`` and
        ``TRYAGAIN`` answers within the timeout (the module's docstring)."""
        again = _Again(asyncio.get_running_loop(), self.timeout)
        asked: tuple[str, int] | None = None
        """The node an ``ASK`` named: the next try goes there."""
        while True:
            try:
                if asked is None:
                    return await proto.send(packed)
                return await self._ask(*asked, packed)
            except (rx.ReadOnlyError, NoReplicasError, rx.ClusterDownError):
                # the next call asks where to go now
                proto.fail(rx.ConnectionError("the server no longer holds the pool's keys"))
                raise
            except rx.MovedError:  # (an AskError too: caught first)
                if asked is None:  # the slot has a new owner (else: its migration ended)
                    self._moved(proto)
                if not await again.wait(pause=again.tries > 0):  # a stale answer: pause
                    raise
            except rx.AskError as exc:  # migrating: these keys are on the named node
                asked = (exc.host, exc.port)
                continue
            except rx.TryAgainError:  # migrating: the call's keys are split between two nodes
                if not await again.wait():
                    raise
            asked = None
            proto = await self._current()

    def _moved(self, proto: _Protocol) -> None:
        """``proto``'s node no longer owns the slot: the next calls connect again (the
        calls queued behind get their own ``MOVED``, and follow it too)."""
        self._retire(proto, rx.ConnectionError("the server no longer holds the pool's keys"))
        self._close_side()

    def retire(self) -> None:
        """The next call connects again (asking the resolver); the calls already sent on the
        current connection still get their replies there, then it closes."""
        if self._proto is not None:
            self._retire(self._proto, rx.ConnectionError("connection retired: the primary moved"))

    def _retire(self, proto: _Protocol, error: rx.RedisError) -> None:
        if self._proto is proto:
            self._proto = None
        if proto.closed is None:
            proto.retire(error)
            self._retired.add(proto)
            proto.gone.add_done_callback(lambda _: self._retired.discard(proto))

    async def _ask(self, host: str, port: int, packed: bytes) -> Any:
        """``packed`` preceded by ``ASKING`` on the side connection to ``host:port``."""
        side = self._side.get((host, port))
        if side is None or side.closed is not None:
            side = self._side[(host, port)] = await self._open(host, port)
        asking = side.send(_PACKED_ASKING)
        asking.add_done_callback(_retrieve)  # its OK (or error) is not waited for
        return await side.send(packed)

    def _close_side(self) -> None:
        """Close the side connections of a migration (``ASK``): it ended."""
        side, self._side = self._side, {}
        for proto in side.values():
            proto.fail(rx.ConnectionError("the slot's migration ended"))

    async def evalsha(self, sha: str, script: str, keys: Any, args: Any) -> Any:
        """Run a script by its SHA1; when Redis lacks it, send it in full (which caches it)."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection; calls still queued fail with ``ConnectionError``."""
        self._close_side()
        protos = [*self._retired, *([self._proto] if self._proto is not None else [])]
        self._proto = None
        for proto in protos:
            proto.fail(rx.ConnectionError("connection closed by the router"))
            with contextlib.suppress(TimeoutError):  # the socket is closed a loop turn later
                await asyncio.wait_for(asyncio.shield(proto.gone), 1.0)

    async def _connection(self) -> _Protocol:
        """The open connection, or a new one (callers arriving meanwhile share the attempt)."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        host, port = self.host, self.port
        deadline = asyncio.get_running_loop().time() + self.timeout
        if self.resolver is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    host, port = await self.resolver()
            except TimeoutError as exc:
                raise rx.ConnectionError(f"cannot connect to Redis: {exc!r}") from None
            except rx.ConnectionError as exc:  # no primary known, no node answers
                raise rx.ConnectionError(f"cannot find where to connect: {exc}") from None
        self._proto = await self._open(host, port, deadline)
        return self._proto

    async def _open(self, host: str, port: int, deadline: float | None = None) -> _Protocol:
        """A new connection to ``host:port`` (or the URL's socket path), authenticated,
        within the timeout (or by ``deadline``, loop time)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                if self.path is not None:
                    _, proto = await loop.create_unix_connection(
                        lambda: _Protocol(loop, self.timeout), self.path
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(loop, self.timeout), host, port
                    )
        except (OSError, TimeoutError) as exc:
            raise rx.ConnectionError(f"cannot connect to Redis: {exc!r}") from None
        try:
            if self.password is not None:
                auth = (self.username, self.password) if self.username else (self.password,)
                await proto.send(_pack("AUTH", *auth))
            if self.db:
                await proto.send(_pack("SELECT", self.db))
        except rx.RedisError:
            proto.fail(rx.ConnectionError("connection closed after a failed AUTH or SELECT"))
            raise
        return proto


def _settle(fut: asyncio.Future[Any], error: rx.RedisError) -> None:
    """Fail ``fut`` with ``error`` unless it is done (its caller was cancelled)."""
    if not fut.done():
        fut.set_exception(error)
        fut.exception()  # a caller that gave up must not leave it unretrieved


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a shared attempt's failure as seen even when every caller has given up."""
    if not fut.cancelled():
        fut.exception()
