"""The one module that talks to Redis: scripts registered once, results decoded in one place.

The scripts, two per request, and the recovery probe (``TIME``) run over one shared pipelined
connection (``router.state.muxredis``); pub/sub, inspection and ``/readyz`` use redis-py's pool
(over TLS the scripts too). Redis may be one server, a Sentinel-watched primary or a Cluster
(``router.state.topology``: the URL's scheme says which). Every Redis failure becomes a
``StoreError`` here, so callers never see redis-py's errors. With no Redis URL the store
runs on an in-process fakeredis with the same Lua scripts: one replica only, said loudly at
start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import struct
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.exceptions import RedisClusterException, RedisError

from router.budgets import NANO, PERIOD_CODES, period_bounds, period_label
from router.config import DEFAULT_TENANT, BudgetPeriod, Circuit, Config, Route, TenantSpec
from router.errors import StoreError
from router.state.affinity import Pin, PinRequest
from router.state.keys import (
    TENANT_ARGS_FORMAT,
    USAGE_DAY_TTL_S,
    USAGE_MONTH_TTL_S,
    WINDOW_BUCKETS,
    Keys,
)
from router.state.muxredis import MuxRedis
from router.state.topology import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    ClusterTopology,
    SentinelTopology,
)
from router.strategies import Code, PinOutcome, TenantCode

log = logging.getLogger("router.store")

EWMA_TAU_MS = 10_000
"""Time constant of the latency EWMAs: a sample's weight halves in about 7 s."""


TICKET_TTL_MS = 3000
"""A waiting ticket's life between renewals (every third of it)."""
LATE = -3
"""``Decision.wait_ms`` of an acquire Redis ran after its deadline (it leased nothing)."""
LOST = "lost"
"""The outcome recorded for a lease released by ``release_lost``."""
DEFAULT_CIRCUIT = Circuit()
_TENANT_ARGS = struct.Struct(TENANT_ARGS_FORMAT)
POOL_WAIT_S = 2.0
"""Longest wait for a free connection of the pool (Redis calls themselves time out sooner)."""
Watch = Callable[[Callable[[], Awaitable[None]]], Coroutine[Any, Any, None]]
"""A topology's watch: runs until cancelled, awaiting its argument when the primary moved."""
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
"""The URL's options naming files that TLS connections read."""
STARTUP_RETRY_S = 0.25
"""How often a process starting up tries Redis again (``Store.start_within``)."""
SCRIPTS = (
    "acquire",
    "dequeue",
    "charge",
    "release",
    "renew",
    "report_probe",
    "take_lead",
    "resign",
    "heartbeat",
    "read_health",
    "set_drain",
    "read_state",
    "read_tenants",
    "read_tenant_registry",
    "put_tenant",
    "delete_tenant",
    "issue_key",
    "revoke_key",
    "drop_pin",
)


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python encoder.

    Over TLS every request's two script calls, a dozen or more arguments each, go through the
    pool (not the shared connection); packing them in Python was about 6 % of a replica's CPU.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "SCRIPT LOAD": separate words
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


class _SentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    """A ``rediss+sentinel`` pool's connection: the scripts go through it too."""


def _settings(timeout: float, connect_timeout_ms: int) -> dict[str, Any]:
    """The socket settings of a Sentinel or Cluster topology's data connections."""
    return {"socket_timeout": timeout, "socket_connect_timeout": connect_timeout_ms / 1000}


def _pool(
    url: str, size: int, timeout: float, connect_timeout_ms: int
) -> aioredis.BlockingConnectionPool:
    """A blocking pool for ``url`` whose TLS connections are ``_SSLConnection``.

    Not ``from_url``: it lets the URL's scheme choose the connection class (redis-py's own
    ``SSLConnection`` for rediss://), silently dropping the one passed in."""
    kwargs: dict[str, Any] = {
        "max_connections": size,
        # waiting for a free pooled connection is local contention, not a dead Redis:
        # a loaded event loop must not be mistaken for an outage (degraded mode)
        "timeout": max(timeout, POOL_WAIT_S),
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout_ms / 1000,
        **parse_url(url),  # the URL's own arguments win, as with from_url
    }
    if kwargs.get("connection_class") is aioredis.SSLConnection:
        kwargs["connection_class"] = _SSLConnection
    return aioredis.BlockingConnectionPool(**kwargs)


