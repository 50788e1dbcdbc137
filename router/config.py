"""The configuration model: one YAML file, validated once at start-up and passed down.

Secrets are never written in the file, only referenced (``{env: NAME}``); they are
resolved by ``load_config`` into ``SecretStr`` values that print as ``**********``.
Every problem is reported with its field path (``providers[1].limits.rpm: must be > 0``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)

from router.errors import ConfigError
from router.redis_url import parse_url

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """A reference to a secret held in an environment variable."""

    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

    _value: SecretStr | None = PrivateAttr(default=None)

    @property
    def value(self) -> SecretStr:
        """The resolved secret; ``load_config`` guarantees it is set."""
        if self._value is None:
            raise RuntimeError(f"secret {self.env} was not resolved")
        return self._value


SAFE_QUERY = frozenset(
    {
        "db",
        "protocol",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "socket_timeout",
        "socket_connect_timeout",
        "health_check_interval",
        "sentinel_ssl",
    }
)
"""URL query parameters whose values are shown."""
SECRET_QUERY = frozenset({"password", "username", "sentinel_password", "sentinel_username"})
"""URL query parameters shown by their names only (``name=***``); any other parameter is
masked whole (``***``): a secret holding an unescaped ``&`` splits into pieces that look like
parameters, and no piece of it may be shown."""


def masked_url(url: str) -> str:
    """``url`` as it may be printed: its user and password (and any query value not known to
    be harmless) as ``***``. Every URL we print goes through here: CLI output, banners, logs.

    Plain text, no URL parser: a password with an unescaped ``/``, ``?`` or ``#`` would end
    a parser's authority early and show the rest. Whatever precedes the last ``@`` is masked
    (a host is hidden too when only a query holds an ``@``: shown too little, never too much),
    and all of it when an ``@`` may be inside a query's value (``?...=`` before it): what
    follows it may be the rest of a secret (``?sentinel_password=p@ss``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        before, _, rest = rest.rpartition("@")
        if "=" in before.partition("?")[2]:
            return f"{scheme}{sep}***"
        rest = "***@" + rest
    where, q, query = rest.partition("#")[0].partition("?")
    if q:
        where += "?" + "&".join(_masked_param(p) for p in query.split("&"))
    return f"{scheme}{sep}{where}"


def _masked_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    if name in SAFE_QUERY:
        return param
    return f"{name}=***" if name in SECRET_QUERY and eq else "***"


REDIS_SCHEMES = (
    "redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://",
    "redis+cluster://", "rediss+cluster://",
)  # fmt: skip
_SENTINEL_URL = re.compile(
    r"^rediss?\+sentinel://([^/]*@)?[^@/]+:\d+(,[^@/,]+:\d+)*/[^/?#]+(/\d+)?(\?[^#]*)?$"
)

_CLUSTER_URL = re.compile(r"^rediss?\+cluster://([^/]*@)?[^@/]+:\d+(,[^@/,]+:\d+)*/?(\?[^#]*)?$")


def _redis_url(url: str | None) -> str | None:
    """A URL of a scheme we connect with; a sentinel URL in its one form. The error never
    shows the URL (it may hold a password)."""
    if url is None:
        return None
    if not url.startswith(REDIS_SCHEMES):
        raise ValueError(f"redis_url must start with one of: {', '.join(REDIS_SCHEMES)}")
    if "+sentinel://" in url and not _SENTINEL_URL.match(url):
        raise ValueError(
            "a sentinel redis_url reads redis+sentinel://[user:password@]host:port"
            "[,host:port...]/<primary-name>[/db]"
        )
    if "+cluster://" in url and not _CLUSTER_URL.match(url):
        raise ValueError(
            "a cluster redis_url reads redis+cluster://[user:password@]host:port[,host:port...]"
        )
    if "+sentinel://" in url or "+cluster://" in url:
        parse_url(url)  # the hosts, and the query's options (TLS, the sentinels' credentials)
    return url


def _registered_kind(kind: str) -> str:
    """A provider kind is the name of an adapter (``router.upstream.providers``): a new kind
    is one adapter module and its registration line, nothing here."""
    from router.upstream.providers import ADAPTERS  # the adapters import this module

    if kind not in ADAPTERS:
        names = list(ADAPTERS)
        raise ValueError(
            f"must be one of {', '.join(repr(n) for n in names[:-1])} or {names[-1]!r}"
        )
    return kind


ProviderKind = Annotated[str, AfterValidator(_registered_kind)]
"""The name of a registered provider adapter (``openai``, ``anthropic``)."""


class TpmAccounting(StrEnum):
    RESERVED = "reserved"
    ACTUAL = "actual"


class Strategy(StrEnum):
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_CONNECTIONS = "least_connections"
    LEAST_LATENCY = "least_latency"
    HEADROOM = "headroom"


class Limits(_Model):
    """A provider's own limits; ``None`` means unlimited."""

    rpm: Annotated[int, Field(gt=0)] | None = None
    tpm: Annotated[int, Field(gt=0)] | None = None
    max_in_flight: Annotated[int, Field(gt=0)] | None = None
    tpm_accounting: TpmAccounting = TpmAccounting.RESERVED


class Timeouts(_Model):
    """How long one attempt may take, phase by phase; past any of them it is a ``timeout``.

    ``connect_s`` bounds the connect, ``read_s`` any silence of the provider. A stream's
    first event must come within the route's ``timeout_s``; after it, each next event
    (a keep-alive comment or ping counts) within ``stream_idle_s``, and the whole stream,
    from the attempt's start, ends by ``stream_total_s`` when that is set. A stream cut
    after its first event ends with an OpenAI-shaped error event (code ``timeout``).
    """

    connect_s: Annotated[float, Field(gt=0)] = 5.0
    read_s: Annotated[float, Field(gt=0)] = 120.0
    stream_idle_s: Annotated[float, Field(gt=0)] = 120.0
    stream_total_s: Annotated[float, Field(gt=0)] | None = None


class Probe(_Model):
    """The request healthd sends; by default ``GET`` of the provider kind's model list (the
    adapter's ``probe_path``: ``/models`` for openai, ``/v1/models`` for anthropic), with the
    headers every request to the provider carries. A cheap completion can be named instead.

    A good probe of the model list says nothing of completions (a provider often keeps
    listing its models while every completion fails): it never closes a circuit that failed
    requests opened, only lets its half-open trial go at once when it brings the provider
    back up. A probe that is a real request (``POST`` with a body: a cheap completion) is as
    good as a successful request: its success closes the circuit."""

    method: Literal["GET", "POST"] = "GET"
    path: Annotated[str, Field(pattern=r"^/")] | None = None
    body: dict[str, Any] | None = None

    @property
    def real_request(self) -> bool:
        """Whether the probe is a real request (a ``POST`` with a body), whose success may
        close an open circuit."""
        return self.method == "POST" and self.body is not None


class HealthCheck(_Model):
    """Active health checking by healthd: healthy after ``rise`` good probes in a row,
    unhealthy after ``fall`` bad ones."""

    interval_s: Annotated[float, Field(gt=0)] = 5.0
    timeout_s: Annotated[float, Field(gt=0)] = 2.0
    rise: Annotated[int, Field(ge=1)] = 2
    fall: Annotated[int, Field(ge=1)] = 3
    probe: Probe = Probe()


class Circuit(_Model):
    """Passive health: ``failures`` failed requests in a row open the circuit for
    ``cooldown_s``, doubled on each reopening up to ``max_cooldown_s``."""

    failures: Annotated[int, Field(ge=1)] = 5
    cooldown_s: Annotated[float, Field(gt=0)] = 10.0
    max_cooldown_s: Annotated[float, Field(gt=0)] = 300.0


class Bounds(_Model):
    """The most a provider's answer may hold. Past a bound the attempt fails as
    ``bad_response``, its connection is dropped and the request fails over (a stream past
    its first byte ends with an error event instead).

    ``max_answer_bytes`` caps a whole (non-streamed) answer's body, both as received and
    once inflated (gzip, deflate); ``max_error_bytes`` the body of a non-2xx answer (past
    it the status alone decides: the error reads "no readable body"); ``max_header_bytes``
    and ``max_headers`` the status line and headers; ``max_event_bytes`` one SSE event of a
    stream (a whole stream is bounded in time: see ``Timeouts``). A replica holds about one
    bound per attempt in flight, at most.
    """

    max_answer_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    max_error_bytes: Annotated[int, Field(gt=0)] = 64 * 1024
    max_header_bytes: Annotated[int, Field(gt=0)] = 64 * 1024
    max_headers: Annotated[int, Field(gt=0)] = 128
    max_event_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024


class ProviderTLS(_Model):
    """How to reach an https provider: ``ca_file`` (PEM) replaces the system's CAs when set;
    ``cert_file`` and ``key_file`` (PEM) are a client certificate for mutual TLS;
    ``verify: false`` accepts any server certificate (testing only: anyone on the path can
    read the provider key)."""

    ca_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    cert_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    key_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _key_with_cert(self) -> ProviderTLS:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class Provider(_Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    kind: ProviderKind
    """Which adapter talks to it (``router.upstream.providers``): its request and answer
    shapes, its probe and its default completion budget."""
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    api_key: SecretRef | None = None
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    bounds: Bounds = Bounds()
    health: HealthCheck = HealthCheck()
    circuit: Circuit = Circuit()
    anthropic_version: str = "2023-06-01"
    max_connections: Annotated[int, Field(ge=1, le=10_000)] | None = None
    """The most connections a replica keeps open (or opening) to this provider; a request
    past it waits (first come, first served) for one to be free, until its deadline.
    ``None``: no cap."""
    tls: ProviderTLS | None = None
    """TLS settings of an https provider (``None``: the system's CAs, no client cert)."""
    proxy: Annotated[str, Field(max_length=2048, pattern=r"^(none|http://[^\s/]+/?)$")] | None = (
        None
    )
    """The forward proxy to reach it through, ``http://[user:pass@]host:port``, or ``none``
    (directly, whatever ``HTTPS_PROXY``/``HTTP_PROXY`` say). ``None``: as the environment
    says (``NO_PROXY`` included)."""


class Price(_Model):
    """What a target charges, in US dollars per million tokens: a served request costs
    ``prompt tokens x input_per_mtok + completion tokens x output_per_mtok`` (/ 1e6),
    by the usage the provider reported. A target without a price costs nothing."""

    input_per_mtok: Annotated[float, Field(ge=0, le=1_000_000)] = 0.0
    output_per_mtok: Annotated[float, Field(ge=0, le=1_000_000)] = 0.0


class Target(_Model):
    provider: str
    model: Annotated[str, Field(min_length=1)]
    weight: Annotated[int, Field(ge=1, le=1000)] | None = None
    price: Price | None = None
    responses: bool = True
    """Whether this target serves the OpenAI Responses API (``POST /v1/responses``); false
    skips it for such requests. Only openai-kind targets can: an anthropic-kind target never
    serves Responses, whatever this says."""


AFFINITY_KEY = (
    r"^(prefix|header:[a-z0-9!#$%&'*+.^_`|~-]{1,64}"
    r"|body:[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,3})$"
)
"""``prefix``, ``header:<lower-case header name>`` or ``body:<field>[.<field>...]`` (up to 4
levels)."""


def _affinity_key(value: str) -> str:
    if not re.match(AFFINITY_KEY, value):
        raise ValueError(
            "must be 'prefix', 'header:<lower-case header name>' or "
            "'body:<field>[.<field>]' (e.g. body:metadata.user_id)"
        )
    return value


class Affinity(_Model):
    """Send requests that share a key to the target that served the last of them (a
    provider's prompt cache, a conversation's state), shared by every replica in Redis."""

    key: Annotated[str, AfterValidator(_affinity_key)]
    """Where the key comes from: a request header (``header:x-session-id``), a body field
    (``body:user``, ``body:metadata.user_id``, ``body:prompt_cache_key``) or ``prefix``: a
    hash of the system prompt, the tools and the first ``prefix_messages`` messages (what
    providers' prompt caches key on). A request without the key is not pinned."""
    ttl_s: Annotated[float, Field(ge=1, le=30 * 86400)] = 3600.0
    """How long a pin lives after the last request that used it."""
    prefix_messages: Annotated[int, Field(ge=0, le=64)] = 1
    """With ``key: prefix``: how many of the first messages the prefix covers."""
    load_factor: Annotated[float, Field(ge=1.0, le=10.0)] = 1.25
    """A key with no pin goes to its consistent-hashing choice unless that target would then
    hold more than ``load_factor`` times the route's mean in flight (bounded loads)."""


class Route(_Model):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    strategy: Strategy = Strategy.ROUND_ROBIN
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    queue_timeout_s: Annotated[float, Field(ge=0, le=600)] = 0.0
    max_queue: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    """Requests that may wait for the route at once, over every replica; past it a request
    that would wait is answered 429 at once."""
    timeout_s: Annotated[float, Field(gt=0)] = 300.0
    default_max_tokens: Annotated[int, Field(gt=0)] | None = None
    """The completion budget of a request that names none: reserved in the TPM window and,
    for kinds that must send one (anthropic), sent. None: each target's adapter's own
    (``default_max_tokens``: openai 1024, anthropic 4096), so what is reserved is what is
    sent."""
    targets: Annotated[list[Target], Field(min_length=1, max_length=64)]
    affinity: Affinity | None = None
    """Pin requests sharing a key to one target (see ``Affinity``); none: every request is
    placed by the strategy alone."""


TENANT_NAME = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_TENANT = "default"
"""The tenant of the ``client_keys``: every key the config lists there belongs to it."""


class TenantLimits(_Model):
    """A tenant's own limits, summed over every replica; ``None`` means unlimited. RPM and
    TPM are sliding 60 s windows like a provider's; TPM reserves ``prompt + max tokens`` at
    admission and is corrected to the provider's reported usage when the request ends."""

    rpm: Annotated[int, Field(gt=0)] | None = None
    tpm: Annotated[int, Field(gt=0)] | None = None
    max_in_flight: Annotated[int, Field(gt=0)] | None = None


class BudgetPeriod(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Budget(_Model):
    """A spend cap per calendar period (UTC; a week starts on Monday), in US dollars."""

    usd: Annotated[float, Field(gt=0, le=1_000_000)]
    """At most a million dollars: spend is counted in nano-dollars, which Redis's Lua holds
    exactly up to 2**53 (about nine million dollars)."""
    period: BudgetPeriod = BudgetPeriod.MONTH


PRIORITY_MIN, PRIORITY_MAX = -100, 100


class TenantSpec(_Model):
    """A tenant without its keys: what the admin API takes and stores."""

    name: Annotated[str, Field(pattern=TENANT_NAME)]
    limits: TenantLimits = TenantLimits()
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    """Its share of a saturated route, against the other tenants waiting in its band."""
    priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)] = 0
    """Higher is served first when a route is saturated: every waiting request of a higher
    band before any of a lower one. A request may lower its own (``x-priority``), never
    raise it."""
    budget: Budget | None = None
    routes: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=1000)]
        | None
    ) = None
    """The route models the tenant may use (None: every route; ``TenantPlan.allows``)."""


