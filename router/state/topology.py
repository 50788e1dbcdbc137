"""Where Redis is: one server (``redis://``), a Sentinel-watched primary, or a Cluster.

``redis+sentinel://[user:pass@]host:port[,host:port...]/<primary-name>[/db]`` (and
``rediss+sentinel://``) names the sentinels and the primary's service name: the pooled client
and pub/sub go through redis-py's ``SentinelConnectionPool``, which asks the sentinels where
the primary is whenever a connection is made, and the scripts' shared connection asks them
too (``resolver``) each time it connects again: after a lost connection or a ``READONLY``
reply (the old primary came back as a replica).

The user and password are the data nodes'; the sentinels are asked without them (the usual
set-up: sentinels on a private network, ``requirepass`` on the data nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL's parts."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a sentinel URL; ``ValueError`` naming what is wrong (never the password)."""
    scheme, _, rest = url.partition("://")
    rest = rest.partition("?")[0].partition("#")[0]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    user, colon, password = userinfo.partition(":")
    hosts, _, path = hostpart.partition("/")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{scheme}:// takes sentinels as host:port[,host:port...]")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"{scheme}:// needs the primary's name: .../<primary-name>[/db]")
    if db and not db.isdigit():
        raise ValueError(f"{scheme}:// takes a database number after the primary's name")
    return SentinelURL(
        sentinels=tuple(sentinels),
        service=unquote(service),
        db=int(db or 0),
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        tls=scheme == "rediss+sentinel",
    )


class SentinelTopology:
    """A primary found through its sentinels: the pools and the scripts' resolver."""

    def __init__(self, url: str, settings: dict[str, Any]) -> None:
        self.url = parse_sentinel_url(url)
        sentinel_kwargs = {k: v for k, v in settings.items() if k.startswith("socket_")}
        sentinels = list(self.url.sentinels)
        self.sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        self.settings = settings
        """The data connections' settings (timeouts)."""

    def pool(self, size: int, **overrides: Any) -> SentinelConnectionPool:
        """A pool of connections to the current primary (re-asked on every new connection)."""
        u = self.url
        return SentinelConnectionPool(  # type: ignore[no-untyped-call]
            u.service, self.sentinel, max_connections=size, username=u.username,
            password=u.password, db=u.db, ssl=u.tls, **{**self.settings, **overrides},
        )  # fmt: skip

    async def resolve(self) -> tuple[str, int]:
        """The primary's address as the sentinels say now."""
        host, port = await self.sentinel.discover_master(self.url.service)
        return str(host), int(port)

    def mux_url(self) -> str:
        """A ``redis://`` URL carrying the credentials and db of the scripts' connection (its
        host is a placeholder: ``resolve`` says where to connect)."""
        u = self.url
        cred = ""
        if u.password is not None:
            cred = f"{quote(u.username or '', safe='')}:{quote(u.password, safe='')}@"
        return f"redis://{cred}primary/{u.db}"