def _script(name: str) -> str:
    return (
        resources.files("router.state").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    """One target as the acquire script saw it (figures after the decision)."""

    provider: str
    code: Code
    in_flight: int
    rpm_used: int
    tpm_used: int
    score: str


class QueueState(IntEnum):
    """A decision's answer about the route's wait queue (the numbers are the script's)."""

    NONE = 0
    """Not queued: admitted, or refused without waiting (the queue was empty)."""
    WAITING = 1
    """Its ticket waits in the queue: it looks again when woken."""
    FULL = 2
    """The queue holds ``max_queue`` tickets: refused at once."""
    BEHIND = 3
    """Others wait and it may not (no queue time left): refused."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request's place in a route's wait queue, as the acquire script is told it."""

    member: str
    """``<id>|<tenant>|<priority>``: the queue's member (routerctl reads who waits from it)."""
    holds: bool
    """It was queued by an earlier decision (else the script may take one for it)."""
    priority: int
    weight: int
    tenant: str
    may_wait: bool
    """It may wait (time left): else, with others waiting, it is refused."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one acquire: the chosen target (or none) and what was seen."""

    index: int | None
    now_ms: int
    bucket: int
    wait_ms: int
    """When none was chosen: ms until one may have room; -1 unknown, -2 never."""
    candidates: tuple[Candidate, ...]
    tenant_code: TenantCode = TenantCode.OK
    """Why the tenant could not take the request (``OK``: it could, or there is none)."""
    spent_nano: int = 0
    """The tenant's spend this period, the admitted request's reservation included."""
    queue_state: QueueState = QueueState.NONE
    """Where the request stands in the route's wait queue (``NONE``: it did not wait)."""
    queue_rank: int = -1
    """Its place in the queue (0: the head), when it waits."""
    queue_length: int = 0
    """Tickets waiting for the route, over every replica."""
    queue_place: float = -1.0
    """Its ticket's place (its band, then its virtual finish): fixed once taken, so the
    replica's waiters of a route are ordered by it."""
    pin: PinOutcome = PinOutcome.NONE
    """What the request's affinity pin did (``NONE`` too for a request without one)."""
    pinned: str = ""
    """The provider its pin named before this decision ('' none; always '' for ``FOREIGN``)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A target's capacity held by one in-flight request."""

    id: str
    provider: str
    bucket: int
    tokens: int
    local: bool = False
    """Taken in degraded mode: it exists only in this replica's local state."""
    tenant: str = ""
    """The tenant it was taken for ('' for none)."""
    route: str = ""
    tenant_tokens: int = 0
    """Tokens reserved in the tenant's TPM window."""
    cost_nano: int = 0
    """The worst-case cost reserved against the tenant's spend."""
    period: int = 0
    """The spend period the cost was reserved in (``router.budgets.period_id``)."""
    tracked: bool = True
    """Its tenant has live figures in Redis (``TenantPlan.tracked``) to correct."""


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease an acquire may have taken without its caller learning of it.

    The call timed out, or its caller was cancelled, with the command already on its way:
    Redis may have run it, or may still run it (it was in a socket buffer while Redis was
    paused). Every acquire carries a deadline in Redis time and leases nothing past it, so
    a release run after that deadline (or one that finds the lease) settles it for good."""

    id: str
    providers: tuple[str, ...]
    """The targets the acquire could have chosen: one of them holds the lease, if any does."""
    not_after_ms: int
    """The acquire's deadline, in Redis time."""
    tenant: str = ""
    """The tenant it was for ('' for none): its lease has the same id."""
    tenant_tokens: int = 0
    cost_nano: int = 0
    """What it reserved against the tenant's spend: refunded if it was taken."""
    period: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, as the release script records it."""

    outcome: str
    token_correction: int = 0
    ttft_ms: float = -1
    tpot_ms: float = -1
    cooldown_ms: int = 0
    provider_requests: int = -1
    provider_tokens: int = -1
    tenant_token_correction: int = 0
    """The tenant's tokens: actual minus reserved (0 keeps the reservation)."""
    spend_correction: int = 0
    """The tenant's spend (nano-USD): actual cost minus the reserved cost."""
    served: bool = False
    """The provider served the request: its usage is recorded."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0
    response_id: str = ""
    """A served Responses API answer's id: pinned to the lease's provider (and tenant) for
    ``Store.response_pin_ttl_ms``, by the release itself ('' none)."""


@dataclass(slots=True)
class Charge:
    """What requests of one tenant, route and provider, admitted on one day in one spend
    period without Redis, cost: recorded once Redis is back (``Store.charge``)."""

    tenant: str
    route: str
    provider: str
    period: int
    second: int
    """A second of the admissions' day (it names the usage hashes)."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A route's keys and per-target script arguments, computed once at start-up."""

    route: Route
    providers: tuple[str, ...]
    keys: tuple[str, ...]
    static: tuple[tuple[int, int, int, int], ...]
    """Per target: rpm, tpm, max_in_flight (0 = unlimited), weight."""

    @classmethod
    def build(cls, cfg: Config, route: Route, keys: Keys) -> RoutePlan:
        """Lay out the script's KEYS and the static part of its ARGV for ``route``."""
        names, ks, static = [], [keys.rotation(route.model), keys.swrr(route.model)], []
        for t in route.targets:
            p = cfg.provider(t.provider)
            lim = p.limits
            names.append(p.name)
            ks += [keys.provider(p.name), keys.leases(p.name)]
            static.append(
                (lim.rpm or 0, lim.tpm or 0, lim.max_in_flight or 0, t.weight or p.weight)
            )
        return cls(route, tuple(names), tuple(ks), tuple(static))


@dataclass(frozen=True, slots=True)
class TenantPlan:
    """A tenant as a decision needs it: its keys, limits and budget, computed once per
    version of its spec."""

    name: str
    keys: tuple[str, str]
    """Its hash (its window's past seconds) and its live figures (a packed string)."""
    rpm: int = 0
    tpm: int = 0
    max_in_flight: int = 0
    """Limits; 0 means unlimited."""
    budget_nano: int = 0
    """Spend cap per period in nano-dollars; 0 means none."""
    period: BudgetPeriod | None = None
    routes: frozenset[str] | None = None
    """The route models it may use (None: every one)."""
    owner: str = "config"
    """Who owns its spec: ``config`` (the file; the admin API cannot change it) or ``api``."""
    weight: int = 1
    """Its share of a saturated route against the other tenants waiting in its band."""
    priority: int = 0
    """Its band when a route is saturated (higher first); a request may only lower it."""

    @classmethod
    def build(cls, spec: TenantSpec, keys: Keys, owner: str = "config") -> TenantPlan:
        """The plan of ``spec``."""
        lim, budget = spec.limits, spec.budget
        return cls(
            name=spec.name,
            keys=(keys.tenant(spec.name), keys.tenant_live(spec.name)),
            rpm=lim.rpm or 0,
            tpm=lim.tpm or 0,
            max_in_flight=lim.max_in_flight or 0,
            budget_nano=round(budget.usd * NANO) if budget else 0,
            period=budget.period if budget else None,
            routes=frozenset(spec.routes) if spec.routes is not None else None,
            owner=owner,
            weight=spec.weight,
            priority=spec.priority,
        )

    @classmethod
    def default(cls, cfg: Config, keys: Keys) -> TenantPlan:
        """The tenant of ``client_keys``: the config's ``default`` entry, else unlimited."""
        spec = cfg.tenant(DEFAULT_TENANT) or TenantSpec(name=DEFAULT_TENANT)
        return cls.build(spec, keys)

    @property
    def tracked(self) -> bool:
        """Whether the acquire script looks at the tenant: only one with a limit or a budget
        (an unlimited tenant costs the script nothing; its usage is recorded at release)."""
        return bool(self.rpm or self.tpm or self.max_in_flight or self.budget_nano)

    @property
    def period_code(self) -> int:
        """The spend period as the acquire script is told it: the budget's, else a month
        (spend is kept per period with a budget or without one)."""
        return PERIOD_CODES[self.period or BudgetPeriod.MONTH]

    def allows(self, model: str) -> bool:
        """Whether the tenant may use the route serving ``model``."""
        return self.routes is None or model in self.routes


class Store:
    """Shared state: acquire, release and renew leases through the Lua scripts."""

    def __init__(
        self,
        client: Any,
        keys: Keys,
        lease_ttl_ms: int,
        *,
        embedded: bool,
        circuits: Mapping[str, Circuit] | None = None,
        mux: MuxRedis | None = None,
        late_ms: int = 1000,
        response_pin_ttl_ms: int = 86_400_000,
        subscriber_pool: Callable[[], aioredis.ConnectionPool] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        watch: Watch | None = None,
        tls_files: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.tls_files = dict(tls_files or {})
        """The TLS files the URL names (``ssl_ca_certs``...: their paths), read at start."""
        self._on_close = on_close
        """Closes what the topology holds besides the client (the sentinels' connections)."""
        self._watch = watch
        """Runs from ``start`` to ``close``, calling back when the primary changed (Sentinel)."""
        self._watcher: asyncio.Task[None] | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        """Open subscriptions: told to subscribe again when the primary moves."""
        self.mux = mux
        """The scripts' shared pipelined connection (``None``: they go through ``client``)."""
        self.subscriber_pool = subscriber_pool
        """Makes a subscription's own one-connection pool (``None``: like the client's)."""
        self.keys = keys
        self.lease_ttl_ms = lease_ttl_ms
        self.embedded = embedded
        self.circuits = dict(circuits or {})
        self.on_error: Callable[[str], None] = lambda operation: None
        """Called with the operation's name on every failed call (metrics hook)."""
        self.answered = 0
        """Calls Redis answered, ever: degraded mode reads whether one was since a failure."""
        self.ticket_ttl_ms = TICKET_TTL_MS
        """How long a waiting ticket lives unless its replica renews it (a dead waiter's
        ticket leaves the head within it)."""
        self.late_ms = late_ms
        """Longest time from taking an acquire's deadline to Redis running it, for a caller
        still waiting (connecting, a free pooled connection, the reply's timeout)."""
        self.response_pin_ttl_ms = response_pin_ttl_ms
        """How long a response id stays pinned to the provider that made it."""
        self._skew_ms = 0
        """Redis's clock minus ours plus the one-way trip, as last seen: never less than the
        clocks' true difference, so a deadline computed with it is never too early."""
        self._scripts = {name: client.register_script(_script(name)) for name in SCRIPTS}

    @classmethod
    def from_config(cls, cfg: Config) -> Store:
        """A store for ``cfg``: a blocking pool on Redis, or the embedded fakeredis."""
        keys = Keys(cfg.key_prefix, cfg.pool)
        ttl = int(cfg.lease_ttl_s * 1000)
        circuits = {p.name: p.circuit for p in cfg.providers}
        pins = int(cfg.response_pin_ttl_s * 1000)
        if not cfg.redis_url:
            import fakeredis  # only the embedded mode needs it

            return cls(
                fakeredis.FakeAsyncRedis(), keys, ttl, embedded=True, circuits=circuits,
                response_pin_ttl_ms=pins,
            )  # fmt: skip
        timeout = cfg.redis.timeout_ms / 1000
        subscriber_pool: Callable[[], aioredis.ConnectionPool] | None = None
        on_close: Callable[[], Awaitable[None]] | None = None
        watch: Watch | None = None
        settings = _settings(timeout, cfg.redis.connect_timeout_ms)
        client: Any
        if cfg.redis_url.startswith(SENTINEL_SCHEMES):
            sentinel = SentinelTopology(cfg.redis_url, settings, max(timeout, POOL_WAIT_S))
            tls = sentinel.url.tls
            own = {"connection_class": _SentinelSSLConnection} if tls else {}
            client = aioredis.Redis(connection_pool=sentinel.pool(cfg.redis.pool_size, **own))
            mux = None if tls else MuxRedis(sentinel.url.mux_url(), timeout, sentinel.resolve)
            subscriber_pool = functools.partial(sentinel.pool, 1, socket_timeout=None, **own)
            on_close = sentinel.sentinel.aclose
            watch = sentinel.watch
            tls_kwargs = sentinel.url.tls_kwargs()
        elif cfg.redis_url.startswith(CLUSTER_SCHEMES):
            cluster = ClusterTopology(
                cfg.redis_url, settings, cfg.redis.pool_size, keys.waiting(),
                max(timeout, POOL_WAIT_S),
            )  # fmt: skip
            client = cluster.client
            tls = cluster.url.tls
            mux = None if tls else MuxRedis(cluster.url.mux_url(), timeout, cluster.resolve)
            subscriber_pool = cluster.subscriber_pool
            tls_kwargs = cluster.url.tls_kwargs()
        else:
            pool = _pool(cfg.redis_url, cfg.redis.pool_size, timeout, cfg.redis.connect_timeout_ms)
            client = aioredis.Redis(connection_pool=pool)
            # TLS (rediss://) keeps redis-py's pooled connections for the scripts too
            tls = pool.connection_class is _SSLConnection
            mux = None if tls else MuxRedis(cfg.redis_url, timeout)
            tls_kwargs = pool.connection_kwargs
        files = {k: str(tls_kwargs[k]) for k in TLS_FILES if tls_kwargs.get(k)}
        # How long after its deadline was taken an acquire may run for a caller still
        # waiting. Shared connection: the call's timeout, and a fifth more for connecting
        # first (a millisecond on a LAN) or a busy event loop. Pool: the wait for a free
        # connection, connecting, then the call. Tighter is better: an acquire run past it
        # leases nothing, while one run before it for a caller that gave up holds a lease
        # (counted against the limits) until the replica releases it. Too tight only turns
        # a late answer into a local decision.
        call_ms = cfg.redis.timeout_ms
        if mux is None:
            late = int(POOL_WAIT_S * 1000) + cfg.redis.connect_timeout_ms + 2 * call_ms
        else:
            late = call_ms + max(10, call_ms // 5)
        return cls(
            client, keys, ttl, embedded=False, circuits=circuits, mux=mux, late_ms=late,
            response_pin_ttl_ms=pins, subscriber_pool=subscriber_pool, on_close=on_close,
            watch=watch,
            tls_files=files,
        )  # fmt: skip

    async def start(self, warm: int = 8) -> None:
        """Open ``warm`` connections and load the scripts, so the first requests wait on neither."""
        self._read_tls_files()
        if self._watch is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(self._primary_switched))
        try:
            await asyncio.gather(*(self.client.ping() for _ in range(warm)))
            if self.mux is not None:
                await self.mux.execute("PING")
            await self.load_scripts()
            await self.time_ms()  # the clocks' difference, for the acquires' deadlines
        except RedisError as exc:
            raise StoreError(f"shared store unavailable: {exc}") from exc

    def _read_tls_files(self) -> None:
        """A TLS file the URL names that this host cannot read fails the start saying which:
        redis-py would only say that no sentinel named a primary, or that a connection
        failed. (A path is no secret: printed URLs show it too.)"""
        for option, path in self.tls_files.items():
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise StoreError(f"shared store unavailable: {option} {path}: {reason}") from exc

    async def start_within(self, seconds: float, on_retry: Callable[[StoreError], None]) -> None:
        """``start``, tried again every ``STARTUP_RETRY_S`` until Redis answers or ``seconds``
        have passed (then the last failure is raised): a process started alongside Redis
        waits for it, one given a wrong URL fails. ``on_retry`` hears the first failure.

        An attempt runs to its end (each call is bounded by the connect and call timeouts),
        so the wait may pass ``seconds`` by one attempt: cut short, the error would only say
        it was cut, not why Redis did not answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for attempt in itertools.count(1):
            try:
                await self.start()
                return
            except StoreError as exc:
                if loop.time() + STARTUP_RETRY_S > deadline:
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''} in {seconds:g} s"
                    raise StoreError(f"{exc} ({tries})") from exc
                if attempt == 1:
                    on_retry(exc)
            await asyncio.sleep(STARTUP_RETRY_S)

    async def load_scripts(self) -> None:
        """(Re)load every script, e.g. after Redis restarted empty."""
        for script in self._scripts.values():
            script.sha = await self.client.script_load(script.script)

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the registered script ``name``; a Redis failure becomes ``StoreError``."""
        try:
            if self.mux is not None:
                script = self._scripts[name]
                result = await self.mux.evalsha(script.sha, script.script, keys, args)
            else:
                result = await self._scripts[name](keys=keys, args=args)
        except RedisError as exc:
            self.on_error(name)
            raise StoreError(f"{name} failed: {exc}") from exc
        self.answered += 1
        return result

    def shard(self) -> tuple[int, str] | None:
        """On a Redis Cluster, the pool's hash slot and the ``host:port`` of the primary
        owning it, as the client last learned the cluster's slots (at start, at each new
        script connection, after a ``MOVED``); ``None`` on one server or Sentinel."""
        if not isinstance(self.client, RedisCluster):
            return None
        slot = self.client.keyslot(self.keys.waiting())
        try:
            node = self.client.nodes_manager.get_node_from_slot(slot)
        except (RedisError, RedisClusterException):  # slots not learned yet, or not covered
            return slot, "unknown"
        return slot, f"{node.host}:{node.port}"

    async def time_ms(self) -> int:
        """Redis's clock (ms); on the scripts' connection, so after every script sent on it
        before. Also learns the clocks' difference (see ``not_after_ms``)."""
        sent = _wall_ms()
        try:
            if self.mux is not None:
                sec, usec = await self.mux.execute("TIME")
            else:
                sec, usec = await self.client.time()
        except RedisError as exc:
            self.on_error("time")
            raise StoreError(f"shared store unavailable: {exc}") from exc
        self.answered += 1
        now = int(sec) * 1000 + int(usec) // 1000
        self._skew_ms = now - sent
        return now

    def not_after_ms(self) -> int:
        """The deadline, in Redis time, of an acquire about to be sent: a caller still
        waiting for it cannot have it run later."""
        return _wall_ms() + self._skew_ms + self.late_ms

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel`` on a connection of its own (no read timeout)."""
        if self.embedded:
            client = self.client
        elif self.subscriber_pool is not None:
            client = aioredis.Redis.from_pool(self.subscriber_pool())
        else:
            # the pool's connection class and settings (TLS, password, db): a connection
            # made by hand here once went plain to a rediss:// server, and failed every time
            pool = self.client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": None}
            own = aioredis.ConnectionPool(pool.connection_class, max_connections=1, **kwargs)
            client = aioredis.Redis.from_pool(own)  # closing the client closes its pool
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
        except RedisError as exc:
            await pubsub.aclose()
            if client is not self.client:
                await client.aclose()
            raise StoreError(f"subscribe failed: {exc}") from exc
        sub = Subscription(pubsub, None if self.embedded else client)
        self._subscriptions.add(sub)
        return sub

    async def _primary_switched(self) -> None:
        """The primary moved (the sentinels said so): the scripts' next call connects to the
        new one (those sent already finish where they are), and the pooled connections are
        closed, busy ones too, so none goes on to the old primary, which may still answer
        (cut off from its sentinels, not from us) and whose writes are then lost; the
        subscriptions are told to subscribe again."""
        if self.mux is not None:
            self.mux.retire()
        for sub in self._subscriptions:
            sub.moved = True
        with contextlib.suppress(RedisError, OSError):
            await self.client.connection_pool.disconnect(inuse_connections=True)

    async def close(self) -> None:
        """Close the connections (the pool too: a client given a pool does not own it)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.mux is not None:
            await self.mux.close()
        await self.client.aclose()
        if isinstance(self.client, aioredis.Redis):  # a RedisCluster closes its nodes itself
            await self.client.connection_pool.disconnect()
        if self._on_close is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._on_close()

    async def ping(self) -> None:
        """Raise ``StoreError`` unless Redis answers."""
        try:
            await self.client.ping()
        except RedisError as exc:
            raise StoreError(f"shared store unavailable: {exc}") from exc
        self.answered += 1

    async def acquire(
        self,
        plan: RoutePlan,
        lease_id: str,
        tokens: Sequence[int],
        excluded: Sequence[bool],
        *,
        rand: int,
        expected_output: int,
        detail: bool = True,
        not_after_ms: int | None = None,
        tenant: TenantPlan | None = None,
        tenant_tokens: int = 0,
        cost_nano: int = 0,
        counted: bool = True,
        ticket: Ticket | None = None,
        affinity: PinRequest | None = None,
    ) -> Decision:
        """Choose a target of ``plan`` for one request and lease it (one round trip).

        Without ``detail`` the script returns only each target's code (the figures cost
        Redis time and only the decision log reads them); the others are then -1 and ''.
        ``not_after_ms`` is the deadline (``not_after_ms()`` when not given) that the
        caller keeps, should the answer never come (``LostLease``). With a ``tenant``, its
        limits and budget are checked first in the same call: ``tenant_tokens`` and
        ``cost_nano`` are what this request reserves against them, ``counted`` whether it
        counts in its RPM (a failover attempt of a counted request does not). A tenant with no
        limit and no budget is not looked at (``TenantPlan.tracked``). With a ``ticket`` the
        route's wait queue takes part; with ``affinity`` the request's pin is read, followed
        and written in the same call (``Decision.pin`` says what it did)."""
        sent = _wall_ms()
        keys, args = self.acquire_layout(
            plan, lease_id, tokens, excluded, rand=rand, expected_output=expected_output,
            detail=detail, not_after_ms=not_after_ms or sent + self._skew_ms + self.late_ms,
            tenant=tenant, tenant_tokens=tenant_tokens, cost_nano=cost_nano, counted=counted,
            ticket=ticket, affinity=affinity, sent_ms=sent,
        )  # fmt: skip
        raw = await self.call("acquire", keys, args)
        d = _decode_decision(
            raw, plan.providers, queued=ticket is not None, pinned=affinity is not None
        )
        self._skew_ms = d.now_ms - sent
        if d.wait_ms == LATE:  # answered, yet run past its deadline: it leased nothing
            # (a slow reconnect first, a stalled event loop, or our clock stepped back)
            raise StoreError("the acquire reached Redis after its deadline")
        return d

    def acquire_layout(
        self,
        plan: RoutePlan,
        lease_id: str,
        tokens: Sequence[int],
        excluded: Sequence[bool],
        *,
        rand: int,
        expected_output: int,
        detail: bool,
        not_after_ms: int,
        tenant: TenantPlan | None = None,
        tenant_tokens: int = 0,
        cost_nano: int = 0,
        counted: bool = True,
        ticket: Ticket | None = None,
        affinity: PinRequest | None = None,
        sent_ms: int = 0,
    ) -> tuple[list[str], list[Any]]:
        """The acquire script's KEYS and ARGV for these arguments (``acquire``'s; its header
        documents them); ``sent_ms`` (our clock) guesses the tenant's spend period."""
        args: list[Any] = [
            plan.route.strategy.value,
            lease_id,
            self.lease_ttl_ms,
            rand,
            expected_output,
            len(plan.providers),
            WINDOW_BUCKETS,
            1 if detail else 0,
            not_after_ms,
            "",  # the optional blocks present: set below
        ]
        for i, (rpm, tpm, maxf, weight) in enumerate(plan.static):
            args += (rpm, tpm, maxf, weight, tokens[i], 1 if excluded[i] else 0)
        keys: list[str] = list(plan.keys)
        blocks = ""
        if tenant is not None and tenant.tracked:
            blocks += "t"
            keys += tenant.keys
            args += self._tenant_args(tenant, tenant_tokens, cost_nano, counted, sent_ms)
        if ticket is not None:
            blocks += "q"
            keys += self._queue_keys(plan.route.model)
            args += self._queue_args(plan.route, ticket)
        if affinity is not None:
            blocks += "a"
            keys.append(self.pin_key(plan.route.model, affinity))
            args += _pin_args(affinity)
        args[9] = blocks
        return keys, args

    def _tenant_args(
        self, tenant: TenantPlan, tokens: int, cost_nano: int, counted: bool, sent_ms: int
    ) -> tuple[Any, ...]:
        """The tenant block's ARGV (acquire.lua's header)."""
        pid, start, end = self._period(tenant.period or BudgetPeriod.MONTH, sent_ms)
        return (
            _TENANT_ARGS.pack(
                tenant.rpm,
                tenant.tpm,
                tenant.max_in_flight,
                tokens,
                tenant.budget_nano,
                tenant.period_code,
                cost_nano,
                1 if counted else 0,
                pid,
                start,
                end,
            ),
        )

    def _queue_keys(self, route: str) -> tuple[str, ...]:
        k = self.keys
        return (k.queue(route), k.queue_expiry(route), k.queue_clock(route), k.waiting())

    def _queue_args(self, route: Route, ticket: Ticket) -> tuple[Any, ...]:
        """The queue block's ARGV (acquire.lua's header)."""
        return (
            ticket.member,
            1 if ticket.holds else 0,
            ticket.priority,
            ticket.weight,
            ticket.tenant,
            self.ticket_ttl_ms,
            1 if ticket.may_wait else 0,
            route.max_queue,
            self.keys.freed_channel(),
            route.model,
        )

    def pin_key(self, route: str, pin: PinRequest) -> str:
        """The key of ``pin`` on ``route``: a key's pin there, or a response id's."""
        if pin.kind == "response":
            return self.keys.response_pin(pin.key)
        return self.keys.pin(route, pin.key)

    def _period(self, period: BudgetPeriod, sent_ms: int) -> tuple[int, int, int]:
        """The spend period Redis's clock is most likely in (the script checks it, and
        computes it itself when the guess is wrong)."""
        return period_bounds(period, (sent_ms + self._skew_ms) // 1000)

    async def release_lost(self, lost: LostLease) -> bool:
        """Release ``lost`` on whichever of its targets holds it; whether one did. Its tenant
        gets back its in-flight slot and the cost reserved (the tokens stay in the window
        they were reserved in: which second that was is not known here)."""
        bucket = lost.not_after_ms // 1000
        outcome = Outcome(LOST, spend_correction=-lost.cost_nano)
        for provider in lost.providers:
            lease = Lease(
                lost.id,
                provider,
                bucket,
                0,
                tenant=lost.tenant,
                period=lost.period,
                tenant_tokens=lost.tenant_tokens,
                cost_nano=lost.cost_nano,
            )
            if await self.release(lease, outcome):
                return True
        return False

    async def release(self, lease: Lease, outcome: Outcome) -> int:
        """End ``lease`` and record ``outcome``: 0 when it was already released, 1 when
        released now, 2 when released and its failure opened the provider's circuit."""
        circuit = self.circuits.get(lease.provider, DEFAULT_CIRCUIT)
        args: tuple[Any, ...] = (
            lease.id,
            outcome.outcome,
            lease.bucket,
            outcome.token_correction,
            outcome.ttft_ms,
            outcome.tpot_ms,
            EWMA_TAU_MS,
            outcome.cooldown_ms,
            outcome.provider_requests,
            outcome.provider_tokens,
            circuit.failures,
            int(circuit.cooldown_s * 1000),
            int(circuit.max_cooldown_s * 1000),
            self.keys.health_channel(),
            lease.provider,
            self.keys.pool,
            "",  # the optional blocks present: set below
        )
        keys: tuple[str, ...] = (
            self.keys.provider(lease.provider),
            self.keys.leases(lease.provider),
            self.keys.health_version(),
        )
        blocks = ""
        if lease.tenant:
            blocks += "t"
            keys += (
                self.keys.tenant(lease.tenant),
                self.keys.tenant_live(lease.tenant),
                self.keys.usage("day", period_label(BudgetPeriod.DAY, lease.bucket)),
                self.keys.usage("month", period_label(BudgetPeriod.MONTH, lease.bucket)),
            )
            args += (
                outcome.tenant_token_correction,
                outcome.spend_correction,
                lease.period,
                f"{lease.tenant}|{lease.route}|{lease.provider}|",
                outcome.prompt_tokens,
                outcome.completion_tokens,
                outcome.cost_nano,
                1 if outcome.served else 0,
                USAGE_DAY_TTL_S,
                USAGE_MONTH_TTL_S,
                1 if lease.tracked else 0,
            )
        if outcome.response_id:
            blocks += "r"
            keys += (self.keys.response_pin(outcome.response_id), self.keys.pins(lease.provider))
            args += (self.response_pin_ttl_ms, lease.tenant)
        args = (*args[:16], blocks, *args[17:])
        return int(await self.call("release", keys, args))

    async def response_pin(self, response_id: str) -> tuple[str, str] | None:
        """The provider that made the answer ``response_id`` and its tenant, while pinned
        (one GET: for ``GET``/``DELETE /v1/responses/{id}``)."""
        try:
            raw = await self.client.get(self.keys.response_pin(response_id))
        except RedisError as exc:
            self.on_error("response_pin")
            raise StoreError(f"read failed: {exc}") from exc
        self.answered += 1
        pin = Pin.parse(decode_text(raw)) if raw is not None else None
        return (pin.provider, pin.tenant) if pin else None

    async def drop_response_pin(self, response_id: str) -> bool:
        """Remove the pin of ``response_id`` (after a ``DELETE``); whether there was one."""
        key = self.keys.response_pin(response_id)
        return bool(await self.call("drop_pin", (key,), (self.keys.base,)))

    async def charge(self, charge: Charge) -> None:
        """Record what requests served without Redis (local leases) cost their tenant: its
        spend this period and its usage (``charge.lua``)."""
        keys = (
            self.keys.tenant_live(charge.tenant),
            self.keys.usage("day", period_label(BudgetPeriod.DAY, charge.second)),
            self.keys.usage("month", period_label(BudgetPeriod.MONTH, charge.second)),
        )
        args = (
            charge.period,
            charge.cost_nano,
            f"{charge.tenant}|{charge.route}|{charge.provider}|",
            charge.prompt_tokens,
            charge.completion_tokens,
            USAGE_DAY_TTL_S,
            USAGE_MONTH_TTL_S,
            charge.requests,
        )
        await self.call("charge", keys, args)

    async def dequeue(self, route: str, member: str) -> bool:
        """Take a ticket out of ``route``'s queue; whether it was there."""
        k = self.keys
        keys = (k.queue(route), k.queue_expiry(route), k.queue_clock(route), k.waiting())
        return bool(await self.call("dequeue", keys, (member, k.freed_channel(), route)))

    async def renew_tickets(self, tickets: Mapping[str, Sequence[str]]) -> int:
        """Push back the expiry of waiting tickets (route -> members); how many renewed."""
        keys: list[str] = []
        args: list[Any] = [self.ticket_ttl_ms]
        for route, members in tickets.items():
            if members:
                keys.append(self.keys.queue_expiry(route))
                args += [len(members), *members]
        if not keys:
            return 0
        return int(await self.call("renew", keys, args))

    async def renew(self, leases: Mapping[str, Sequence[str]]) -> int:
        """Push back the expiry of the given leases (provider -> lease ids); how many renewed."""
        keys: list[str] = []
        args: list[Any] = [self.lease_ttl_ms]
        for provider, ids in leases.items():
            if ids:
                keys.append(self.keys.leases(provider))
                args += [len(ids), *ids]
        if not keys:
            return 0
        return int(await self.call("renew", keys, args))

    async def in_flight(self, provider: str) -> int:
        """Requests the cluster has in flight on ``provider`` now (unexpired leases)."""
        try:
            t, _ = await self.client.time()
            return int(await self.client.zcount(self.keys.leases(provider), f"({t * 1000}", "+inf"))
        except RedisError as exc:
            raise StoreError(f"read failed: {exc}") from exc

    async def provider_fields(self, provider: str) -> dict[str, str]:
        """The provider's raw shared fields (for inspection and tests)."""
        try:
            raw = await self.client.hgetall(self.keys.provider(provider))
        except RedisError as exc:
            raise StoreError(f"read failed: {exc}") from exc
        return {k.decode(): v.decode() for k, v in raw.items()}


class Subscription:
    """A pub/sub subscription; Redis errors surface as ``StoreError``."""

    def __init__(self, pubsub: Any, client: Any) -> None:
        self._pubsub = pubsub
        self._client = client
        self.moved = False
        """The primary moved: the next ``next`` fails, so its caller subscribes again there
        (a primary cut off from its sentinels still answers, but hears nothing published on
        the new one)."""

    async def next(self, within: float) -> bytes | None:
        """The next message's data, or ``None`` when none came ``within`` seconds."""
        if self.moved:
            raise StoreError("subscription left: the primary moved")
        try:
            msg = await self._pubsub.get_message(timeout=within)
        except (RedisError, OSError) as exc:
            raise StoreError(f"subscription lost: {exc}") from exc
        if msg is None or msg.get("type") != "message":
            return None
        data = msg["data"]
        return data if isinstance(data, bytes) else str(data).encode()

    async def close(self) -> None:
        """Unsubscribe and close the connection."""
        try:
            await self._pubsub.aclose()
            if self._client is not None:
                await self._client.aclose()
        except (RedisError, OSError):
            pass  # closing a connection that is already gone


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _pin_args(pin: PinRequest) -> tuple[Any, ...]:
    """The affinity block's ARGV (acquire.lua's header): the order 1-based, as Lua counts."""
    order = ",".join(str(i + 1) for i in pin.order)
    return (int(pin.mode), pin.ttl_ms, pin.tenant, repr(float(pin.load_factor)), order)


def _decode_decision(
    raw: Sequence[Any], providers: Sequence[str], *, queued: bool = False, pinned: bool = False
) -> Decision:
    chosen, now_ms, bucket, wait_ms, tcode, spent = (int(x) for x in raw[:6])
    index = chosen - 1 if chosen else None
    tenant = TenantCode(tcode)
    if wait_ms == LATE:
        return Decision(None, now_ms, bucket, wait_ms, ())
    if pinned:  # the pin's two at the very end
        d = _decode_decision(raw[:-2], providers, queued=queued)
        return replace(d, pin=PinOutcome(int(raw[-2])), pinned=decode_text(raw[-1]))
    if queued:  # the queue's four at the end
        state, rank, length = (int(x) for x in raw[-4:-1])
        d = _decode_decision(raw[:-4], providers)
        return replace(
            d,
            queue_state=QueueState(state),
            queue_rank=rank,
            queue_length=length,
            queue_place=float(decode_text(raw[-1])),
        )
    if len(raw) == 6 + len(providers):  # codes only
        candidates = tuple(
            Candidate(name, Code(int(raw[6 + i])), -1, -1, -1, "")
            for i, name in enumerate(providers)
        )
        return Decision(index, now_ms, bucket, wait_ms, candidates, tenant, spent)
    candidates = tuple(
        Candidate(
            provider=name,
            code=Code(int(raw[6 + 5 * i])),
            in_flight=int(raw[7 + 5 * i]),
            rpm_used=int(raw[8 + 5 * i]),
            tpm_used=int(raw[9 + 5 * i]),
            score=decode_text(raw[10 + 5 * i]),
        )
        for i, name in enumerate(providers)
    )
    return Decision(index, now_ms, bucket, wait_ms, candidates, tenant, spent)


def decode_text(value: Any) -> str:
    """A Redis reply as text (bytes decoded as UTF-8)."""
    return value.decode() if isinstance(value, bytes) else str(value)
