"""Where Redis is: one server (``redis://``), a Sentinel-watched primary, or a Cluster.

``redis+sentinel://[user:pass@]host:port[,host:port...]/<primary-name>[/db]`` (and
``rediss+sentinel://``) names the sentinels and the primary's service name: the pooled client
and pub/sub go through redis-py's ``SentinelConnectionPool``, which asks the sentinels where
the primary is whenever a connection is made, and the scripts' shared connection asks them
too (``resolver``) each time it connects again: after a lost connection or a ``READONLY``
reply (the old primary came back as a replica).

The user and password are the data nodes'; the sentinels are asked without them (the usual
set-up: sentinels on a private network, ``requirepass`` on the data nodes).

``redis+cluster://[user:pass@]host:port[,host:port...]`` (and ``rediss+cluster://``) names
some nodes of a Redis Cluster: the pooled client is redis-py's ``RedisCluster``; every key of
a script call carries the pool's hash tag, so all of them live on the one node owning that
slot, and the scripts' shared connection goes there (``resolver``: ``CLUSTER SLOTS`` asked
again at every new connection, and a ``MOVED`` or ``ASK`` reply gives the connection up).
A subscription may be on any node (``PUBLISH`` reaches every node of a cluster): each new
one takes the next known node, so a subscriber whose node died comes back on another.
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
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import MaxConnectionsError, ResponseError

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True, slots=True)
class TopologyURL:
    """A sentinel or cluster URL's parts (a cluster's has no ``service`` nor ``db``)."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool

    def mux_url(self) -> str:
        """A ``redis://`` URL with the credentials and db of the scripts' shared connection
        (its host is a placeholder: the topology's resolver says where to connect)."""
        cred = ""
        if self.password is not None:
            cred = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{cred}resolved/{self.db}"


def parse_url(url: str) -> TopologyURL:
    """The parts of a sentinel or cluster URL; ``ValueError`` naming what is wrong (never
    the password)."""
    scheme, _, rest = url.partition("://")
    rest = rest.partition("?")[0].partition("#")[0]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    user, colon, password = userinfo.partition(":")
    hosts, _, path = hostpart.partition("/")
    addresses = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{scheme}:// takes its hosts as host:port[,host:port...]")
        addresses.append((host.strip("[]"), int(port)))
    service, _, db = path.partition("/")
    cluster = scheme.endswith("+cluster")
    if cluster and path:
        raise ValueError(f"{scheme}:// takes no path: a cluster has one database, no names")
    if not service and not cluster:
        raise ValueError(f"{scheme}:// needs the primary's name: .../<primary-name>[/db]")
    if db and not db.isdigit():
        raise ValueError(f"{scheme}:// takes a database number after the primary's name")
    return TopologyURL(
        hosts=tuple(addresses),
        service=unquote(service),
        db=int(db or 0),
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        tls=scheme.startswith("rediss+"),
    )


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A sentinel pool whose callers wait for a free connection (``timeout`` seconds), as
    with a single server's pool: a burst beyond the pool's size is local contention, not an
    outage, and must not fail calls."""


class SentinelTopology:
    """A primary found through its sentinels: the pools and the scripts' resolver."""

    def __init__(self, url: str, settings: dict[str, Any], pool_wait_s: float) -> None:
        self.url = parse_url(url)
        self.pool_wait_s = pool_wait_s
        sentinel_kwargs = {k: v for k, v in settings.items() if k.startswith("socket_")}
        sentinels = list(self.url.hosts)
        self.sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        self.settings = settings
        """The data connections' settings (timeouts)."""

    def pool(self, size: int, **overrides: Any) -> SentinelConnectionPool:
        """A pool of connections to the current primary (re-asked on every new connection)."""
        u = self.url
        return _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            u.service, self.sentinel, max_connections=size, timeout=self.pool_wait_s,
            username=u.username, password=u.password, db=u.db, ssl=u.tls,
            **{**self.settings, **overrides},
        )  # fmt: skip

    async def resolve(self) -> tuple[str, int]:
        """The primary's address as the sentinels say now."""
        host, port = await self.sentinel.discover_master(self.url.service)
        return str(host), int(port)


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
            **settings,
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
            **{**self.settings, "socket_timeout": None},
        )  # fmt: skip
