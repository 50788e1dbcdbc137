"""How a replica's HTTP server treats clients that send slowly: uvicorn, with a deadline for
the request line and headers.

uvicorn closes an idle keep-alive connection, but a connection that sends nothing at all, or
half a request line, or headers that never end, is held for as long as the client likes: a
thousand of them hold a thousand sockets (slowloris). Here every request's line and headers
must arrive within ``read_timeout_s`` of the connection opening or of the request's first
byte; otherwise the connection is closed. The body has its own deadline in the hot path
(``router.endpoints.read_body``: 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose headers are late."""

    read_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.read_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn's ``http`` setting, with this deadline."""
    attrs: dict[str, Any] = {"read_timeout_s": read_timeout_s}
    return type("HttpProtocol", (_HeaderDeadline,), attrs)
