"""See the cluster: its whole shared state in one consistent read, and every key it lives in.

The state is read by one script call (``read_state.lua``) after one ``ZRANGE`` that names
the replicas: Redis Cluster needs every key a script touches in ``KEYS``, and the replica
ids are known only once their index is read. Nothing here is ever a secret: no keys, no
tokens, no URLs. Rendering lives in ``router.ctl.tables``; the JSON schema is ``state_json``.

Schema 1, with these fields added since (additive, so still 1): each route's ``queue``,
``null`` when the route never waits (``queue_timeout_s`` 0), else

    {"timeout_s": 5.0,        the route's queue_timeout_s
     "max_queue": 10000,      tickets that may wait at once, over every replica
     "waiting": 3,            requests waiting now, cluster-wide (unexpired tickets)
     "by_tenant": [{"tenant": "batch", "priority": 0, "count": 2}, ...]}

And each provider's ``pins``: the affinity pins (session and prefix keys of every route,
response ids) naming it whose expiry is ahead of Redis's clock.

And ``shard``: on a Redis Cluster, ``{"slot": 5718, "node": "10.0.1.2:6379"}``, the pool's
hash slot (every key of the pool's scripts is in it) and the primary owning it, as the
client last learned the cluster's slots; ``null`` on one server or Sentinel. The node's
address is its host and port only (no user, no password).

``by_tenant`` is sorted by priority (highest first: served first), then tenant name. A ticket
counts while its expiry (last renewal + the ticket TTL) is ahead of Redis's clock: a dead
waiter's ticket leaves the count within the TTL, before the acquire script purges it. How
long each request has waited is not kept in Redis (a ticket holds its renewal, not its
start), so it is not shown here: ``router_queue_wait_seconds`` has it, per admitted request.
Counting costs the read O(waiting tickets): 3.7 ms of Redis time at 10,000 (read_state.lua).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from redis.exceptions import RedisError

from router.config import Config, Provider, Route, Strategy, Target
from router.errors import StoreError
from router.state.keys import WINDOW_BUCKETS, Keys
from router.state.store import Store, decode_text

SCHEMA = 1
"""Version of the JSON schema of ``state_json``; bumped on any incompatible change."""

Health = Literal["up", "down", "unknown"]
CircuitState = Literal["closed", "open", "half"]
_HEALTH: dict[str | None, Health] = {"up": "up", "down": "down"}
_CIRCUIT: dict[str | None, CircuitState] = {"open": "open", "half": "half"}


@dataclass(frozen=True, slots=True)
class ProviderState:
    """One provider as every replica sees it: health, circuit, limits, load, latency."""

    name: str
    kind: str
    weight: int
    health: Health
    health_since_ms: int | None
    last_error: str | None
    probe_latency_ms: float | None
    circuit: CircuitState
    circuit_until_ms: int | None
    cooldown_until_ms: int
    drained: bool
    in_flight: int
    max_in_flight: int | None
    rpm_used: int
    rpm_limit: int | None
    tpm_used: int
    tpm_limit: int | None
    ttft_ewma_ms: float | None
    tpot_ewma_ms: float | None
    outcomes: dict[str, int]
    pins: int = 0
    """Affinity pins (session, prefix and response ids) naming it now, over every route."""


@dataclass(frozen=True, slots=True)
class TargetState:
    """One target of a route: the provider, the model it is asked for, its weight there."""

    provider: str
    model: str
    weight: int


@dataclass(frozen=True, slots=True)
class WaitingState:
    """Requests of one tenant at one priority waiting in a route's queue, cluster-wide."""

    tenant: str
    priority: int
    count: int


@dataclass(frozen=True, slots=True)
class QueueState:
    """A route's wait queue: who waits for it now, over every replica."""

    timeout_s: float
    max_queue: int
    waiting: int
    by_tenant: tuple[WaitingState, ...] = ()
    """Highest priority first (the band served first), then by tenant name."""


@dataclass(frozen=True, slots=True)
class RouteState:
    """A route as configured, and the requests waiting for it (``None``: it never waits)."""

    model: str
    strategy: str
    targets: tuple[TargetState, ...]
    queue: QueueState | None = None


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """A live replica, from its heartbeat record."""

    id: str
    host: str
    pid: int | None
    version: str
    started: int | None
    last_seen_ms: int
    age_s: float  # since the last heartbeat


