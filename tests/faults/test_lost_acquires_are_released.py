"""An acquire whose answer never came (it timed out, or its caller was cancelled) may still
run in Redis: its lease is released once Redis answers, not left counted for the lease TTL.

The TTL here is a minute, so only the release can bring the count back to zero in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from router.config import load_config
from router.replica.dispatch import Operation
from router.replica.gateway import Gateway as Replica
from tests.faults.proxy import Proxy, ProxyPool
from tests.faults.support import (
    CHAT,
    Load,
    RedisServer,
    counter,
    in_flight,
    leases,
    start,
    status,
)
from tests.helpers import ENV, Cluster, Gateway, Mock, start_gateway, wait_until

LEASE_TTL_S = 60
PAUSE_S = 1.0
REFUSED_FOR_S = 0.5
"""Requests may meet leases lost in the pause this long after it."""
RELEASED_WITHIN_S = 5.0
"""Far below the TTL: the leases must be released, not expire."""
ACQUIRE_SHA = (
    hashlib.sha1(resources.files("router.state").joinpath("lua", "acquire.lua").read_bytes())
    .hexdigest()
    .encode()
)
ROUTE: dict[str, Any] = {"model": "chat", "targets": [{"provider": "a", "model": "m"}]}


@pytest.mark.slow
@pytest.mark.parametrize("pause_s", [0.3, 1.0])
def test_acquires_that_timed_out_while_redis_was_paused_are_released(
    cluster: Cluster, tmp_path: Path, own_redis: RedisServer, pause_s: float
) -> None:
    mock = Mock("a", "--latency-ms", "20", limits={"max_in_flight": 4})
    gw = start(cluster, tmp_path, own_redis.url, [mock], [ROUTE], replicas=1,
               lease_ttl_s=LEASE_TTL_S)  # fmt: skip
    r = own_redis.client()
    with Load(gw.urls, workers=4, max_requests=4000, max_seconds=60) as load:
        load.wait_for_more(20, 10, "traffic")
        own_redis.pause()
        paused_at = time.monotonic()
        n = load.count() + 3
        try:
            wait_until(lambda: time.monotonic() - paused_at >= pause_s and load.count() >= n,
                       10, "traffic while Redis is paused")  # fmt: skip
        finally:
            own_redis.resume()
        resumed_at = time.monotonic()
        wait_until(lambda: status(gw.urls[0]) == "ready", 20, "the replica back on Redis")
        load.wait_for_more(50, 10, "traffic after the pause")
    # A lease taken on SIGCONT for a caller that had just given up counts until the replica
    # releases it, a round trip later: a request meeting the limit in that moment is
    # refused (429). Left for the TTL, as before, they refused requests for a minute.
    assert all(s.status in (200, 429) for s in load.samples), load.samples
    refused = [s for s in load.samples if s.status == 429]
    print(
        f"\n{len(refused)} of {len(load.samples)} requests refused, the last "
        f"{max((s.started - resumed_at for s in refused), default=0):.2f}s after SIGCONT"
    )
    assert all(s.started < resumed_at + REFUSED_FOR_S for s in refused), refused
    started = time.monotonic()
    wait_until(lambda: in_flight(r, "a") == 0, RELEASED_WITHIN_S, "no lease left in flight")
    # On SIGCONT Redis runs the acquires that waited in its sockets: those whose caller has
    # given up run past their deadline and lease nothing; one that leased for a caller gone
    # meanwhile is released as "lost".
    lost = counter(r, "a", "lost")
    took = time.monotonic() - started
    print(f"{pause_s:g}s pause: no lease counted {took:.2f}s after the load stopped "
          f"(TTL {LEASE_TTL_S}s); {lost} released as lost")  # fmt: skip
    assert leases(r, "a") == 0


async def cancel_during_acquire(gw: Gateway, redis: RedisServer, proxy: Proxy) -> None:
    """In a replica's process: cancel a request while its acquire sits in a paused Redis
    (what a client that leaves does to its request), then resume Redis and wait until the
    lease the acquire took there is gone."""
    cfg = load_config(gw.config, dict(ENV))
    replica = Replica(cfg)
    await replica.start()
    r = redis.client()
    try:
        proxy.capture()
        redis.pause()
        try:
            serve = asyncio.create_task(
                replica.dispatcher.serve(Operation.CHAT, cfg.routes[0], dict(CHAT), "gone")
            )
            # the acquire went through the proxy: it waits in the paused Redis's socket
            await until(lambda: ACQUIRE_SHA in proxy.captured(), 5, "the acquire sent")
            serve.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serve
        finally:
            redis.resume()
        await until(lambda: leases(r, "a") == 1 or counter(r, "a", "lost"), 5, "it to run")
        await until(lambda: leases(r, "a") == 0, RELEASED_WITHIN_S, "its lease released")
    finally:
        await replica.stop()


async def until(cond: Callable[[], Any], within: float, what: str) -> None:
    """``wait_until`` for a test whose replica runs on this event loop (short blocking
    conditions are fine: they only delay the replica a little)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.slow
def test_an_acquire_whose_caller_left_is_released(
    cluster: Cluster, tmp_path: Path, own_redis: RedisServer, proxy_factory: ProxyPool
) -> None:
    proxy = proxy_factory(own_redis.port)
    # a long store timeout: the acquire still waits on Redis when its caller leaves
    gw = start_gateway(
        cluster, tmp_path, f"redis://127.0.0.1:{proxy.port}/0", [Mock("a")], [ROUTE],
        replicas=0, lease_ttl_s=LEASE_TTL_S, redis={"timeout_ms": 5000},
    )  # fmt: skip
    asyncio.run(cancel_during_acquire(gw, own_redis, proxy))
    r = own_redis.client()
    assert counter(r, "a", "lost") == 1
    assert in_flight(r, "a") == 0
