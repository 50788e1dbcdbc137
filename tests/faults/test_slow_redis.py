"""A slow Redis, not a dead one: replies that come around the store timeout.

A late reply fails its own call, not the connection and every call behind it; one slow call
does not make a replica degraded; and under replies delayed around the timeout a replica
keeps deciding in Redis (or comes back to it), rather than going degraded for good.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import exceptions as rx

from router.state.muxredis import MuxRedis
from tests.faults.proxy import Proxy, ProxyPool
from tests.faults.support import (
    CHAT,
    Load,
    RedisServer,
    counter,
    in_flight,
    leases,
    readyz,
    scrape,
    start,
    total,
)
from tests.helpers import Gateway, Mock, auth, wait_until

BUSY_MS = 150
BUSY = f"""
local t0 = redis.call('TIME')
repeat local t = redis.call('TIME')
until (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > {BUSY_MS * 1000}
return 1
"""
"""Keeps Redis busy for ``BUSY_MS`` (DEBUG SLEEP is disabled by default since Redis 7)."""
ROUTE: dict[str, Any] = {"model": "chat", "targets": [{"provider": "a", "model": "m"}]}
SLOW_S = 8.0
"""How long Redis stays slow under load."""


async def paced_calls(mux: MuxRedis, n: int, slow_at: int) -> list[tuple[int, Any]]:
    """``n`` PINGs, one every 10 ms, with a slow script sent just before PING ``slow_at``
    (index -1); each call's index and its reply or exception."""
    calls: list[tuple[int, asyncio.Future[Any]]] = []
    for i in range(n):
        if i == slow_at:
            calls.append((-1, asyncio.ensure_future(mux.execute("EVAL", BUSY, 0))))
        calls.append((i, asyncio.ensure_future(mux.execute("PING"))))
        await asyncio.sleep(0.01)  # pacing the calls, not waiting for anything
    results = await asyncio.gather(*(f for _, f in calls), return_exceptions=True)
    return [(i, r) for (i, _), r in zip(calls, results, strict=True)]


async def test_a_late_reply_fails_its_call_not_the_calls_behind_it(
    redis_port: int, proxy_factory: ProxyPool
) -> None:
    # replies take 200 ms on the way back, against a 300 ms timeout: all in time, until the
    # slow script (150 ms in Redis) makes its own reply, and those of the calls right
    # behind it, late. Redis is not silent meanwhile: earlier replies keep arriving.
    proxy = proxy_factory(redis_port)
    proxy.delay(200, direction="down")
    mux = MuxRedis(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.3)
    assert await mux.execute("PING") == b"PONG"
    results = await paced_calls(mux, 80, slow_at=20)
    await mux.close()
    late = [i for i, r in results if isinstance(r, rx.TimeoutError)]
    print(f"\nlate: {late}")
    assert -1 in late
    assert all(i < 30 for i in late), late  # PING 30 went 100 ms after the slow script
    assert [r for i, r in results if i not in late] == [b"PONG"] * (len(results) - len(late))
    assert proxy.stats().accepted == 1  # the connection stayed


def one_replica(cluster: Any, tmp: Path, proxy: Proxy, **extra: Any) -> Gateway:
    return start(cluster, tmp, f"redis://127.0.0.1:{proxy.port}/0", [Mock("a")], [ROUTE],
                 replicas=1, lease_ttl_s=60, **extra)  # fmt: skip


@pytest.mark.slow
def test_one_slow_call_does_not_make_a_replica_degraded(
    cluster: Any, tmp_path: Path, own_redis: RedisServer, proxy_factory: ProxyPool
) -> None:
    proxy = proxy_factory(own_redis.port)
    gw = one_replica(cluster, tmp_path, proxy)
    r = own_redis.client()
    proxy.delay(250, direction="down")  # Redis runs the acquire; its answer comes late
    try:
        got = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=auth(),
                         timeout=10)  # fmt: skip
    finally:
        proxy.delay(0)
    assert got.status_code == 200, got.text  # decided locally
    # the lease the late acquire took in Redis is released as lost, not left for the TTL
    wait_until(lambda: counter(r, "a", "lost") == 1, 5, "the lost lease released")
    assert leases(r, "a") == 0
    ready = readyz(gw.urls[0])
    assert (ready["status"], ready["degraded_episodes"]) == ("ready", 0), ready


def degraded_share(url: str, seconds: float) -> list[bool]:
    """Whether the replica was degraded, read from /metrics (which needs no Redis) every
    0.1 s for ``seconds``."""
    seen = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        seen.append(total(scrape(url), "router_degraded") == 1)
        time.sleep(0.1)  # a sampling period: nothing is waited for
    return seen


def decisions(url: str) -> tuple[float, float]:
    """Decisions made so far: (in Redis, locally)."""
    m = scrape(url)
    name = "router_decision_duration_seconds_count"
    return total(m, name, mode="shared"), total(m, name, mode="local")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("delay_ms", "jitter_ms", "mostly_in_time"),
    [(70, 40, True), (100, 50, False)],
    ids=["replies-30-110ms", "replies-50-150ms"],
)
def test_replies_around_the_timeout_leave_a_replica_deciding_in_redis(
    cluster: Any, tmp_path: Path, own_redis: RedisServer, proxy_factory: ProxyPool,
    delay_ms: int, jitter_ms: int, mostly_in_time: bool,
) -> None:  # fmt: skip
    # Replies delayed around the 100 ms timeout (chunks keep their order, so a reply also
    # waits for the one ahead of it: at 50-150 ms most acquires time out, at 30-110 most
    # are answered in time). Before, the first late reply made the replica degraded, and
    # recovery needed a dozen calls in a row in time: it stayed degraded for good (44 of
    # 45 samples, in both cases).
    proxy = proxy_factory(own_redis.port)
    gw = one_replica(cluster, tmp_path, proxy)
    url = gw.urls[0]
    r = own_redis.client()
    with Load(gw.urls, workers=4, max_requests=20_000, max_seconds=60) as load:
        load.wait_for_more(20, 10, "traffic")
        before = decisions(url)
        proxy.delay(delay_ms, jitter_ms=jitter_ms, direction="down")
        try:
            seen = degraded_share(url, SLOW_S)
            after = decisions(url)
        finally:
            proxy.delay(0)
        load.wait_for_more(20, 10, "traffic after")
    assert all(s.status == 200 for s in load.samples), [s for s in load.samples][:3]
    shared, local = (a - b for a, b in zip(after, before, strict=True))
    settled = seen[len(seen) // 4 :]
    print(f"\nreplies {delay_ms - jitter_ms}-{delay_ms + jitter_ms} ms for {SLOW_S:g}s: "
          f"{shared:.0f} decisions in Redis, {local:.0f} local (after a timeout); degraded "
          f"in {sum(seen)} of {len(seen)} samples")  # fmt: skip
    assert shared > 0
    if mostly_in_time:  # Redis answers most calls in time: the replica stays shared
        assert shared > local
        assert not any(settled), seen
    else:  # most calls time out: it may go degraded for a while, and comes back each time
        assert sum(settled) <= len(settled) / 2, seen
    wait_until(lambda: in_flight(r, "a") == 0, 5, "every lease released")