@dataclass(frozen=True, slots=True)
class HealthdState:
    """Who leads the health daemons, and the fencing epoch."""

    leader: str | None
    epoch: int


@dataclass(frozen=True, slots=True)
class Shard:
    """Where the pool lives on a Redis Cluster: its hash slot and the primary owning it."""

    slot: int
    node: str
    """``host:port``."""


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The whole cluster at one instant of Redis time."""

    schema: int
    taken_at_ms: int
    pool: str
    key_prefix: str
    health_version: int
    providers: tuple[ProviderState, ...]
    routes: tuple[RouteState, ...]
    replicas: tuple[ReplicaState, ...]
    healthd: HealthdState
    shard: Shard | None = None
    """On a Redis Cluster, the pool's slot and its owner (``None`` elsewhere)."""


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    # plain reads bypass Store._call, so they translate redis' errors themselves
    try:
        yield
    except RedisError as exc:
        raise StoreError(f"read failed: {exc}") from exc


async def read_state(store: Store, cfg: Config) -> ClusterState:
    """The whole cluster state: one ``ZRANGE``, then one consistent script call."""
    k = store.keys
    with _reading():
        ids = [decode_text(i) for i in await store.client.zrange(k.replicas(), 0, -1)]
    keys = [k.leader(), k.epoch(), k.health_version(), k.replicas()]
    for p in cfg.providers:
        keys += [k.provider(p.name), k.leases(p.name)]
    queued = _queued(cfg)
    keys += [k.queue_expiry(r.model) for r in queued]
    keys += [k.replica(i) for i in ids]
    raw = await store.call("read_state", keys, (len(cfg.providers), len(queued)))
    state = decode_state(raw, cfg, ids)
    shard = store.shard()
    return replace(state, shard=Shard(*shard)) if shard is not None else state


def _queued(cfg: Config) -> list[Route]:
    """The routes with a wait queue, in config order (read_state.lua's KEYS order)."""
    return [r for r in cfg.routes if r.queue_timeout_s > 0]


def decode_state(raw: Sequence[Any], cfg: Config, ids: Sequence[str]) -> ClusterState:
    """``read_state.lua``'s answer as a ``ClusterState``."""
    sec = int(raw[0])
    now_ms = sec * 1000 + int(raw[1]) // 1000
    n = len(cfg.providers)
    providers = tuple(
        _provider(p, _hash(raw[6 + 3 * i]), int(raw[7 + 3 * i]), int(raw[8 + 3 * i]), sec, now_ms)
        for i, p in enumerate(cfg.providers)
    )
    queued = _queued(cfg)
    queues = {r.model: _queue(r, raw[6 + 3 * n + j]) for j, r in enumerate(queued)}
    beats = _hash(raw[5])
    records = zip(ids, raw[6 + 3 * n + len(queued) :], strict=False)
    # a replica whose record expired is gone, whatever the index still says
    replicas = tuple(_replica(i, _hash(r), beats, now_ms) for i, r in records if r)
    leader = decode_text(raw[2]) if raw[2] else None
    return ClusterState(
        SCHEMA,
        now_ms,
        cfg.pool,
        cfg.key_prefix,
        int(raw[4]),
        providers,
        _routes(cfg, queues),
        replicas,
        HealthdState(leader, int(raw[3])),
    )


def _provider(
    p: Provider, h: dict[str, str], in_flight: int, pins: int, sec: int, now_ms: int
) -> ProviderState:
    oldest = sec - WINDOW_BUCKETS + 1
    cool = _int(h.get("cool"))
    circuit = _CIRCUIT.get(h.get("circ"), "closed")
    return ProviderState(
        name=p.name,
        kind=p.kind,
        weight=p.weight,
        health=_HEALTH.get(h.get("health"), "unknown"),
        health_since_ms=_int(h.get("h_since")) or None,
        last_error=h.get("h_error") or None,
        probe_latency_ms=_float(h.get("h_latency")),
        circuit=circuit,
        circuit_until_ms=_int(h.get("circ_until")) if circuit != "closed" else None,
        cooldown_until_ms=cool if cool > now_ms else 0,
        drained=h.get("drain") == "1",
        in_flight=in_flight,
        max_in_flight=p.limits.max_in_flight,
        rpm_used=_window(h, "r:", oldest, sec),
        rpm_limit=p.limits.rpm,
        tpm_used=_window(h, "t:", oldest, sec),
        tpm_limit=p.limits.tpm,
        ttft_ewma_ms=_float(h.get("ttft")),
        tpot_ewma_ms=_float(h.get("tpot")),
        outcomes={f[2:]: int(v) for f, v in sorted(h.items()) if f.startswith("o:")},
        pins=pins,
    )


