"""This replica's leases: renewed while in flight, released exactly once, never leaked.

A lease expires in Redis after its TTL unless renewed, so a replica that dies stops counting
within the TTL. Live leases are renewed in one batched script call every third of the TTL,
which is how a long stream or a slow answer keeps its slot. Releases run as tracked tasks
(the client's answer never waits on them) and are retried on a store error; the release
script is idempotent, so a retry after a timeout cannot count twice.

In degraded mode, leases taken locally are released locally; releases of shared leases are
deferred and flushed when Redis is back, so nothing is double-counted or left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import defaultdict

from router.degraded import SharedMode
from router.errors import StoreError
from router.fallback import LocalState
from router.metrics import RouterMetrics
from router.store import Lease, Outcome, Store
from router.telemetry import Telemetry

log = logging.getLogger("router.leases")

RELEASE_TRIES = 3


class LeaseKeeper:
    """Tracks the replica's live leases; renews and releases them."""

    def __init__(
        self, store: Store, mode: SharedMode, local: LocalState, metrics: RouterMetrics,
        tel: Telemetry,
    ) -> None:  # fmt: skip
        self.store = store
        self.metrics = metrics
        self.tel = tel
        self.mode = mode
        self.local = local
        self._deferred: list[tuple[Lease, Outcome]] = []
        self._live: dict[str, dict[str, Lease]] = defaultdict(dict)
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def start(self) -> None:
        """Start renewing in the background."""
        self._renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")

    async def stop(self) -> None:
        """Wait for pending releases, then stop renewing."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    def hold(self, lease: Lease) -> None:
        """Remember ``lease`` as in flight on this replica."""
        self._live[lease.provider][lease.id] = lease

    def count(self) -> int:
        """Leases this replica holds now."""
        return sum(len(v) for v in self._live.values())

    def in_flight(self) -> dict[str, int]:
        """This replica's in-flight requests per provider."""
        return {p: len(leases) for p, leases in self._live.items()}

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        """Release ``lease`` now, retrying a failed store call; never raises."""
        self._live[lease.provider].pop(lease.id, None)
        if outcome.cooldown_ms:
            self.local.cool(lease.provider, outcome.cooldown_ms)
            self.metrics.cooldown(lease.provider)
        if not lease.local:
            with self.tel.span("release", provider=lease.provider, outcome=outcome.outcome):
                await self._release_shared(lease, outcome)
        self._wake()

    async def _release_shared(self, lease: Lease, outcome: Outcome) -> None:
        for attempt in range(1, RELEASE_TRIES + 1):
            if self.mode.degraded:
                self._deferred.append((lease, outcome))
                return
            try:
                if await self.store.release(lease, outcome) == 2:
                    self.metrics.circuit_opened(lease.provider)
                return
            except StoreError as exc:
                if attempt == RELEASE_TRIES:
                    self.mode.enter(exc)
                else:
                    await asyncio.sleep(0.02 * attempt)

    async def flush_deferred(self) -> None:
        """Release, now that Redis is back, what could not be released while it was away."""
        pending, self._deferred = self._deferred, []
        for i, (lease, outcome) in enumerate(pending):
            try:
                await self.store.release(lease, outcome)
            except StoreError:
                self._deferred = pending[i:] + self._deferred
                raise

    def release_soon(
        self, lease: Lease, outcome: Outcome, context: contextvars.Context | None = None
    ) -> None:
        """Release ``lease`` in a tracked background task (in ``context``: the request's trace)."""
        task = asyncio.create_task(self.release(lease, outcome), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def changed(self, within: float) -> None:
        """Wait until a lease of this replica is released, or ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _renew_forever(self) -> None:
        interval = self.store.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            if self.mode.degraded:
                continue
            ids = {
                p: [lid for lid, lease in leases.items() if not lease.local]
                for p, leases in self._live.items()
            }
            try:
                await self.store.renew(ids)
            except StoreError as exc:
                self.mode.enter(exc)
