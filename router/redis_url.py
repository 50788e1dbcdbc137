"""A Sentinel or Cluster ``redis_url``: its parts and its query's options, read without
Redis's client (the config checks a URL with it; ``router.state.topology`` connects with it).

``redis+sentinel://[user:pass@]host:port[,host:port...]/<primary-name>[/db][?options]`` and
``redis+cluster://[user:pass@]host:port[,host:port...][?options]``, and their ``rediss+``
forms. The options (``QUERY_OPTIONS``) are the TLS settings of a ``rediss+`` URL (redis-py's
``ssl_*`` names) and, for a sentinel URL, the sentinels' own credentials and whether they
speak TLS (``sentinel_ssl``). An unknown option, one given twice or out of its bounds is a
``ValueError`` that names the option, never a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
"""The query options of a ``rediss+`` URL (redis-py's names and meanings)."""
SENTINEL_QUERY = ("sentinel_username", "sentinel_password", "sentinel_ssl")
"""The query options of a sentinel URL: how to reach the sentinels themselves."""
QUERY_OPTIONS = TLS_QUERY + SENTINEL_QUERY
CERT_REQS = ("none", "optional", "required")
PATH_MAX = 4096
"""Longest file path an ``ssl_*file``/``ssl_ca_certs`` option takes."""
SECRET_MAX = 512
"""Longest ``sentinel_username``/``sentinel_password``."""
_BOOLS = {"true": True, "false": False}
_NAMEABLE = re.compile(r"^(ssl|sentinel|socket)_[a-z0-9_]{1,40}$")
_REDIS_PY_OPTIONS = frozenset(
    {"db", "password", "username", "protocol", "client_name", "timeout", "max_connections",
     "health_check_interval", "retry_on_timeout", "decode_responses"}
)  # fmt: skip
"""Option names an unknown-option error may show: never a piece of a secret (a value with an
unescaped ``&`` splits into pieces that look like options)."""


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How a ``rediss+`` topology's connections check the servers (and show a client
    certificate): redis-py's ``ssl_*`` arguments."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    def kwargs(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` keyword arguments (for a connection, a pool or a client)."""
        return {
            "ssl_ca_certs": self.ca_certs, "ssl_certfile": self.certfile,
            "ssl_keyfile": self.keyfile, "ssl_cert_reqs": self.cert_reqs,
            "ssl_check_hostname": self.check_hostname,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class TopologyURL:
    """A sentinel or cluster URL's parts (a cluster's has no ``service`` nor ``db``)."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    tls_options: TLSOptions = TLSOptions()
    """The data nodes' TLS (and the sentinels', with ``sentinel_tls``); unused without ``tls``."""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    sentinel_tls: bool = False
    """The sentinels are reached over TLS (``rediss+sentinel`` unless ``sentinel_ssl=false``)."""

    def mux_url(self) -> str:
        """A ``redis://`` URL with the credentials and db of the scripts' shared connection
        (its host is a placeholder: the topology's resolver says where to connect)."""
        cred = ""
        if self.password is not None:
            cred = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{cred}resolved/{self.db}"

    def tls_kwargs(self) -> dict[str, Any]:
        """The data connections' ``ssl_*`` arguments (none without TLS)."""
        return self.tls_options.kwargs() if self.tls else {}

    def sentinel_kwargs(self) -> dict[str, Any]:
        """The sentinels' credentials and TLS, as redis-py's ``Redis`` takes them."""
        kwargs: dict[str, Any] = {}
        if self.sentinel_password is not None:
            kwargs |= {"username": self.sentinel_username, "password": self.sentinel_password}
        if self.sentinel_tls:
            kwargs |= {"ssl": True, **self.tls_options.kwargs()}
        return kwargs


def parse_url(url: str) -> TopologyURL:
    """The parts of a sentinel or cluster URL; ``ValueError`` naming what is wrong (never
    the password)."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("#")[0].partition("?")
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
    tls = scheme.startswith("rediss+")
    options = _query(scheme, query, tls=tls, cluster=cluster)
    ssl_options = TLSOptions(
        ca_certs=options.get("ssl_ca_certs"), certfile=options.get("ssl_certfile"),
        keyfile=options.get("ssl_keyfile"),
        cert_reqs=options.get("ssl_cert_reqs", "required"),
        check_hostname=_BOOLS[options.get("ssl_check_hostname", "true")]
        and options.get("ssl_cert_reqs") != "none",
    )  # fmt: skip
    return TopologyURL(
        hosts=tuple(addresses),
        service=unquote(service),
        db=int(db or 0),
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        tls=tls,
        tls_options=ssl_options,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
        sentinel_tls=tls and not cluster and _BOOLS[options.get("sentinel_ssl", "true")],
    )


def _query(scheme: str, query: str, *, tls: bool, cluster: bool) -> dict[str, str]:
    """The query's options, percent-decoded and checked (``QUERY_OPTIONS``); a ``ValueError``
    names a wrong option, never a value."""
    options: dict[str, str] = {}
    for param in query.split("&") if query else ():
        raw, eq, value = param.partition("=")
        name = unquote(raw)
        if name not in QUERY_OPTIONS:
            shown = repr(name) if _NAMEABLE.match(name) or name in _REDIS_PY_OPTIONS else None
            what = f"an unknown option {shown}" if shown else "an unknown option (not shown)"
            raise ValueError(
                f"{scheme}:// has {what}: it takes {', '.join(QUERY_OPTIONS)}"
                " (percent-encode &, # and % in values)"
            )
        if name in options:
            raise ValueError(f"{scheme}:// has the option {name} twice")
        if not eq or not value:
            raise ValueError(f"{scheme}:// option {name} needs a value ({name}=...)")
        options[name] = unquote(value)
        _check_option(name, options[name], tls=tls, cluster=cluster)
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    if "sentinel_username" in options and "sentinel_password" not in options:
        raise ValueError("sentinel_username needs sentinel_password")
    if options.get("ssl_check_hostname") == "true" and options.get("ssl_cert_reqs") == "none":
        raise ValueError("ssl_check_hostname=true needs ssl_cert_reqs optional or required")
    return options


def _check_option(name: str, value: str, *, tls: bool, cluster: bool) -> None:
    """One option's bounds, and whether the URL's scheme takes it."""
    if name in TLS_QUERY and not tls:
        raise ValueError(f"{name} needs TLS: a rediss+ URL")
    if name in SENTINEL_QUERY and cluster:
        raise ValueError(f"{name} is a sentinel URL's option, not a cluster's")
    if name == "sentinel_ssl" and not tls:
        raise ValueError("sentinel_ssl takes a rediss+sentinel URL")
    limit = PATH_MAX if name.startswith("ssl_") else SECRET_MAX
    if len(value) > limit:
        raise ValueError(f"{name} takes at most {limit} characters")
    if name == "ssl_cert_reqs" and value not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs is one of {', '.join(CERT_REQS)}")
    if name in ("ssl_check_hostname", "sentinel_ssl") and value not in _BOOLS:
        raise ValueError(f"{name} is true or false")
