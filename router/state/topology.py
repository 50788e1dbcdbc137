"""Where Redis is: one server (``redis://``), a Sentinel-watched primary, or a Cluster.

``redis+sentinel://[user:pass@]host:port[,host:port...]/<primary-name>[/db]`` (and
``rediss+sentinel://``) names the sentinels and the primary's service name: the pooled client
and pub/sub go through redis-py's ``SentinelConnectionPool``, which asks the sentinels where
the primary is whenever a connection is made, and the scripts' shared connection asks them
too (``resolver``) each time it connects again: after a lost connection or a ``READONLY``
reply (the old primary came back as a replica).

The user and password are the data nodes'; the sentinels are asked with the query's
``sentinel_username``/``sentinel_password`` when it has them (a sentinel's ``requirepass`` or
ACL user), without any otherwise. With ``rediss+sentinel`` the sentinels are reached over TLS
too (as Lettuce's and go-redis's clients do), with the same TLS options, unless the query says
``sentinel_ssl=false``: a sentinel API on a plain port in front of TLS data nodes (a Sentinel
with ``port`` and ``tls-replication yes``; Redis Software's discovery service on port 8001 in
front of TLS databases, the case ioredis keeps its sentinels' TLS a separate option for).

A primary cut off from its sentinels and replicas, but not from us, still answers: asking
the sentinels only on a new connection, a replica would go on writing there, and every write
after the failover is lost when the old primary comes back as a replica. So ``watch``
listens to the sentinels' ``+switch-master`` announcements (as Jedis's sentinel pool does)
and says when the primary changed; the store then moves its connections.

``redis+cluster://[user:pass@]host:port[,host:port...]`` (and ``rediss+cluster://``) names
some nodes of a Redis Cluster: the pooled client is redis-py's ``RedisCluster``; every key of
a script call carries the pool's hash tag, so all of them live on the one node owning that
slot, and the scripts' shared connection goes there (``resolver``: ``CLUSTER SLOTS`` asked
again at every new connection, and a ``MOVED`` or ``ASK`` reply gives the connection up).
A subscription may be on any node (``PUBLISH`` reaches every node of a cluster): each new
one takes the next known node, so a subscriber whose node died comes back on another.

Both take TLS options in the query of their ``rediss+`` forms (``router.redis_url``); every
connection of the topology uses them: the pools, the subscriptions' and the sentinels'.

redis-py's ``RedisCluster`` follows ``MOVED`` and ``TRYAGAIN`` itself, but sends the
``ASKING`` of an ``ASK`` on one pooled connection and the command on another (the next free
one), so a call redirected while a slot migrates fails ("TTL exhausted") as soon as the node
has two free connections; its connections here (``_AskingConnection``) send the two
together. ``RedisCluster`` has no blocking pool (a call finding a node's ``max_connections`` busy
fails with ``MaxConnectionsError``): ``WaitingCluster`` lets at most that many calls run at
once and makes the others wait, up to the pool wait, as a single server's pool does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError

from router.redis_url import parse_url

log = logging.getLogger("router.redis")

WATCH_PING_S = 5.0
"""How long a sentinel's subscription may be silent before it is pinged; one that does not
answer within as long again is left for the next sentinel."""
WATCH_RETRY_S = 1.0
"""Pause before the next sentinel after one failed (or none answered)."""

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A sentinel pool whose callers wait for a free connection (``timeout`` seconds), as
    with a single server's pool: a burst beyond the pool's size is local contention, not an
    outage, and must not fail calls."""


class SentinelTopology:
    """A primary found through its sentinels: the pools and the scripts' resolver."""

    def __init__(self, url: str, settings: dict[str, Any], pool_wait_s: float) -> None:
        self.url = parse_url(url)
        self.pool_wait_s = pool_wait_s
        self.sentinel_kwargs = {k: v for k, v in settings.items() if k.startswith("socket_")}
        self.sentinel_kwargs |= self.url.sentinel_kwargs()
        """How the sentinels are reached (their socket timeouts, credentials and TLS)."""
        sentinels = list(self.url.hosts)
        self.sentinel = Sentinel(sentinels, sentinel_kwargs=self.sentinel_kwargs)  # type: ignore[no-untyped-call]
        self.settings = settings
        """The data connections' settings (timeouts)."""

    def pool(self, size: int, **overrides: Any) -> SentinelConnectionPool:
        """A pool of connections to the current primary (re-asked on every new connection)."""
        u = self.url
        return _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            u.service, self.sentinel, max_connections=size, timeout=self.pool_wait_s,
            username=u.username, password=u.password, db=u.db, ssl=u.tls,
            **{**self.settings, **u.tls_kwargs(), **overrides},
        )  # fmt: skip

    async def resolve(self) -> tuple[str, int]:
        """The primary's address as the sentinels say now."""
        host, port = await self.sentinel.discover_master(self.url.service)
        return str(host), int(port)

    async def watch(self, switched: Callable[[], Awaitable[None]]) -> None:
        """Run until cancelled: await ``switched()`` whenever the primary changes.

        Subscribed to ``+switch-master`` on one sentinel at a time (the next one after a
        failure); on each new subscription the primary is asked for again, so a switch
        announced while no sentinel was heard is not missed."""
        known: tuple[str, int] | None = None
        for turn in itertools.count():
            host, port = self.url.hosts[turn % len(self.url.hosts)]
            conn = aioredis.Redis(host=host, port=port, **{
                **self.sentinel_kwargs, "socket_timeout": None,
            })  # fmt: skip
            try:
                async with conn.pubsub(ignore_subscribe_messages=True) as sub:
                    await sub.subscribe("+switch-master")
                    now = await self.resolve()
                    if known is not None and now != known:
                        await switched()
                    known = now
                    while True:
                        message = await sub.get_message(timeout=WATCH_PING_S)
                        if message is None:
                            await sub.ping()
                            message = await sub.get_message(timeout=WATCH_PING_S)
                            if message is None:
                                raise TimeoutError("the sentinel did not answer a ping")
                        data = message.get("data")
                        if message["type"] != "message" or not isinstance(data, bytes):
                            continue
                        name, *_, new_host, new_port = data.decode(errors="replace").split()
                        if name == self.url.service:
                            log.warning("redis primary %r moved to %s:%s", name, new_host,
                                        new_port)  # fmt: skip
                            known = (new_host, int(new_port))
                            await switched()
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                log.debug("sentinel %s:%d not watched: %r", host, port, exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await conn.aclose()
            await asyncio.sleep(WATCH_RETRY_S)


_ASKED: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "asked", default=None
)
"""The node whose next command, in this task, must be preceded by ``ASKING``."""


