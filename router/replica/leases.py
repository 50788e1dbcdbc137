"""This replica's leases: renewed while in flight, released exactly once, never leaked.

A lease expires in Redis after its TTL unless renewed, so a replica that dies stops counting
within the TTL. Live leases are renewed in one batched script call every third of the TTL,
which is how a long stream or a slow answer keeps its slot. Releases run as tracked tasks
(the client's answer never waits on them) and are retried on a store error; the release
script is idempotent, so a retry after a timeout cannot count twice.

In degraded mode, leases taken locally are released locally; releases of shared leases are
deferred and flushed when Redis is back, so nothing is double-counted or left behind. So are
releases that failed every try, and the leases of acquires whose answer never came (timed
out, or their caller cancelled, with the command on its way): see ``LostLease``. One
background task retries them until Redis answers or the replica goes degraded (recovery
then starts it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from router.errors import StoreError
from router.replica.degraded import SharedMode
from router.replica.local import LocalState
from router.state.store import Charge, Lease, LostLease, Outcome, Store
from router.telemetry.metrics import RouterMetrics
from router.telemetry.tracing import Telemetry

log = logging.getLogger("router.leases")

RELEASE_TRIES = 3
SETTLE_RETRY_S = 0.05
"""Pause before settling again after a store error. Short, so that leases lost while Redis
was paused are released right as it resumes (until then they count against the limits);
no backoff is needed: a Redis that keeps failing soon makes the replica degraded, which
stops the retries until recovery."""
SETTLE_BATCH = 256
"""Releases sent at once while settling (they share the pipelined connection)."""


class LeaseKeeper:
    """Tracks the replica's live leases; renews and releases them."""

    def __init__(
        self,
        store: Store,
        mode: SharedMode,
        local: LocalState,
        metrics: RouterMetrics,
        tel: Telemetry,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.tel = tel
        self.mode = mode
        self.local = local
        self._deferred: list[tuple[Lease, Outcome]] = []
        self._charges: dict[tuple[str, str, str, int, int], Charge] = {}
        """What requests served without Redis cost their tenants, summed per tenant, route,
        provider, spend period and day (so it stays small however long Redis is away):
        recorded once it is back."""
        self._lost: list[LostLease] = []
        self._live: dict[str, dict[str, Lease]] = defaultdict(dict)
        self._tenants: dict[str, int] = defaultdict(int)
        """Leases held per tenant."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._stopped = False
        self._changed = asyncio.Event()

    def start(self) -> None:
        """Start renewing in the background."""
        self._renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")

    async def stop(self) -> None:
        """Wait for pending releases, then stop renewing and settling (what is left
        unsettled expires with its TTL)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopped = True
        for task in (self._renewer, self._settler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def pending(self) -> int:
        """Releases and lost leases waiting for Redis."""
        return len(self._deferred) + len(self._lost) + len(self._charges)

    def hold(self, lease: Lease) -> None:
        """Remember ``lease`` as in flight on this replica."""
        self._live[lease.provider][lease.id] = lease
        if lease.tenant:
            self._tenants[lease.tenant] += 1

    def tenant_in_flight(self, tenant: str) -> int:
        """This replica's in-flight requests of ``tenant``."""
        return self._tenants.get(tenant, 0)

    def count(self) -> int:
        """Leases this replica holds now."""
        return sum(len(v) for v in self._live.values())

    def in_flight(self) -> dict[str, int]:
        """This replica's in-flight requests per provider."""
        return {p: len(leases) for p, leases in self._live.items()}

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        """Release ``lease`` now, retrying a failed store call; never raises."""
        if self._live[lease.provider].pop(lease.id, None) is not None and lease.tenant:
            self._tenants[lease.tenant] -= 1
            if not self._tenants[lease.tenant]:
                del self._tenants[lease.tenant]
        self.local.tenant_released(lease, outcome)
        if outcome.cooldown_ms:
            self.local.cool(lease.provider, outcome.cooldown_ms)
            self.metrics.cooldown(lease.provider)
        if not lease.local:
            with self.tel.span("release", provider=lease.provider, outcome=outcome.outcome):
                await self._release_shared(lease, outcome)
        elif lease.tenant and outcome.served:
            self._add_charge(lease, outcome)
            self._settle_soon()
        self._wake()

    async def _release_shared(self, lease: Lease, outcome: Outcome) -> None:
        for attempt in range(1, RELEASE_TRIES + 1):
            if self.mode.degraded:
                break
            try:
                if await self.store.release(lease, outcome) == 2:
                    self.metrics.circuit_opened(lease.provider)
                return
            except StoreError as exc:
                self.mode.enter(exc)
                if attempt < RELEASE_TRIES:
                    await asyncio.sleep(0.02 * attempt)
        self._deferred.append((lease, outcome))
        self._settle_soon()

    def lost(self, lease: LostLease) -> None:
        """Release ``lease`` (if its acquire took it) once Redis answers."""
        self._lost.append(lease)
        self._settle_soon()

    async def flush_deferred(self) -> None:
        """Redis is back: release what waited for it (in the background)."""
        self._settle_soon()

    def _settle_soon(self) -> None:
        if self._stopped:
            return
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle(), name="lease-settler")

    async def _settle(self) -> None:
        """Settle what waits for Redis, retrying until it is all done or Redis is given up."""
        while self.pending() and not self.mode.degraded:
            try:
                wait = await self._settle_once()
            except StoreError as exc:
                self.mode.enter(exc)
                wait = SETTLE_RETRY_S * random.uniform(0.5, 1.0)
            if wait > 0:
                await asyncio.sleep(wait)

    async def _settle_once(self) -> float:
        """One pass over what waits; the seconds until a lost lease may be settled. Raises
        ``StoreError`` when a call failed (what it was for waits for the next pass)."""
        failed = await self._release_deferred()
        failed += await self._charge()
        now = await self.store.time_ms()  # Redis's clock, before the lost leases' releases
        failed += await self._release_lost(now)
        if failed:
            raise StoreError(f"{failed} releases failed: they wait for the next pass")
        if not self._lost:
            return 0.0
        return max(0, min(x.not_after_ms for x in self._lost) - now + 5) / 1000

    async def _release_deferred(self) -> int:
        """Release a batch of the deferred releases; how many failed (they stay)."""
        batch, self._deferred = self._deferred[:SETTLE_BATCH], self._deferred[SETTLE_BATCH:]
        results = await _each(self.store.release(lease, outcome) for lease, outcome in batch)
        for (lease, outcome), r in zip(batch, results, strict=True):
            if isinstance(r, StoreError):
                self._deferred.append((lease, outcome))
            elif r == 2:
                self.metrics.circuit_opened(lease.provider)
        return sum(isinstance(r, StoreError) for r in results)

    def _add_charge(self, lease: Lease, outcome: Outcome) -> None:
        day = lease.bucket // 86_400
        key = (lease.tenant, lease.route, lease.provider, lease.period, day)
        c = self._charges.get(key)
        if c is None:
            c = Charge(lease.tenant, lease.route, lease.provider, lease.period, lease.bucket)
            self._charges[key] = c
        c.requests += 1
        c.prompt_tokens += outcome.prompt_tokens
        c.completion_tokens += outcome.completion_tokens
        c.cost_nano += outcome.cost_nano

    async def _charge(self) -> int:
        """Record a batch of the charges of requests served without Redis; how many failed
        (they are added back, to what was charged since)."""
        keys = list(self._charges)[:SETTLE_BATCH]
        batch = [self._charges.pop(k) for k in keys]
        results = await _each(self.store.charge(c) for c in batch)
        for key, c, r in zip(keys, batch, results, strict=True):
            if isinstance(r, StoreError):
                if (now := self._charges.get(key)) is None:
                    self._charges[key] = c
                else:
                    now.requests += c.requests
                    now.prompt_tokens += c.prompt_tokens
                    now.completion_tokens += c.completion_tokens
                    now.cost_nano += c.cost_nano
        return sum(isinstance(r, StoreError) for r in results)

    async def _release_lost(self, now: int) -> int:
        """Release a batch of lost leases; how many calls failed. One not found stays while
        its acquire may still run: its deadline had not passed at ``now``, Redis's clock
        read before these releases."""
        batch, self._lost = self._lost[:SETTLE_BATCH], self._lost[SETTLE_BATCH:]
        found = await _each(self.store.release_lost(x) for x in batch)
        for x, r in zip(batch, found, strict=True):
            if isinstance(r, StoreError) or (r is False and x.not_after_ms >= now):
                self._lost.append(x)
        return sum(isinstance(r, StoreError) for r in found)

    def release_soon(
        self, lease: Lease, outcome: Outcome, context: contextvars.Context | None = None
    ) -> None:
        """Release ``lease`` in a tracked background task (in ``context``: the request's trace)."""
        task = asyncio.create_task(self.release(lease, outcome), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def dequeue_soon(self, route: str, member: str) -> None:
        """Take a waiting request's ticket out of its route's queue, in a tracked background
        task (a failure leaves it to expire within the ticket's TTL)."""
        task = asyncio.create_task(self._dequeue(route, member))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dequeue(self, route: str, member: str) -> None:
        if self.mode.degraded:
            return
        try:
            await self.store.dequeue(route, member)
        except StoreError as exc:
            self.mode.enter(exc)

    async def changed(self, within: float) -> None:
        """Wait until a lease of this replica is released, or ``within`` seconds."""
        with contextlib.suppress(TimeoutError):  # not wait_for: see WaitRoom.wait
            async with asyncio.timeout(within):
                await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _renew_forever(self) -> None:
        interval = self.store.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            if self.mode.degraded:
                continue
            if self.pending():
                self._settle_soon()
            ids = {
                p: [lid for lid, lease in leases.items() if not lease.local]
                for p, leases in self._live.items()
            }
            try:
                await self.store.renew(ids)
            except StoreError as exc:
                self.mode.enter(exc)


T = TypeVar("T")


async def _each(calls: Iterable[Awaitable[T]]) -> list[T | StoreError]:
    """Await ``calls`` together; each one's result, or its ``StoreError``."""
    out: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
    for r in out:
        if isinstance(r, BaseException) and not isinstance(r, StoreError):
            raise r
    return out
