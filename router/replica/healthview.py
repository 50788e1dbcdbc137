"""A replica's view of provider health: pub/sub events, checked against a versioned snapshot.

The replica subscribes first, then reads the snapshot, so no transition falls between the
two. Pub/sub delivers at most once, so the snapshot is read again on every reconnect and on
a slow timer (``replica.resync_s``): a lost message never leaves the view wrong for longer.
Any event newer than the snapshot triggers a re-read (transitions are rare), so the view is
always one consistent version. Decisions do not depend on this view: the acquire script
reads health from Redis itself. The view serves logs, metrics and degraded mode.
"""

from __future__ import annotations

import logging

from router.replica.background import Followed
from router.state.health import HealthSnapshot, HealthStore, ProviderHealth
from router.state.store import Store

log = logging.getLogger("router.health")


class HealthView(Followed):
    """The last known health of every provider, kept current in the background."""

    name = "health-view"
    what = "health"
    logger = "router.health"

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

    @property
    def store(self) -> Store:
        return self.health.store

    def channel(self) -> str:
        return self.health.keys.health_channel()


def _describe(h: ProviderHealth) -> dict[str, object]:
    return {"health": h.health or "unknown", "drained": h.drained, "circuit": h.circuit or None}
