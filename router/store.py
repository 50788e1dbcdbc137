"""The one module that talks to Redis: scripts registered once, results decoded in one place.

Every Redis failure becomes a ``StoreError`` here, so callers never see redis-py's errors.
With no Redis URL the store runs on an in-process fakeredis with the same Lua scripts: one
replica only, said loudly at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.config import Circuit, Config, Route
from router.errors import StoreError
from router.keys import WINDOW_BUCKETS, Keys
from router.strategies import Code

log = logging.getLogger("router.store")

EWMA_TAU_MS = 10_000
"""Time constant of the latency EWMAs: a sample's weight halves in about 7 s."""


DEFAULT_CIRCUIT = Circuit()
POOL_WAIT_S = 2.0
"""Longest wait for a free connection of the pool (Redis calls themselves time out sooner)."""
SCRIPTS = (
    "acquire", "release", "renew", "report_probe", "take_lead", "resign", "heartbeat",
    "read_health", "set_drain", "read_state",
)  # fmt: skip


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python encoder.

    Every request sends two script calls with a dozen or more arguments; packing them in
    Python showed up as about 6 % of a replica's CPU under load.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "SCRIPT LOAD": separate words
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def _script(name: str) -> str:
    return resources.files("router").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One target as the acquire script saw it (figures after the decision)."""

    provider: str
    code: Code
    in_flight: int
    rpm_used: int
    tpm_used: int
    score: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one acquire: the chosen target (or none) and what was seen."""

    index: int | None
    now_ms: int
    bucket: int
    wait_ms: int
    """When none was chosen: ms until one may have room; -1 unknown, -2 never."""
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """A target's capacity held by one in-flight request."""

    id: str
    provider: str
    bucket: int
    tokens: int
    local: bool = False
    """Taken in degraded mode: it exists only in this replica's local state."""


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
    ) -> None:
        self.client = client
        self.keys = keys
        self.lease_ttl_ms = lease_ttl_ms
        self.embedded = embedded
        self.circuits = dict(circuits or {})
        self.on_error: Callable[[str], None] = lambda operation: None
        """Called with the operation's name on every failed call (metrics hook)."""
        self._scripts = {name: client.register_script(_script(name)) for name in SCRIPTS}

    @classmethod
    def from_config(cls, cfg: Config) -> Store:
        """A store for ``cfg``: a blocking pool on Redis, or the embedded fakeredis."""
        keys = Keys(cfg.key_prefix, cfg.pool)
        ttl = int(cfg.lease_ttl_s * 1000)
        circuits = {p.name: p.circuit for p in cfg.providers}
        if not cfg.redis_url:
            import fakeredis  # only the embedded mode needs it

            return cls(fakeredis.FakeAsyncRedis(), keys, ttl, embedded=True, circuits=circuits)
        timeout = cfg.redis.timeout_ms / 1000
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url,
            connection_class=_SSLConnection if cfg.redis_url.startswith("rediss:") else _Connection,
            max_connections=cfg.redis.pool_size,
            # waiting for a free pooled connection is local contention, not a dead Redis:
            # a loaded event loop must not be mistaken for an outage (degraded mode)
            timeout=max(timeout, POOL_WAIT_S),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, keys, ttl, embedded=False, circuits=circuits)

    async def start(self, warm: int = 8) -> None:
        """Open ``warm`` connections and load the scripts, so the first requests wait on neither."""
        try:
            await asyncio.gather(*(self.client.ping() for _ in range(warm)))
            await self.load_scripts()
        except RedisError as exc:
            raise StoreError(f"shared store unavailable: {exc}") from exc

    async def load_scripts(self) -> None:
        """(Re)load every script, e.g. after Redis restarted empty."""
        for script in self._scripts.values():
            script.sha = await self.client.script_load(script.script)

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._scripts[name](keys=keys, args=args)
        except RedisError as exc:
            self.on_error(name)
            raise StoreError(f"{name} failed: {exc}") from exc

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel`` on a connection of its own (no read timeout)."""
        if self.embedded:
            client = self.client
        else:
            kwargs = self.client.connection_pool.connection_kwargs
            client = aioredis.Redis(
                host=kwargs.get("host", "127.0.0.1"), port=kwargs.get("port", 6379),
                db=kwargs.get("db", 0), username=kwargs.get("username"),
                password=kwargs.get("password"), socket_connect_timeout=1.0,
            )  # fmt: skip
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
        except RedisError as exc:
            await pubsub.aclose()
            raise StoreError(f"subscribe failed: {exc}") from exc
        return Subscription(pubsub, None if self.embedded else client)

    async def close(self) -> None:
        """Close the connections (the pool too: a client given a pool does not own it)."""
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    async def ping(self) -> None:
        """Raise ``StoreError`` unless Redis answers."""
        try:
            await self.client.ping()
        except RedisError as exc:
            raise StoreError(f"shared store unavailable: {exc}") from exc

    async def acquire(
        self,
        plan: RoutePlan,
        lease_id: str,
        tokens: Sequence[int],
        excluded: Sequence[bool],
        *,
        rand: int,
        expected_output: int,
    ) -> Decision:
        """Choose a target of ``plan`` for one request and lease it (one round trip)."""
        args: list[Any] = [
            plan.route.strategy.value,
            lease_id,
            self.lease_ttl_ms,
            rand,
            expected_output,
            len(plan.providers),
            WINDOW_BUCKETS,
        ]
        for i, (rpm, tpm, maxf, weight) in enumerate(plan.static):
            args += (rpm, tpm, maxf, weight, tokens[i], 1 if excluded[i] else 0)
        return _decode_decision(await self._call("acquire", plan.keys, args), plan.providers)

    async def release(self, lease: Lease, outcome: Outcome) -> int:
        """End ``lease`` and record ``outcome``: 0 when it was already released, 1 when
        released now, 2 when released and its failure opened the provider's circuit."""
        circuit = self.circuits.get(lease.provider, DEFAULT_CIRCUIT)
        args = (
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
        )
        keys = (
            self.keys.provider(lease.provider),
            self.keys.leases(lease.provider),
            self.keys.health_version(),
        )
        return int(await self._call("release", keys, args))

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
        return int(await self._call("renew", keys, args))

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

    async def next(self, within: float) -> bytes | None:
        """The next message's data, or ``None`` when none came ``within`` seconds."""
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


