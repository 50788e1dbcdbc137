"""Shared or degraded: whether the replica decides in Redis or alone, and the way back.

Redis being down, restarting or failing over must not take the gateway down. The first
store error flips the replica into degraded mode (logged once, counted); from then on no
request waits on Redis, and one background task probes it with jittered backoff. When it
answers, the scripts are loaded again (a restarted Redis has none), health is re-read,
deferred releases are flushed, and the replica returns to shared state without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from router.errors import StoreError
from router.store import Store

log = logging.getLogger("router.degraded")

MAX_BACKOFF_S = 5.0


class SharedMode:
    """The replica's mode, its history, and the recovery loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.degraded = False
        self.reason = ""
        self.since = 0.0
        self.episodes = 0
        """How many times the replica went degraded."""
        self.degraded_s = 0.0
        """Seconds spent degraded in finished episodes."""
        self.on_recovery: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def enter(self, exc: StoreError) -> None:
        """Go degraded after ``exc`` (once: later errors in the same episode are ignored)."""
        if self.degraded or self.store.embedded:
            return
        self.degraded, self.reason, self.since = True, str(exc), time.monotonic()
        self.episodes += 1
        log.warning("shared state unreachable: serving from local state (degraded)",
                    extra={"fields": {"reason": self.reason}})  # fmt: skip
        self._task = asyncio.create_task(self._recover(), name="store-recovery")

    def seconds(self) -> float:
        """Total seconds spent degraded, the current episode included."""
        current = time.monotonic() - self.since if self.degraded else 0.0
        return self.degraded_s + current

    async def stop(self) -> None:
        """Stop the recovery loop, if one runs."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _recover(self) -> None:
        delay = 0.05
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, MAX_BACKOFF_S)
            try:
                await self.store.ping()
                await self.store.load_scripts()
                for hook in self.on_recovery:
                    await hook()
            except StoreError:
                continue
            break
        spent = time.monotonic() - self.since
        self.degraded_s += spent
        self.degraded = False
        log.warning("shared state reachable again: back to shared decisions",
                    extra={"fields": {"degraded_s": round(spent, 3)}})  # fmt: skip