class Tenant(TenantSpec):
    """A tenant named in the config (config-owned: the admin API cannot change it)."""

    keys: Annotated[list[SecretRef], Field(max_length=1000)] = []
    """Its bearer keys, each read from an environment variable."""


class RedisSettings(_Model):
    """How a replica talks to Redis, and when it decides alone because Redis is away."""

    timeout_ms: Annotated[int, Field(gt=0)] = 100
    pool_size: Annotated[int, Field(ge=1, le=1024)] = 64
    connect_timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = 1000
    """Longest wait for a new pooled connection, TLS handshake included (several handshakes
    at once on a busy host take longer than ``timeout_ms``); past it the call fails."""
    degrade_after_ms: Annotated[int, Field(ge=0, le=60_000)] = 500
    """How long Redis calls must keep failing, with none answered in between, before the
    replica goes degraded (decides alone). A failed call meanwhile only makes its own request
    decide locally; one answered probe brings the replica back."""
    startup_timeout_s: Annotated[float, Field(ge=0, le=600)] = 5.0
    """At start-up, how long a replica (and healthd) keeps trying to reach Redis, so that one
    started alongside Redis waits for it; past it, it exits non-zero naming the (masked) URL,
    unless ``start_degraded``. (A later outage never stops a replica: it goes degraded.)"""
    start_degraded: bool = False
    """Start even when Redis does not answer at start-up: a replica serves degraded (deciding
    alone) at once, healthd stands by, both until Redis answers. Off by default: a mistyped
    ``redis_url`` would otherwise give a gateway that reports ready and never shares state."""


