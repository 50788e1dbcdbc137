"""Waiting is visible: who waits for each route, per tenant and priority, cluster-wide, in
``read_state``, ``routerctl state`` (table and JSON), ``GET /admin/state`` and the
``router_queue_waiting`` gauge. The tickets are written by hand, some of them expired (a dead
waiter's, which no longer counts), so that what is shown is exactly what Redis holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from router.config import parse_config
from router.state.cluster import QueueState, WaitingState, read_state
from router.state.keys import Keys
from router.state.store import Store
from tests.helpers import (
    ADMIN_TOKEN,
    Cluster,
    Mock,
    ctl,
    start_gateway,
    wait_until,
)

KEYS = Keys("rc", "default")
TICKETS = {  # member '<id>|<tenant>|<priority>' -> seconds to its expiry (< 0: expired)
    "host-1-abc:q1|team-a|0": 60,
    "host-1-abc:q2|team-a|0": 60,
    "host-2-def:q1|team-a|1": 60,
    "host-2-def:q2|team-b|0": 60,
    "host-2-def:q3|team-c|-1": 60,
    "host-2-def:q4|team-b|0": -1,
    "host-gone:q7|urgent|5": -1,
}
WAITING = [  # what the live tickets above add up to: the band served first, first
    {"tenant": "team-a", "priority": 1, "count": 1},
    {"tenant": "team-a", "priority": 0, "count": 2},
    {"tenant": "team-b", "priority": 0, "count": 1},
    {"tenant": "team-c", "priority": -1, "count": 1},
]
ROUTES = [
    {"model": "chat", "queue_timeout_s": 5, "max_queue": 50,
     "targets": [{"provider": "a", "model": "m"}]},
    {"model": "plain", "targets": [{"provider": "a", "model": "m"}]},
]  # fmt: skip


async def write_tickets(redis_url: str, route: str, tickets: dict[str, int]) -> None:
    """Put ``tickets`` in the route's queue (placed in order) and its expiry zset."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        now_s, now_us = await client.time()
        now_ms = now_s * 1000 + now_us // 1000
        places = {member: place for place, member in enumerate(tickets)}
        expiries = {member: now_ms + s * 1000 for member, s in tickets.items()}
        await client.zadd(KEYS.queue(route), places)
        await client.zadd(KEYS.queue_expiry(route), expiries)
    finally:
        await client.aclose()


async def test_read_state_counts_the_unexpired_tickets_per_tenant_and_priority(
    redis_url: str,
) -> None:
    data = {
        "client_keys": [{"env": "K"}], "redis_url": redis_url,
        "providers": [{"name": "a", "kind": "openai", "base_url": "http://x/v1"}],
        "routes": ROUTES,
    }  # fmt: skip
    cfg = parse_config(data, {"K": "client-key"})
    # a member the router never writes counts as waiting, under no tenant
    await write_tickets(redis_url, "chat", {**TICKETS, "not-a-ticket": 60})
    store = Store.from_config(cfg)
    await store.start(warm=1)
    try:
        state = await read_state(store, cfg)
    finally:
        await store.close()
    chat, plain = state.routes
    assert chat.queue == QueueState(5.0, 50, 6, tuple(WaitingState(**w) for w in WAITING))
    assert plain.queue is None  # it never waits: no queue is read


def waiting_gauge(url: str) -> dict[tuple[str, str, str], float]:
    """``router_queue_waiting`` as a replica exposes it: (route, tenant, priority) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.labels["route"], s.labels["tenant"], s.labels["priority"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "router_queue_waiting"
    }


def queue_of(state: dict[str, Any], route: str) -> Any:
    return next(r["queue"] for r in state["routes"] if r["model"] == route)


def test_routerctl_admin_api_and_gauge_show_who_waits(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = start_gateway(cluster, tmp_path, redis_url, [Mock("a")], ROUTES, replicas=2)
    asyncio.run(write_tickets(redis_url, "chat", TICKETS))

    cli = json.loads(ctl(gw, "state", "--json"))
    expected = {"timeout_s": 5.0, "max_queue": 50, "waiting": 5, "by_tenant": WAITING}
    assert queue_of(cli, "chat") == expected
    assert queue_of(cli, "plain") is None
    assert len(cli["replicas"]) == 2  # the replica records still follow the queues
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    api = httpx.get(f"{gw.urls[1]}/admin/state", headers=headers, timeout=10).json()
    assert queue_of(api, "chat") == expected

    table = ctl(gw, "state").splitlines()
    title = next(i for i, line in enumerate(table) if "route chat: waiting 5/50" in line)
    rows = [line.split()[1:6:2] for line in table[title + 4 : title + 8]]
    assert rows == [[w["tenant"], str(w["priority"]), str(w["count"])] for w in WAITING]
    assert not any("route plain:" in line for line in table)

    gauge = {("chat", w["tenant"], str(w["priority"])): w["count"] for w in WAITING}
    # cluster-wide: every replica reports the whole queue, whoever's waiters hold it
    wait_until(lambda: all(waiting_gauge(u) == gauge for u in gw.urls), 15, "the gauges")

    asyncio.run(write_tickets(redis_url, "chat", {m: -1 for m in TICKETS}))  # every waiter gone
    assert queue_of(json.loads(ctl(gw, "state", "--json")), "chat")["waiting"] == 0
    assert "route chat: waiting 0/50" in ctl(gw, "state")
    wait_until(lambda: waiting_gauge(gw.urls[0]) == {}, 15, "the gauge to empty")
