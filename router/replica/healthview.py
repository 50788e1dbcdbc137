"""A replica's view of provider health: pub/sub events, checked against a versioned snapshot.

The replica subscribes first, then reads the snapshot, so no transition falls between the
two. Pub/sub delivers at most once, so the snapshot is read again on every reconnect and on
a slow timer (``replica.resync_s``): a lost message never leaves the view wrong for longer.
Any event newer than the snapshot triggers a re-read (transitions are rare), so the view is
always one consistent version. Decisions do not depend on this view: the acquire script
reads health from Redis itself. The view serves logs, metrics and degraded mode.
"""

from __future__ import annotations

import asyncio
import logging
import random

import orjson

from router.errors import StoreError
from router.replica.background import Background
from router.state.health import HealthSnapshot, HealthStore, ProviderHealth

log = logging.getLogger("router.health")


class HealthView(Background):
    """The last known health of every provider, kept current in the background."""

    name = "health-view"

    def __init__(self, health: HealthStore, providers: list[str], resync_s: float) -> None:
        self.health = health
        self.providers = providers
        self.resync_s = resync_s
        self.snapshot = HealthSnapshot(0, {p: ProviderHealth() for p in providers})
        self.resyncs = 0

    @property
    def version(self) -> int:
        return self.snapshot.version

    async def resync(self) -> None:
        """Read the whole snapshot again (raises ``StoreError``)."""
        snap = await self.health.read(self.providers)
        changed = [p for p, h in snap.providers.items() if self.snapshot.providers.get(p) != h]
        self.snapshot = snap
        self.resyncs += 1
        if changed:
            states = {p: snap.providers[p] for p in changed}
            log.info(
                "health changed",
                extra={
                    "fields": {
                        "version": snap.version,
                        "providers": {p: _describe(h) for p, h in states.items()},
                    }
                },
            )

    def apply(self, data: bytes) -> bool:
        """Whether an event is newer than the snapshot (and so calls for a re-read)."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        return isinstance(event, dict) and int(event.get("version", 0)) > self.version

    async def run(self) -> None:
        """Follow the health channel until stopped, resubscribing after every loss."""
        delay = 0.1
        while True:
            try:
                await self._session()
            except StoreError as exc:
                log.warning(
                    "health subscription lost, retrying",
                    extra={"fields": {"error": str(exc), "retry_s": round(delay, 2)}},
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        sub = await self.health.store.subscribe(self.health.keys.health_channel())
        try:
            await self.resync()  # after subscribing: nothing falls in between
            loop = asyncio.get_running_loop()
            last = loop.time()
            while True:
                data = await sub.next(within=min(1.0, self.resync_s))
                if (data is not None and self.apply(data)) or loop.time() - last >= self.resync_s:
                    await self.resync()
                    last = loop.time()
        finally:
            await sub.close()


def _describe(h: ProviderHealth) -> dict[str, object]:
    return {"health": h.health or "unknown", "drained": h.drained, "circuit": h.circuit or None}
