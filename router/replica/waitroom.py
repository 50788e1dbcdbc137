"""Where requests wait for a saturated route: woken by releases on any replica, never polling.

A request that finds no room takes a ticket in the route's queue in Redis (the acquire
script orders tickets by priority band, then fair-queueing finish time) and waits here. A
release on any replica that frees a provider while tickets wait publishes ``p:<provider>``
on ``Keys.freed_channel``; an admission from the queue, or a ticket leaving it, publishes
``r:<route>`` (the next head may be another replica's). Each message wakes this replica's
best-placed waiter of each route it concerns, which looks again (one acquire per replica per
message, not one per waiter). The head also wakes itself when the acquire said a target's
window frees (RPM and TPM limits free with time, not with releases), and every waiter after
``IDLE_LOOK_S`` at the latest, should a message be lost (pub/sub delivers at most once).
Tickets are renewed every third of their TTL while their requests wait; a replica that dies
stops holding the head within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from router.errors import StoreError
from router.replica.background import Subscriber
from router.replica.degraded import SharedMode
from router.state.store import Store

IDLE_LOOK_S = 5.0
"""A waiter that heard nothing looks again after this long (a lost message's worst cost)."""


@dataclass(eq=False)
class _Waiter:
    route: str
    member: str
    place: float
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class WaitRoom(Subscriber):
    """This replica's waiting requests, by route; the subscription that wakes them."""

    name = "wait-room"
    what = "freed"
    logger = "router.waitroom"

    def __init__(self, store: Store, mode: SharedMode, routes_of: dict[str, list[str]]) -> None:
        self.store = store
        self.mode = mode
        self.routes_of = routes_of
        """Provider -> the routes it serves."""
        self._waiters: dict[str, list[_Waiter]] = defaultdict(list)
        self._heard: dict[str, int] = defaultdict(int)
        """Per route, how many messages concerned it: a waiter that was looking (an acquire on
        its way) when one came looks again at once instead of sleeping through it."""

    def heard_of(self, route: str) -> int:
        """How many messages concerned ``route`` so far: take it before an acquire, give it to
        ``wait`` after."""
        return self._heard[route]

    async def wait(self, route: str, member: str, place: float, within: float, since: int) -> None:
        """Wait (at most ``within`` seconds) until this request's turn may have come; at once
        if a message about the route came since ``heard_of`` said ``since``."""
        if self._heard[route] != since:
            return
        w = _Waiter(route, member, place)
        self._waiters[route].append(w)
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that comes
            # with the wake-up (the request's client left just as it was woken)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await w.woken.wait()
        finally:
            self._waiters[route].remove(w)

    def wake(self, route: str) -> None:
        """Wake the best-placed waiter of ``route`` (the one nearest the queue's head: its
        ticket's place, which never changes, unlike its rank)."""
        ws = [w for w in self._waiters.get(route, ()) if not w.woken.is_set()]
        if ws:
            min(ws, key=lambda w: w.place).woken.set()

    def heard(self, data: bytes) -> None:
        """A message: ``p:<provider>`` wakes a waiter of each of its routes, ``r:<route>`` one of
        that route."""
        text = data.decode("utf-8", "replace")
        kind, _, name = text.partition(":")
        routes: Iterable[str] = self.routes_of.get(name, ()) if kind == "p" else (name,)
        for route in routes:
            self._heard[route] += 1
            self.wake(route)

    def tickets(self) -> dict[str, list[str]]:
        """The tickets this replica's waiters hold, per route."""
        return {r: [w.member for w in ws] for r, ws in self._waiters.items() if ws}

    async def run(self) -> None:
        """Follow the freed channel; renew the waiters' tickets."""
        renewer = asyncio.create_task(self._renew_forever(), name="ticket-renewer")
        try:
            await super().run()
        finally:
            renewer.cancel()

    def lost(self) -> None:
        """A message may have been missed: every route's best waiter looks again."""
        for route in list(self._waiters):
            self._heard[route] += 1
            self.wake(route)

    async def _session(self) -> None:
        sub = await self.store.subscribe(self.store.keys.freed_channel())
        try:
            while True:
                data = await sub.next(within=1.0)
                if data is not None:
                    self.heard(data)
        finally:
            await sub.close()

    async def _renew_forever(self) -> None:
        interval = self.store.ticket_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            tickets = self.tickets()
            if not tickets or self.mode.degraded:
                continue
            try:
                await self.store.renew_tickets(tickets)
            except StoreError as exc:
                self.mode.enter(exc)