class HealthdSettings(_Model):
    lease_s: Annotated[float, Field(ge=1, le=300)] = 10.0


class ReplicaSettings(_Model):
    heartbeat_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    resync_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


_LEVEL_WORDS = {"FALSE": "OFF", "NO": "OFF", "TRUE": "INFO", "YES": "INFO", "ON": "INFO"}


def _log_level(value: object) -> object:
    """A log setting in one form, upper case. YAML reads an unquoted ``OFF`` (or ``off``,
    ``no``) as false: false means ``OFF``, true ``INFO``; names in any case."""
    if isinstance(value, bool):
        value = "INFO" if value else "OFF"
    if isinstance(value, str):
        upper = value.strip().upper()
        return _LEVEL_WORDS.get(upper, upper)
    return value


LogLevel = Annotated[
    str, BeforeValidator(_log_level), Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR|OFF)$")
]
"""A level of one of the logs, or ``OFF``, spelled in any case (``off``, ``false`` alike)."""


class LogSettings(_Model):
    level: Annotated[
        str, BeforeValidator(_log_level), Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    ] = "INFO"
    decisions: LogLevel = "INFO"
    """The decision log's level, or ``OFF`` (``off``, ``false`` and YAML's unquoted ``OFF``,
    which is false, alike): off, the acquire script skips the per-candidate figures."""
    access: LogLevel = "INFO"
    """The access log (logger ``router.access``): one line per request at ``INFO``, health
    probes and scrapes (``/healthz``, ``/readyz``, ``/metrics``) at ``DEBUG``; ``OFF`` (or
    ``false``) silences it, ``DEBUG`` shows the probes too."""