def _decode_decision(raw: Sequence[Any], providers: Sequence[str]) -> Decision:
    chosen, now_ms, bucket, wait_ms = (int(x) for x in raw[:4])
    candidates = tuple(
        Candidate(
            provider=name,
            code=Code(int(raw[4 + 5 * i])),
            in_flight=int(raw[5 + 5 * i]),
            rpm_used=int(raw[6 + 5 * i]),
            tpm_used=int(raw[7 + 5 * i]),
            score=_text(raw[8 + 5 * i]),
        )
        for i, name in enumerate(providers)
    )
    return Decision(chosen - 1 if chosen else None, now_ms, bucket, wait_ms, candidates)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """What the shared state says of a provider's health (the replicas' snapshot)."""

    health: str = ""
    """up, down, or "" while unknown (usable)."""
    since_ms: int = 0
    drained: bool = False
    circuit: str = ""
    """"", open or half (its trial in flight)."""
    circuit_until_ms: int = 0
    error: str = ""

    def usable(self, now_ms: int) -> bool:
        """Whether a request may go there, by health alone."""
        blocked = bool(self.circuit) and self.circuit_until_ms > now_ms
        return not (self.drained or self.health == "down" or blocked)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """Every provider's health at one version of the shared state."""

    version: int
    providers: dict[str, ProviderHealth]


@dataclass(frozen=True, slots=True)
class Leadership:
    """The outcome of trying to take or keep the healthd lease."""

    leading: bool
    epoch: int
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeWrite:
    """The outcome of recording a probe: refused (fenced) or the state it left."""

    recorded: bool
    state: str
    version: int


def _int(value: Any) -> int:
    return int(value) if value not in (None, b"", "") else 0


def _decode_health(raw: Sequence[Any], providers: Sequence[str]) -> HealthSnapshot:
    out = {}
    for i, name in enumerate(providers):
        health, since, drain, circ, until, error = raw[1 + 6 * i : 7 + 6 * i]
        out[name] = ProviderHealth(
            health=_text(health) if health else "",
            since_ms=_int(since),
            drained=drain in (b"1", "1"),
            circuit=_text(circ) if circ else "",
            circuit_until_ms=_int(until),
            error=_text(error) if error else "",
        )
    return HealthSnapshot(int(raw[0]), out)


class HealthStore:
    """The health side of the shared state: probes, leadership, drains, heartbeats."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def report_probe(
        self, provider: str, epoch: int, ok: bool, latency_ms: float, error: str, rise: int,
        fall: int,
    ) -> ProbeWrite:  # fmt: skip
        """Record one probe (fenced by ``epoch``); publishes a transition if there is one."""
        k = self.keys
        raw = await self.store._call(
            "report_probe",
            (k.provider(provider), k.epoch(), k.health_version()),
            (epoch, 1 if ok else 0, round(latency_ms, 3), error[:300], rise, fall,
             k.health_channel(), provider, k.pool),
        )  # fmt: skip
        if int(raw[0]) == 0:
            return ProbeWrite(False, "", 0)
        return ProbeWrite(True, _text(raw[1]), int(raw[2]))

    async def take_lead(self, me: str, lease_ms: int) -> Leadership:
        """Take or keep the healthd leader lease."""
        raw = await self.store._call("take_lead", (self.keys.leader(), self.keys.epoch()),
                                     (me, lease_ms))  # fmt: skip
        holder = _text(raw[2]) if len(raw) > 2 else None
        return Leadership(bool(int(raw[0])), int(raw[1]), holder)

    async def resign(self, me: str) -> bool:
        """Give the leader lease up if ``me`` holds it."""
        return bool(await self.store._call("resign", (self.keys.leader(),), (me,)))

    async def heartbeat(self, replica: str, ttl_ms: int, record: dict[str, str]) -> int:
        """Record that ``replica`` is alive; return how many replicas are."""
        args: list[Any] = [replica, ttl_ms]
        for field, value in record.items():
            args += [field, value]
        keys = (self.keys.replicas(), self.keys.replica(replica))
        return int(await self.store._call("heartbeat", keys, args))

    async def read(self, providers: Sequence[str]) -> HealthSnapshot:
        """A consistent, versioned snapshot of the providers' health."""
        keys = [self.keys.health_version(), *(self.keys.provider(p) for p in providers)]
        return _decode_health(await self.store._call("read_health", keys, ()), providers)

    async def set_drain(self, provider: str, drained: bool) -> int:
        """Drain (or re-enable) ``provider`` for every replica; return the new version."""
        k = self.keys
        args = (1 if drained else 0, k.health_channel(), provider, k.pool)
        return int(await self.store._call("set_drain", (k.provider(provider), k.health_version()),
                                          args))  # fmt: skip