class _AskingConnection(aioredis.Connection):
    """A cluster node's connection that sends ``ASKING`` in the same write as the command
    that follows it in the same task (on whichever connection of the node that goes).

    ``RedisCluster`` follows an ``ASK`` by ``node.execute_command("ASKING")``, then, in the
    same task, ``node.execute_command(*command)``: each takes a pooled connection. The first
    sends nothing and answers ``OK``; the second sends ``ASKING`` and the command together
    and drops ``ASKING``'s reply."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._faked = False
        """An ``ASKING`` was taken and not sent: its ``OK`` is answered here."""
        self._owed = 0
        """Replies of ``ASKING`` sent with a command, to read and drop before its reply."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if len(args) == 1 and args[0] in ("ASKING", b"ASKING"):
            _ASKED.set((self.host, int(self.port)))
            self._faked = True
            return []
        packed = super().pack_command(*args)
        if _ASKED.get() == (self.host, int(self.port)):
            _ASKED.set(None)
            self._owed += 1
            return [*super().pack_command("ASKING"), *packed]
        return packed

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._faked:  # the ASKING that goes with the next command
            self._faked = False
            return b"OK"
        while self._owed:
            self._owed -= 1
            with contextlib.suppress(ResponseError):
                await super().read_response(*args, **kwargs)
        return await super().read_response(*args, **kwargs)

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self._owed, self._faked = 0, False  # no reply is owed on a new socket
        await super().disconnect(*args, **kwargs)


class _AskingSSLConnection(_AskingConnection, aioredis.SSLConnection):
    pass


class WaitingCluster(RedisCluster):
    """A ``RedisCluster`` whose callers wait for a free connection (``pool_wait_s``) instead
    of failing: no more calls run at once than a node has connections (``max_connections``),
    so none finds its node's connections all busy. A burst beyond the pool is local
    contention, not an outage, and must not fail calls (degraded mode).

    Every command goes through ``execute_command`` (scripts too: ``EVALSHA``, ``SCRIPT
    LOAD``); a command sent to every primary takes one connection of each, so counts once."""

    def __init__(self, *, pool_wait_s: float, max_connections: int, **kw: Any) -> None:
        super().__init__(max_connections=max_connections, **kw)
        # the nodes' connections: the startup nodes' and those found later (the nodes
        # manager makes them with these same keyword arguments, one shared dict)
        tls = self.connection_kwargs["connection_class"] is not aioredis.Connection
        asking = _AskingSSLConnection if tls else _AskingConnection
        self.connection_kwargs["connection_class"] = asking
        for node in [*self.startup_nodes, *self.nodes_manager.startup_nodes.values()]:
            node.connection_class = asking
        self.pool_wait_s = pool_wait_s
        self._calls = asyncio.BoundedSemaphore(max_connections)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.pool_wait_s):
                await self._calls.acquire()
        except TimeoutError:
            raise MaxConnectionsError(f"no free connection within {self.pool_wait_s:g} s") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._calls.release()


class ClusterTopology:
    """A Redis Cluster: its client, the scripts' resolver and the subscriptions' pools."""

    def __init__(
        self, url: str, settings: dict[str, Any], size: int, slot_key: str, pool_wait_s: float
    ) -> None:
        self.url = u = parse_url(url)
        self.settings = settings
        self.client = WaitingCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in u.hosts], username=u.username,
            password=u.password, ssl=u.tls, max_connections=size, pool_wait_s=pool_wait_s,
            **settings, **u.tls_kwargs(),
        )  # fmt: skip
        self.slot_key = slot_key
        """A key of the pool's hash tag: its slot is every script key's."""
        self._turn = itertools.count()

    async def resolve(self) -> tuple[str, int]:
        """The node owning the pool's slot, as the cluster says now (``CLUSTER SLOTS``)."""
        nodes = self.client.nodes_manager
        await nodes.initialize()
        node = nodes.get_node_from_slot(self.client.keyslot(self.slot_key))
        return node.host, int(node.port)

    def subscriber_pool(self) -> aioredis.ConnectionPool:
        """One connection to the next known node, without a read timeout."""
        known = [(n.host, n.port) for n in self.client.get_nodes()] or list(self.url.hosts)
        host, port = known[next(self._turn) % len(known)]
        u = self.url
        return aioredis.ConnectionPool(
            host=host, port=port, username=u.username, password=u.password, max_connections=1,
            connection_class=aioredis.SSLConnection if u.tls else aioredis.Connection,
            **{**self.settings, **u.tls_kwargs(), "socket_timeout": None},
        )  # fmt: skip