class Config(_Model):
    """The whole configuration of a replica (and of healthd, which reads the same file)."""

    redis_url: Annotated[str | None, Field(repr=False), AfterValidator(_redis_url)] = None
    """May carry a password: kept out of the model's repr (a test failure printed it)."""
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "rc"
    pool: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "default"
    client_keys: list[SecretRef] = []
    """The keys of the implicit tenant ``default`` (a ``tenants`` entry of that name sets
    its limits and budget, and may list more keys)."""
    tenants: Annotated[list[Tenant], Field(max_length=10_000)] = []
    max_tenants: Annotated[int, Field(ge=1, le=10_000)] = 256
    """The most tenants there may be, the config's, ``default`` and the admin API's
    together: each is one value of the metrics' ``tenant`` label."""
    max_tenant_keys: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    """The most keys the admin API may issue, over every tenant (each replica holds every
    key's hash in memory)."""
    admin_token: SecretRef | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    """A larger body is refused (413, connection closed). What the client still sends of it,
    or of a request refused for its head, is read and thrown away, up to twice this many bytes
    more and within ``read_timeout_s``, so that it reads the answer rather than a reset."""
    read_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """A request's line and headers, and then its body, must each arrive within this long; so
    must the rest of a body that its answer did not wait for."""
    max_head_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    """The request line and headers together; past it, 431 and the connection is closed (they
    are held in memory until complete, before the key can be checked)."""
    max_header_count: Annotated[int, Field(ge=8)] = 100
    """Header lines in a request; past it, 431 and the connection is closed."""
    max_pipelined_requests: Annotated[int, Field(ge=1)] = 16
    """Requests a client may send on one connection ahead of the answers (HTTP pipelining);
    past it the connection is closed. Each waits in memory with its head."""
    api_docs: bool = False
    """Serve FastAPI's ``/docs`` (Swagger UI), ``/redoc`` and ``/openapi.json`` (the schema of
    every endpoint, the two hot ones included), without a key: they hold no secret, but name
    the admin API. Off: those paths are 404s like any unknown path."""
    lease_ttl_s: Annotated[float, Field(ge=1, le=3600)] = 30.0
    dns_ttl_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    """How long a replica keeps a provider host's DNS answer (0: look it up for every new
    connection); all cached addresses refusing also looks it up again."""
    response_pin_ttl_s: Annotated[float, Field(ge=60, le=30 * 86400)] = 86400.0
    """How long a Responses API answer's id stays pinned to the provider that made it (for
    ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}`` from any replica)."""
    redis: RedisSettings = RedisSettings()
    healthd: HealthdSettings = HealthdSettings()
    replica: ReplicaSettings = ReplicaSettings()
    log: LogSettings = LogSettings()
    providers: Annotated[list[Provider], Field(min_length=1)]
    routes: Annotated[list[Route], Field(min_length=1)]

    def provider(self, name: str) -> Provider:
        """The provider called ``name`` (validated to exist for every target)."""
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def tenant(self, name: str) -> Tenant | None:
        """The config's tenant called ``name``, if any."""
        for t in self.tenants:
            if t.name == name:
                return t
        return None

    def route(self, model: str) -> Route | None:
        """The route serving ``model``, if any."""
        for r in self.routes:
            if r.model == model:
                return r
        return None


