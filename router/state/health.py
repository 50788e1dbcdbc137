"""The health side of the shared state: probes, the healthd lease, drains, heartbeats, and
the versioned snapshot the replicas follow. It runs the store's scripts; only ``store.py``
talks to Redis itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.state.store import Store, decode_text


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
            health=decode_text(health) if health else "",
            since_ms=_int(since),
            drained=drain in (b"1", "1"),
            circuit=decode_text(circ) if circ else "",
            circuit_until_ms=_int(until),
            error=decode_text(error) if error else "",
        )
    return HealthSnapshot(int(raw[0]), out)


class HealthStore:
    """The health side of the shared state: probes, leadership, drains, heartbeats."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def report_probe(
        self,
        provider: str,
        epoch: int,
        ok: bool,
        latency_ms: float,
        error: str,
        rise: int,
        fall: int,
        *,
        real: bool = False,
    ) -> ProbeWrite:
        """Record one probe (fenced by ``epoch``); publishes a transition if there is one.

        ``real``: the probe is a real request (``Probe.real_request``), so its success closes
        an open circuit; any other good probe may only let the circuit's trial go now."""
        k = self.keys
        raw = await self.store.call(
            "report_probe",
            (k.provider(provider), k.epoch(), k.health_version()),
            (
                epoch,
                1 if ok else 0,
                round(latency_ms, 3),
                error[:300],
                rise,
                fall,
                k.health_channel(),
                provider,
                k.pool,
                1 if real else 0,
            ),
        )
        if int(raw[0]) == 0:
            return ProbeWrite(False, "", 0)
        return ProbeWrite(True, decode_text(raw[1]), int(raw[2]))

    async def take_lead(self, me: str, lease_ms: int) -> Leadership:
        """Take or keep the healthd leader lease."""
        raw = await self.store.call(
            "take_lead", (self.keys.leader(), self.keys.epoch()), (me, lease_ms)
        )
        holder = decode_text(raw[2]) if len(raw) > 2 else None
        return Leadership(bool(int(raw[0])), int(raw[1]), holder)

    async def resign(self, me: str) -> bool:
        """Give the leader lease up if ``me`` holds it."""
        return bool(await self.store.call("resign", (self.keys.leader(),), (me,)))

    async def heartbeat(self, replica: str, ttl_ms: int, record: dict[str, str]) -> int:
        """Record that ``replica`` is alive; return how many replicas are."""
        args: list[Any] = [replica, ttl_ms]
        for field, value in record.items():
            args += [field, value]
        keys = (self.keys.replicas(), self.keys.replica(replica))
        return int(await self.store.call("heartbeat", keys, args))

    async def read(self, providers: Sequence[str]) -> HealthSnapshot:
        """A consistent, versioned snapshot of the providers' health."""
        keys = [self.keys.health_version(), *(self.keys.provider(p) for p in providers)]
        return _decode_health(await self.store.call("read_health", keys, ()), providers)

    async def set_drain(self, provider: str, drained: bool) -> int:
        """Drain (or re-enable) ``provider`` for every replica; return the new version."""
        k = self.keys
        args = (1 if drained else 0, k.health_channel(), provider, k.pool)
        return int(
            await self.store.call("set_drain", (k.provider(provider), k.health_version()), args)
        )
