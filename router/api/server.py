"""How a replica's HTTP server treats clients before (and after) the application sees them:
uvicorn's httptools protocol, with the request head bounded in time, size and lines, and
refusals that the client can read.

- **Time.** uvicorn closes an idle keep-alive connection, but a connection that sends nothing,
  half a request line, or headers that never end, is held for as long as the client likes (a
  thousand of them hold a thousand sockets: slowloris). Here a request's line and headers must
  arrive within ``read_timeout_s`` of the connection opening or of the previous request's end,
  else the connection is closed. The body has its own deadline in the hot path
  (``router.api.endpoints.read_body``: 408), and so has the rest of a body whose answer did not
  wait for it (a 401, say): else a client could stream a body nobody reads for ever.
- **Size.** uvicorn keeps the whole head in memory until it is complete, and only then does the
  application check the key: four connections without a key, each sending one endless header,
  took a replica from 63 MiB to 4.7 GB in 9 s. Here the head is counted as it comes: past
  ``max_head_bytes``, or past ``max_header_count`` lines, the answer is a 431 and the
  connection is closed. The count is exact for a connection's first request and for any head
  that starts a read; a head that begins in the same read as the end of the previous request
  may pass the bound by what of it that read held (so reach at most twice the bound).
- **Pipelining.** uvicorn parses all of a read, and queues every request in it behind the one
  being answered: 256 KiB of ``GET /healthz`` is 7,000 requests, and eight connections
  sending them took a replica from 64 to 425 MiB. Past ``max_pipelined_requests`` queued on a
  connection, it is closed (nobody pipelines that deep; browsers and SDKs do not pipeline).
- **Readable refusals.** A server that closes a connection while the client is still sending
  makes the kernel reset it, and the client sees the reset rather than the answer. So a refusal
  that closes while the request is unfinished (our 431 and 400, a 413 from the hot path) is
  closed in stages, as nginx does: the answer, our half of the connection closed, then what
  the client still sends read and thrown away, at most ``drain_bytes`` of it, for at most
  ``read_timeout_s`` and only while it keeps sending (``QUIET_S``), then the close.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from router.config import Config
from router.errors import BadRequest, ClientError, HeadersTooLarge, to_openai_error

QUIET_S = 2.0
"""A staged close ends once the client has sent nothing for this long: it is not sending the
rest of its request any more (a 408's slow client, one that waits for the answer before
sending its body), and holding its socket longer would only help a slowloris."""


class _Stop(Exception):
    """Raised in a parser callback to stop the parser; what to answer is in ``_refusal``.

    (Not the refusal itself: a raised exception's traceback holds the protocol, which would
    hold it back, and such cycles wait for the garbage collector's rare full passes.)
    """


class _ResponseTransport(asyncio.Transport):
    """The transport as uvicorn's request cycle sees it: a close while the request's body is
    still coming is staged (``_Guarded.close_after_response``); the rest goes through."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        super().__init__()
        self._transport = transport
        self._close = close

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._close()

    def release(self) -> None:
        """Let go of the protocol (a cycle through the request's cycle otherwise)."""
        self._close = self._transport.close


class _Guarded(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded head and staged closes."""

    read_timeout_s = 10.0
    max_head_bytes = 64 * 1024
    max_header_count = 100
    max_pipelined = 16
    drain_bytes = 8 * 1024 * 1024

    _timer: asyncio.TimerHandle | None = None
    """The head's deadline, an unread body's, or a staged close's."""
    _in_head = True
    """Whether what arrives now belongs to a request line or headers."""
    _head_bytes = 0
    _heads = 0
    """Heads completed on this connection: tells whether one ended inside a piece of data."""
    _discard: int | None = None
    """While closing in stages: how many more bytes may be read and thrown away."""
    _heard = False
    """While closing in stages: whether the client sent anything since the last look."""
    _stage_ends = 0.0
    _refusal: ClientError | None = None
    _for_cycles: _ResponseTransport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._for_cycles = _ResponseTransport(transport, self.close_after_response)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._discard is not None:  # closing in stages: read, thrown away, up to a bound
            self._discard -= len(data)
            self._heard = True
            if self._discard < 0 and not self.transport.is_closing():
                self.transport.close()
            return
        if not self._in_head:
            self._feed(data)
            return
        room = self.max_head_bytes - self._head_bytes
        if len(data) > room:
            self._feed_up_to(data, room)
            return
        self._head_bytes += len(data)
        self._feed(data)
        # a head still coming that already has too many lines: checked once a read, not once a
        # line (a complete head is checked in on_headers_complete)
        if self._in_head and len(self.headers or ()) > self.max_header_count:
            self._refuse(self._too_many_lines())

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, but a refusal is answered in OpenAI's shape, and one of
        ours (a 431) is not logged as an invalid request: a flood would flood the log too."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is None:
                self.logger.warning("Invalid HTTP request received.")
            self._refuse(self._refusal or BadRequest("the request is not valid HTTP/1.1"))
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _feed_up_to(self, data: bytes, room: int) -> None:
        """Feed the part of ``data`` that fits the head; the rest only if the head ended."""
        heads = self._heads
        self._feed(data[:room])
        if self.transport.is_closing() or self._discard is not None:
            return
        if self._heads == heads:
            limit = self.max_head_bytes
            self._refuse(HeadersTooLarge(f"the request line and headers are over {limit} bytes"))
        elif not self.parser.should_upgrade():  # after an upgrade the rest is not ours
            self.data_received(data[room:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.max_header_count:
            self._refusal = self._too_many_lines()
            raise _Stop  # ``_feed`` answers the refusal
        if len(self.pipeline) >= self.max_pipelined:
            # (a refusal, so not logged; never answered: the answers before it are under way)
            self._refusal = BadRequest(f"more than {self.max_pipelined} requests sent ahead")
            raise _Stop
        self._disarm()
        self._in_head = False
        self._heads += 1
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = self._for_cycles

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # the rest of a body its answer did not wait for has come
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._discard is not None:
            self._unset_keepalive_if_required()  # the staged close has its own deadline
        elif self.cycle.response_complete and self.cycle.more_body:
            self._arm()  # answered before its body all came: the rest must come in time

    def close_after_response(self) -> None:
        """A response is over and the connection must close: at once when the request has all
        come, else in stages so that the client, still sending, can read the answer."""
        if self.cycle is not None and self.cycle.response_complete and self.cycle.more_body:
            self.cycle.body = bytearray()  # what came of the body and was never read
            self._close_in_stages()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._for_cycles.release()
        super().connection_lost(exc)

    def _too_many_lines(self) -> HeadersTooLarge:
        self.headers.clear()  # (the scope's list too) else held as long as the connection
        return HeadersTooLarge(f"more than {self.max_header_count} header lines")

    def _refuse(self, exc: ClientError) -> None:
        """Answer ``exc`` (OpenAI-shaped) in place of the request, then close in stages."""
        if self._discard is not None or self.transport.is_closing():
            return  # refused already
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a request sent behind one still being answered: no room
            return
        body = orjson.dumps(to_openai_error(exc))
        head = [STATUS_LINE[exc.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        self._close_in_stages()

    def _close_in_stages(self) -> None:
        self._disarm()
        self._discard = self.drain_bytes
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is all there is: the client sees its end
        self._stage_ends = self.loop.time() + self.read_timeout_s
        self._timer = self.loop.call_later(QUIET_S, self._linger)

    def _linger(self) -> None:
        """Close once the client has gone quiet, or at the staged close's deadline."""
        self._timer = None
        if self._heard and self.loop.time() < self._stage_ends:
            self._heard = False
            self._timer = self.loop.call_later(QUIET_S, self._linger)
        elif not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol(cfg: Config) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn's ``http`` setting, with ``cfg``'s bounds."""
    attrs: dict[str, Any] = {
        "read_timeout_s": cfg.read_timeout_s,
        "max_head_bytes": cfg.max_head_bytes,
        "max_header_count": cfg.max_header_count,
        "max_pipelined": cfg.max_pipelined_requests,
        "drain_bytes": 2 * cfg.max_body_bytes,  # a body up to twice the limit, sent whole
    }
    return type("HttpProtocol", (_Guarded,), attrs)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other replicas may bind too (``SO_REUSEPORT``)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        sys.exit(f"router: cannot bind {host}:{port}: {exc.strerror}")
    # No listen() here: uvicorn calls it once the app has started, so until then the kernel
    # sends every new connection to the replicas that are already serving.
    return sock


# As they were before --reuse-port existed: the JSON logs come from router.telemetry.logs,
# not uvicorn.
UVICORN_SETTINGS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "access_log": False,
    # the client's address is used for nothing (keys identify clients): uvicorn's
    # X-Forwarded-For rewriting middleware, on by default, was 3 % of a loaded replica's CPU
    "proxy_headers": False,
    "log_config": None,
    "timeout_graceful_shutdown": 30,
}


def serve(app: Any, cfg: Config, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT/SIGTERM, alone or sharing the port; a
    request's line and headers are bounded in time, size and lines by ``cfg``."""
    settings = {**UVICORN_SETTINGS, "http": protocol(cfg)}
    if not reuse_port:
        uvicorn.run(app, host=host, port=port, **settings)
        return
    sock = reuse_port_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **settings))
    server.run(sockets=[sock])