_MESSAGES: dict[str, str] = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown field",
    "missing": "required field missing",
    "string_pattern_mismatch": "does not match {pattern}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
}


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("providers", 1, "limits", "rpm")`` as ``providers[1].limits.rpm``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in exc.errors():
        template = _MESSAGES.get(e["type"])
        ctx = e.get("ctx", {})
        msg = template.format(**ctx) if template else e["msg"]
        if e["type"] == "enum" and ctx:
            msg = f"must be one of {ctx.get('expected')}"
        elif e["type"] == "value_error":  # our own validators' messages, as written
            msg = str(ctx.get("error", msg))
        # pydantic puts the failing union arm in loc ("int", "function-after"); drop it
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in {"int", "float"}))
        problems.append((field_path(loc), msg))
    return problems


def _dicts(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """The mappings of a YAML list, each with its index (anything else: none; the model's
    own problems say what is wrong with it)."""
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)]


def _cross_check(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks that span fields: names unique, targets name known providers. Run on the parsed
    YAML, not the model, so that a file the model rejects gets them in the same pass."""
    providers = _dicts(data.get("providers"))
    names = [p.get("name") for _, p in providers]
    problems = [
        (f"providers[{i}].name", f"duplicate provider name {p['name']!r}")
        for k, (i, p) in enumerate(providers)
        if isinstance(p.get("name"), str) and p["name"] in names[:k]
    ]
    routes = _dicts(data.get("routes"))
    models = [r.get("model") for _, r in routes]
    for k, (i, r) in enumerate(routes):
        if isinstance(r.get("model"), str) and r["model"] in models[:k]:
            problems.append((f"routes[{i}].model", f"duplicate route model {r['model']!r}"))
        problems += [
            (f"routes[{i}].targets[{j}].provider", f"unknown provider {t['provider']!r}")
            for j, t in _dicts(r.get("targets"))
            # with no provider at all, that one problem says it: not one per target
            if names and isinstance(t.get("provider"), str) and t["provider"] not in names
        ]
    tenants = _dicts(data.get("tenants"))
    tenant_names = [t.get("name") for _, t in tenants]
    for k, (i, t) in enumerate(tenants):
        if isinstance(t.get("name"), str) and t["name"] in tenant_names[:k]:
            problems.append((f"tenants[{i}].name", f"duplicate tenant name {t['name']!r}"))
        allowed = t.get("routes")
        if isinstance(allowed, list):
            problems += [
                (f"tenants[{i}].routes[{j}]", f"no route serves model {m!r}")
                for j, m in enumerate(allowed)
                if isinstance(m, str) and models and m not in models
            ]
    keyed = bool(data.get("client_keys")) or bool(data.get("admin_token"))
    keyed = keyed or any(t.get("keys") for _, t in tenants)
    if not keyed:
        message = "required field missing"
        if "client_keys" in data or "tenants" in data:
            message = (
                "no key can call the API: list client_keys, a tenant's keys, or set an "
                "admin_token (to issue keys at run time)"
            )
        problems.append(("client_keys", message))
    return problems


def _secret_refs(cfg: Config) -> list[tuple[str, SecretRef]]:
    refs = [(f"client_keys[{i}]", ref) for i, ref in enumerate(cfg.client_keys)]
    refs += [
        (f"tenants[{i}].keys[{j}]", ref)
        for i, t in enumerate(cfg.tenants)
        for j, ref in enumerate(t.keys)
    ]
    if cfg.admin_token is not None:
        refs.append(("admin_token", cfg.admin_token))
    refs += [
        (f"providers[{i}].api_key", p.api_key)
        for i, p in enumerate(cfg.providers)
        if p.api_key is not None
    ]
    return refs


def secret_variables(cfg: Config) -> list[str]:
    """The environment variables the config's secrets are read from, sorted."""
    return sorted({ref.env for _, ref in _secret_refs(cfg)})


def _unset(path: str, variable: str) -> tuple[str, str]:
    return path, f"environment variable {variable} is not set"


def _resolve_secrets(cfg: Config, environ: dict[str, str]) -> list[tuple[str, str]]:
    problems = []
    for path, ref in _secret_refs(cfg):
        raw = environ.get(ref.env)
        if not raw:
            problems.append(_unset(path, ref.env))
            continue
        ref._value = SecretStr(raw)
    return problems


def _raw_secret_refs(data: dict[str, Any]) -> list[tuple[str, SecretRef]]:
    """``_secret_refs`` of the parsed YAML, each reference validated alone: the missing
    variables of a file the model rejects are reported with its other problems (a unit test
    holds the two lists equal)."""
    raw = [(f"client_keys[{i}]", ref) for i, ref in _dicts(data.get("client_keys"))]
    raw += [
        (f"tenants[{i}].keys[{j}]", ref)
        for i, t in _dicts(data.get("tenants"))
        for j, ref in _dicts(t.get("keys"))
    ]
    raw += [("admin_token", ref) for _, ref in _dicts([data.get("admin_token")])]
    raw += [
        (f"providers[{i}].api_key", ref)
        for i, p in _dicts(data.get("providers"))
        for _, ref in _dicts([p.get("api_key")])
    ]
    refs = []
    for path, ref in raw:
        with contextlib.suppress(ValidationError):  # the model reported it already
            refs.append((path, SecretRef.model_validate(ref)))
    return refs


def _validate(data: dict[str, Any]) -> tuple[Config | None, list[tuple[str, str]]]:
    try:
        return Config.model_validate(data), []
    except ValidationError as exc:
        return None, _problems(exc)


def parse_config(
    data: Any, environ: dict[str, str] | None = None, *, resolve: bool = True
) -> Config:
    """Validate ``data`` (parsed YAML) and resolve its secrets; raise ``ConfigError`` with
    every problem at once: the fields', the cross-field checks', the unset variables'."""
    env = dict(os.environ) if environ is None else environ
    if not isinstance(data, dict):
        raise ConfigError([("", "the config file must be a YAML mapping")])
    cfg, problems = _validate(data)
    problems += _cross_check(data)
    if resolve and cfg is not None:
        problems += _resolve_secrets(cfg, env)
    elif resolve:
        refs = _raw_secret_refs(data)
        problems += [_unset(path, ref.env) for path, ref in refs if not env.get(ref.env)]
    if env.get("REDIS_URL"):  # checked as redis_url is (model_copy checks nothing)
        try:
            _redis_url(env["REDIS_URL"])
        except ValueError as exc:
            problems.append(("REDIS_URL", str(exc)))
    if problems or cfg is None:
        raise ConfigError(problems)
    if env.get("REDIS_URL"):
        cfg = cfg.model_copy(update={"redis_url": env["REDIS_URL"]})
    return cfg


def print_problems(exc: ConfigError, header: str) -> None:
    """``exc``'s problems on stderr as every command prints them: ``header``, then one
    indented line each, with its field path."""
    print(header, file=sys.stderr)
    for field, message in exc.problems:
        print(f"  {field}: {message}" if field else f"  {message}", file=sys.stderr)


def config_from_args(path: str | None, program: str = "router") -> Config:
    """Load the config named by ``--config`` or ``ROUTER_CONFIG``; exit 2 with every problem
    (``program`` names the command in the messages)."""
    path = path or os.environ.get("ROUTER_CONFIG")
    if not path:
        sys.exit(f"{program}: no config file: pass --config FILE or set ROUTER_CONFIG")
    try:
        return load_config(path)
    except ConfigError as exc:
        print_problems(exc, f"{path}: invalid configuration:")
        sys.exit(2)


def load_config(
    path: str | Path, environ: dict[str, str] | None = None, *, resolve: bool = True
) -> Config:
    """Read, validate and resolve the YAML file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([("", f"{path} is not UTF-8 text")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"{path} is not valid YAML: {_yaml_reason(exc)}")]) from None
    return parse_config(data, environ, resolve=resolve)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return re.sub(r"\s+", " ", str(getattr(exc, "problem", exc)))[:200] + where
