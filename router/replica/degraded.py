"""Shared or degraded: whether the replica decides in Redis or alone, and the way back.

Redis being down, restarting or failing over must not take the gateway down. A failed Redis
call costs only its own request a local decision. The replica goes degraded (logged once,
counted) when calls have kept failing for ``redis.degrade_after_ms`` with not one answered
in between; from then on no request waits on Redis, and one background task probes it with
jittered backoff. The first probe Redis answers brings the replica back to shared decisions
without a restart; re-reading health and flushing what waited for Redis follow, and their
failures count like any call's.

Why not the first failure, nor N failures in a row: one late reply fails every call queued
behind it at once (the shared connection gives up when Redis goes silent), so a count of
failures measures the load more than Redis; and under a slow Redis some calls fail while
most are answered. With replies 50-150 ms against a 100 ms timeout, going degraded at the
first failure and coming back only after a ping, ten SCRIPT LOADs and the re-reads all
succeeded in a row left a replica degraded for good. A run of failures with no answer for a
while says "Redis is away" at any load, and a single answered probe says "it is back".
A Redis that fails most calls yet answers some keeps the replica shared: each failing call
then costs its request up to ``redis.timeout_ms`` before a local decision.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from router.errors import StoreError
from router.state.store import Store

log = logging.getLogger("router.degraded")

FIRST_PROBE_S = 0.05
MAX_BACKOFF_S = 5.0
CALM_S = 10.0
"""Shared for this long, the next episode probes quickly again; sooner, the probes keep
backing off (a Redis that fails again right after each recovery is probed less often)."""


class SharedMode:
    """The replica's mode, its history, and the recovery loop."""

    def __init__(self, store: Store, degrade_after_s: float = 0.5) -> None:
        self.store = store
        self.degrade_after_s = degrade_after_s
        self.degraded = False
        self.reason = ""
        self.since = 0.0
        self.episodes = 0
        """How many times the replica went degraded."""
        self.degraded_s = 0.0
        """Seconds spent degraded in finished episodes."""
        self.on_recovery: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._failing_since = 0.0
        self._answered = -1
        """``store.answered`` when the current run of failures began (-1: no run)."""
        self._probe_s = FIRST_PROBE_S
        self._recovered_at = -CALM_S
        self._stopped = False

    def enter(self, exc: StoreError) -> None:
        """Count one failed Redis call; go degraded once calls have failed for
        ``degrade_after_s`` with none answered in between."""
        if self.degraded or self.store.embedded:
            return
        now = time.monotonic()
        if self.store.answered != self._answered:  # answered since the last failure: a new run
            self._answered, self._failing_since = self.store.answered, now
        if now - self._failing_since >= self.degrade_after_s:
            self.degrade(exc)

    def degrade(self, exc: StoreError) -> None:
        """Go degraded now (at start-up without Redis, or when the failures add up)."""
        if self.degraded or self.store.embedded:
            return
        self.degraded, self.reason, self.since = True, str(exc), time.monotonic()
        self.episodes += 1
        if self.since - self._recovered_at >= CALM_S:
            self._probe_s = FIRST_PROBE_S
        log.warning(
            "shared state unreachable: serving from local state (degraded)",
            extra={"fields": {"reason": self.reason}},
        )
        if not self._stopped:  # shutting down: a release failing now starts nothing
            self._task = asyncio.create_task(self._recover(), name="store-recovery")

    def seconds(self) -> float:
        """Total seconds spent degraded, the current episode included."""
        current = time.monotonic() - self.since if self.degraded else 0.0
        return self.degraded_s + current

    async def stop(self) -> None:
        """Stop the recovery loop, if one runs (and start no other)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(self._probe_s * random.uniform(0.5, 1.0))
            self._probe_s = min(self._probe_s * 2, MAX_BACKOFF_S)
            try:
                await self.store.time_ms()  # one probe, on the scripts' own connection
            except StoreError:
                continue
            break
        self._recovered_at = time.monotonic()
        spent = self._recovered_at - self.since
        self.degraded_s += spent
        self.degraded, self._answered = False, -1
        log.warning(
            "shared state reachable again: back to shared decisions",
            extra={"fields": {"degraded_s": round(spent, 3)}},
        )
        # scripts need no reload: a script Redis lacks is sent in full on first use
        for hook in self.on_recovery:
            try:
                await hook()
            except StoreError as exc:
                self.enter(exc)