def _window(h: Mapping[str, str], prefix: str, oldest: int, sec: int) -> int:
    """The buckets inside the window ending now: the running total may still hold stale ones
    (only an acquire slides it)."""
    buckets = ((f[len(prefix) :], v) for f, v in h.items() if f.startswith(prefix))
    return sum(int(v) for b, v in buckets if b.isdigit() and oldest <= int(b) <= sec)


def _replica(rid: str, h: dict[str, str], beats: Mapping[str, str], now_ms: int) -> ReplicaState:
    seen = _int(h.get("last_seen")) or int(float(beats.get(rid, "0")))
    return ReplicaState(
        id=rid,
        host=h.get("host", ""),
        pid=_int(h.get("pid")) or None,
        version=h.get("version", ""),
        started=_int(h.get("started")) or None,
        last_seen_ms=seen,
        age_s=round(max(0, now_ms - seen) / 1000, 3),
    )


def _queue(route: Route, raw: Sequence[Any]) -> QueueState:
    """One route's part of the answer: {tickets, '<tenant>|<priority>', count, ...}."""
    groups = [decode_text(x) for x in raw[1:]]
    waiting = []
    for who, count in zip(groups[::2], groups[1::2], strict=True):
        tenant, _, priority = who.rpartition("|")
        waiting.append(WaitingState(tenant, int(priority), int(count)))
    waiting.sort(key=lambda w: (-w.priority, w.tenant))
    return QueueState(route.queue_timeout_s, route.max_queue, int(raw[0]), tuple(waiting))


def _routes(cfg: Config, queues: Mapping[str, QueueState]) -> tuple[RouteState, ...]:
    def target(t: Target) -> TargetState:
        return TargetState(t.provider, t.model, t.weight or cfg.provider(t.provider).weight)

    return tuple(
        RouteState(
            r.model, r.strategy.value, tuple(target(t) for t in r.targets), queues.get(r.model)
        )
        for r in cfg.routes
    )


def waiting_counts(state: ClusterState) -> dict[tuple[str, str, int], int]:
    """Requests waiting per (route, tenant, priority): the ``router_queue_waiting`` gauge."""
    return {
        (r.model, w.tenant, w.priority): w.count
        for r in state.routes
        if r.queue is not None
        for w in r.queue.by_tenant
    }


