"""Replica registration: a heartbeat record in Redis that expires when the replica stops.

The live-replica count it returns is what degraded mode divides the limits by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from router import __version__
from router.degraded import SharedMode
from router.errors import StoreError
from router.fallback import LocalState
from router.store import HealthStore

log = logging.getLogger("router.membership")


class Heartbeat:
    """Beats every ``interval_s``; the record expires after three missed beats."""

    def __init__(
        self, health: HealthStore, replica: str, record: dict[str, str], interval_s: float,
        local: LocalState, mode: SharedMode,
    ) -> None:  # fmt: skip
        self.health = health
        self.replica = replica
        self.record = {**record, "version": __version__, "started": str(int(time.time()))}
        self.interval_s = interval_s
        self.local = local
        self.mode = mode
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Beat in the background."""
        self._task = asyncio.create_task(self._beat_forever(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating (the record then expires by itself)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def beat(self) -> None:
        """Record one heartbeat and learn how many replicas are alive."""
        ttl_ms = int(self.interval_s * 3000)
        self.local.replicas = await self.health.heartbeat(self.replica, ttl_ms, self.record)

    async def _beat_forever(self) -> None:
        while True:
            if not self.mode.degraded:
                try:
                    await self.beat()
                except StoreError as exc:
                    self.mode.enter(exc)
            await asyncio.sleep(self.interval_s)
