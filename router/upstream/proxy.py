"""Forward proxies for the upstream client: which proxy a provider's URL goes through, and the
HTTP CONNECT tunnel through it.

The environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, lower-case first, as curl
reads them) is read once, when the client starts; a provider's ``proxy`` (a URL, or ``none``)
overrides it. Every target, http or https, goes through a CONNECT tunnel (TLS to an https
provider then runs inside it): one code path, and the request line stays the provider's.

Proxy credentials (``http://user:pass@proxy:3128``) become a ``Proxy-Authorization: Basic``
header; no message here names them (a proxy is named by its host and port only).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from router.errors import UpstreamConnectError, UpstreamProtocolError

MAX_CONNECT_ANSWER = 16 * 1024
"""The most a proxy's answer to CONNECT (status line and headers) may hold."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy: where it listens and the ``Proxy-Authorization`` header, if any."""

    host: str
    port: int
    authorization: bytes | None = None

    @property
    def shown(self) -> str:
        """How messages name it: host and port, never its credentials."""
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """``http://[user:pass@]host[:port]`` (a bare ``host:port`` is taken as http) -> Proxy."""
    u = urlsplit(url if "://" in url else f"http://{url}")
    if u.scheme != "http" or not u.hostname:
        raise ValueError("a proxy is an http:// URL with a host (https proxies are unsupported)")
    try:
        port = u.port or 80
    except ValueError:
        raise ValueError("the proxy URL's port is not a number in 1..65535") from None
    auth = None
    if u.username is not None:
        pair = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = b"Proxy-Authorization: Basic " + base64.b64encode(pair)
    return Proxy(u.hostname, port, auth)


def _host_only(entry: str) -> str:
    entry = entry.strip().lower()
    if entry.startswith("["):  # [v6] or [v6]:port
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:  # host:port (a bare v6 address has more colons)
        return entry.split(":", 1)[0]
    return entry


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """The proxies the environment names, read once."""

    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()
    """Lower-case hosts, domains (``example.com`` covers its subdomains; a leading dot too),
    IP addresses, or ``*`` (no proxy at all)."""

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> ProxyEnv:
        def get(name: str) -> str:
            return (env.get(name.lower()) or env.get(name) or "").strip()

        https, http, no = get("HTTPS_PROXY"), get("HTTP_PROXY"), get("NO_PROXY")
        entries = tuple(h for h in (_host_only(e) for e in no.split(",")) if h)
        return cls(
            parse_proxy(https) if https else None,
            parse_proxy(http) if http else None,
            entries,
        )

    def bypassed(self, host: str) -> bool:
        """Whether NO_PROXY says ``host`` is reached directly."""
        host = host.lower().strip("[]")
        for entry in self.no_proxy:
            if entry == "*" or host == entry.lstrip("."):
                return True
            if host.endswith("." + entry.lstrip(".")):
                return True
        return False

    def for_target(self, scheme: str, host: str) -> Proxy | None:
        """The proxy the environment gives a ``scheme://host`` URL, if any."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypassed(host):
            return None
        return proxy


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: its head, and whether more came past it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: Proxy) -> None:
        self.buf = bytearray()
        self.proxy = proxy
        self.head: asyncio.Future[tuple[bytes, bool]] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.head.set_result((bytes(self.buf[:end]), end + 4 != len(self.buf)))
        elif len(self.buf) > MAX_CONNECT_ANSWER:
            self.head.set_exception(
                UpstreamProtocolError(f"the proxy {self.proxy.shown}'s answer is too long")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            why = f"the proxy {self.proxy.shown} closed the connection during CONNECT"
            self.head.set_exception(UpstreamConnectError(why))
            # retrieved: when the connect was given up (its timeout) before CONNECT was sent,
            # nobody awaits the answer, and asyncio would log it as never retrieved
            self.head.exception()


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> asyncio.Transport:
    """A transport to ``host:port`` through ``proxy`` (CONNECT answered 2xx); the caller
    sets its protocol (and starts TLS on it for an https provider)."""
    try:
        transport, answer = await loop.create_connection(
            lambda: _ConnectAnswer(loop, proxy), proxy.host, proxy.port
        )
    except OSError as exc:
        why = f"could not connect to the proxy {proxy.shown} ({exc.strerror or 'refused'})"
        raise UpstreamConnectError(why) from None
    authority = (f"[{host}]" if ":" in host else host) + f":{port}"
    lines = [f"CONNECT {authority} HTTP/1.1".encode(), f"Host: {authority}".encode()]
    if proxy.authorization is not None:
        lines.append(proxy.authorization)
    transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
    try:
        head, more = await answer.head
    except BaseException:
        transport.abort()
        raise
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    status = status_line[1] if len(status_line) > 1 else b""
    if not (status.isdigit() and 200 <= int(status) < 300):
        transport.abort()
        code = status.decode("ascii", "replace")[:3] or "?"
        what = "wants credentials" if code == "407" else "refused the tunnel"
        raise UpstreamConnectError(f"the proxy {proxy.shown} {what} ({code})")
    if more:  # an open tunnel says nothing before the provider does
        transport.abort()
        raise UpstreamProtocolError(f"the proxy {proxy.shown} sent bytes past CONNECT")
    return transport
