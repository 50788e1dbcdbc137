"""This replica's leases: renewed while in flight, released exactly once, never leaked.

A lease expires in Redis after its TTL unless renewed, so a replica that dies stops counting
within the TTL. Live leases are renewed in one batched script call every third of the TTL,
which is how a long stream or a slow answer keeps its slot. Releases run as tracked tasks
(the client's answer never waits on them) and are retried on a store error; the release
script is idempotent, so a retry after a timeout cannot count twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from router.errors import StoreError
from router.store import Lease, Outcome, Store

log = logging.getLogger("router.leases")

RELEASE_TRIES = 3


class LeaseKeeper:
    """Tracks the replica's live leases; renews and releases them."""

    def __init__(self, store: Store) -> None:
        self.store = store
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

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        """Release ``lease`` now, retrying a failed store call; never raises."""
        self._live[lease.provider].pop(lease.id, None)
        for attempt in range(1, RELEASE_TRIES + 1):
            try:
                await self.store.release(lease, outcome)
                break
            except StoreError as exc:
                if attempt == RELEASE_TRIES:
                    log.warning(
                        "release of %s failed, its lease will expire after the TTL: %s",
                        lease.id,
                        exc,
                    )
                else:
                    await asyncio.sleep(0.05 * attempt)
        self._wake()

    def release_soon(self, lease: Lease, outcome: Outcome) -> None:
        """Release ``lease`` in a tracked background task."""
        task = asyncio.create_task(self.release(lease, outcome))
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
            ids = {p: list(leases) for p, leases in self._live.items() if leases}
            try:
                await self.store.renew(ids)
            except StoreError as exc:
                log.warning("lease renewal failed, retrying in %.1fs: %s", interval, exc)