def state_json(state: ClusterState) -> dict[str, Any]:
    """The documented, stable JSON form of ``state`` (see README, "See the cluster")."""
    return dict(_plain(asdict(state)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key of the deployment: its Redis type ("none" when absent), TTL, what it holds."""

    key: str
    type: str
    ttl_ms: int | None  # None: no expiry, or absent
    what: str


def expected_keys(keys: Keys, cfg: Config, replica_ids: Sequence[str]) -> dict[str, str]:
    """Every key this config and these replicas use, in display order, with what it holds."""
    out: dict[str, str] = {}
    for p in cfg.providers:
        out[keys.provider(p.name)] = f"provider {p.name}: windows, cooldown, health, circuit, EWMAs"
        out[keys.leases(p.name)] = f"provider {p.name}: in-flight leases (id -> expiry ms)"
        out[keys.pins(p.name)] = f"provider {p.name}: its affinity pins (key -> expiry ms)"
    for r in cfg.routes:
        if r.strategy is Strategy.ROUND_ROBIN:
            out[keys.rotation(r.model)] = f"route {r.model}: the shared rotation counter"
        if r.strategy is Strategy.WEIGHTED:
            out[keys.swrr(r.model)] = f"route {r.model}: smooth weighted round-robin weights"
        if r.queue_timeout_s > 0:
            out[keys.queue(r.model)] = f"route {r.model}: wait queue (ticket -> place)"
            out[keys.queue_expiry(r.model)] = f"route {r.model}: waiting tickets' expiry (ms)"
            out[keys.queue_clock(r.model)] = f"route {r.model}: fair-queueing clock and tags"
    if _queued(cfg):
        out[keys.waiting()] = "tickets waiting in every route's queue"
    out[keys.health_version()] = "health version, bumped on every transition"
    out[keys.leader()] = "healthd leader lease (the leader's id)"
    out[keys.epoch()] = "healthd fencing epoch"
    out[keys.replicas()] = "replica index (id -> last heartbeat ms)"
    for rid in replica_ids:
        out[keys.replica(rid)] = f"replica {rid}: heartbeat record"
    out[keys.tenants()] = "tenants created through the admin API (name -> spec)"
    out[keys.tenant_keys()] = "keys issued through the admin API (sha256 -> tenant, id, created)"
    out[keys.tenants_version()] = "tenants version, bumped on every tenant or key change"
    for name in ["default", *(t.name for t in cfg.tenants if t.name != "default")]:
        out[keys.tenant(name)] = f"tenant {name}: its window's past seconds"
        out[keys.tenant_live(name)] = f"tenant {name}: live figures (packed: window, spend)"
    return out


def _found(keys: Keys, name: str) -> str | None:
    """What a key not named by the config holds, when its name says it."""
    tenant, usage = keys.tenant(""), keys.usage("", "")[:-1]
    pin, response = keys.pin("", "")[:-1], keys.response_pin("")
    if name.startswith(pin):
        route = name[len(pin) :].rpartition(":")[0]
        return f"affinity pin on route {route} (provider|expiry|tenant)"
    if name.startswith(response):
        return "a Responses API answer's pin (provider|expiry|tenant)"
    if name.startswith(tenant):
        who = name[len(tenant) :]
        if who.endswith(":live"):
            return f"tenant {who[:-5]}: live figures, packed (an admin API tenant?)"
        return f"tenant {who}: its window's past seconds (an admin API tenant?)"
    if name.startswith(usage):
        period, _, label = name[len(usage) :].partition(":")
        return f"usage of {period} {label} (tenant|route|provider|figure -> count)"
    return None


async def describe_keys(store: Store, cfg: Config) -> list[KeyInfo]:
    """Every key of the deployment, expected or found by SCAN, with its type and TTL."""
    k = store.keys
    with _reading():
        ids = [decode_text(i) for i in await store.client.zrange(k.replicas(), 0, -1)]
        expected = expected_keys(k, cfg, ids)
        found = {
            decode_text(key) async for key in store.client.scan_iter(match=k.pattern(), count=500)
        }
        names = [*expected, *sorted(found - set(expected))]
        pipe = store.client.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
            pipe.pttl(name)
        raw = await pipe.execute()
    stray = "not named by this config: a removed provider or route?"
    replica_prefix = k.replica("")
    out = []
    for i, name in enumerate(names):
        kind, ttl = decode_text(raw[2 * i]), int(raw[2 * i + 1])
        what = expected.get(name) or _found(k, name) or stray
        if name not in expected and name.startswith(replica_prefix):
            what = "a replica record missing from the index (it expires by itself)"
        out.append(KeyInfo(name, kind, ttl if ttl >= 0 else None, what))
    return [*out, await _channel(store)]


async def _channel(store: Store) -> KeyInfo:
    """The health channel: not a key, but part of the deployment's Redis footprint."""
    channel = store.keys.health_channel()
    with _reading():
        [(_, subscribers)] = await store.client.pubsub_numsub(channel)
    what = f"pub/sub channel of health transitions ({subscribers} subscribers)"
    return KeyInfo(channel, "channel", None, what)


def _hash(raw: Any) -> dict[str, str]:
    items = [decode_text(x) for x in (raw or [])]
    return dict(zip(items[::2], items[1::2], strict=True))


def _int(value: str | None) -> int:
    return int(float(value)) if value else 0


def _float(value: str | None) -> float | None:
    return round(float(value), 3) if value else None
