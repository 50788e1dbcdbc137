"""Provider names resolved once per TTL: the upstream client connects to a cached address
instead of asking the system resolver on every new connection (a slow or flaky resolver then
costs one lookup per host per TTL), and looks again when a cached address refuses.

Lookups go through ``loop.getaddrinfo`` (the system's resolver, /etc/hosts included); every
address of the answer is kept, IPv4 and IPv6, in the resolver's order. Concurrent lookups of
one host share one call.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

DNS_TTL_S = 30.0
"""How long an answer is reused (0: a lookup per connection)."""
MAX_HOSTS = 1024
"""Answers held at most (a provider's host each: a few); past it the cache starts over."""

Address = tuple[int, str, int]
"""Address family, address, port."""


@dataclass(slots=True)
class _Answer:
    addresses: list[Address]
    expires: float


class Resolver:
    """Cached ``getaddrinfo`` answers per (host, port)."""

    def __init__(self, ttl_s: float = DNS_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._answers: dict[tuple[str, int], _Answer] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[Address]]] = {}

    async def resolve(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int
    ) -> tuple[list[Address], bool]:
        """The addresses of ``host`` and whether they came from the cache (up to the TTL
        old); OSError when it has none."""
        key = (host, port)
        answer = self._answers.get(key)
        if answer is not None and answer.expires > loop.time():
            return answer.addresses, True
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), False
        future: asyncio.Future[list[Address]] = loop.create_future()
        self._pending[key] = future
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys((int(i[0]), str(i[4][0]), int(i[4][1])) for i in infos))
            if not addresses:
                raise OSError(f"{host} has no address")
            if self.ttl_s > 0:
                if len(self._answers) >= MAX_HOSTS:
                    self._answers.clear()
                self._answers[key] = _Answer(addresses, loop.time() + self.ttl_s)
            future.set_result(addresses)
            return addresses, False
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else OSError("lookup stopped"))
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[key]

    def forget(self, host: str, port: int) -> None:
        """Drop ``host``'s answer (its addresses refused): the next connect looks it up again."""
        self._answers.pop((host, port), None)
