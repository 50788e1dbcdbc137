"""Replica registration: a heartbeat record in Redis that expires when the replica stops.

The live-replica count it returns is what degraded mode divides the limits by.
"""

from __future__ import annotations

import asyncio
import logging
import time

from router import __version__
from router.errors import StoreError
from router.replica.background import Background
from router.replica.degraded import SharedMode
from router.replica.local import LocalState
from router.state.health import HealthStore

log = logging.getLogger("router.membership")


class Heartbeat(Background):
    """Beats every ``interval_s``; the record expires after three missed beats."""

    name = "heartbeat"

    def __init__(
        self,
        health: HealthStore,
        replica: str,
        record: dict[str, str],
        interval_s: float,
        local: LocalState,
        mode: SharedMode,
    ) -> None:
        self.health = health
        self.replica = replica
        self.record = {**record, "version": __version__, "started": str(int(time.time()))}
        self.interval_s = interval_s
        self.local = local
        self.mode = mode

    async def beat(self) -> None:
        """Record one heartbeat and learn how many replicas are alive."""
        ttl_ms = int(self.interval_s * 3000)
        self.local.replicas = await self.health.heartbeat(self.replica, ttl_ms, self.record)

    async def run(self) -> None:
        """Beat until stopped (the record then expires by itself)."""
        while True:
            if not self.mode.degraded:
                try:
                    await self.beat()
                except StoreError as exc:
                    self.mode.enter(exc)
            await asyncio.sleep(self.interval_s)
