"""In-flight counts never leak: a killed replica's leases expire within the TTL, a live
replica's long requests keep theirs, and every request ends with its lease released."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import httpx
import redis

from tests.helpers import Cluster, Mock, auth, start_gateway, wait_until

LEASES = "rc:{default}:provider:slow:leases"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def in_flight(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(r.zcount(LEASES, f"({sec * 1000 + usec // 1000}", "+inf"))


def background_requests(url: str, n: int, timeout: float) -> list[threading.Thread]:
    def one() -> None:
        # the replica may be killed under this request: that is the test
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth(), timeout=timeout)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_sigkilled_replica_stops_counting_within_the_ttl(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mocks = [Mock("slow", "--latency-ms", "20000")]
    routes = [{"model": "chat", "targets": [{"provider": "slow", "model": "m"}]}]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=2, lease_ttl_s=2)
    r = redis.Redis(port=redis_port)
    background_requests(gw.urls[0], 4, timeout=30)
    background_requests(gw.urls[1], 2, timeout=30)
    wait_until(lambda: in_flight(r) == 6, 10, "six leases in flight")

    victim, _ = gw.replicas[0]
    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: in_flight(r) == 2, 10, "the killed replica's leases to expire")
    expired_after = time.monotonic() - killed_at
    print(f"leases of the SIGKILLed replica gone after {expired_after:.2f}s (TTL 2s)")
    assert expired_after < 2 + 1.5  # the TTL, plus polling slack on a busy machine
    # the survivor's leases are renewed: they must stay counted for several TTLs
    until = time.monotonic() + 5
    while time.monotonic() < until:
        assert in_flight(r) == 2
        time.sleep(0.25)
    for proc, _ in gw.replicas[1:]:
        proc.kill()  # don't wait for its 20 s requests to drain at teardown


def test_every_finished_request_releases_its_lease(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mocks = [Mock("slow", "--latency-ms", "30", "--chunk-interval-ms", "2")]
    routes = [{"model": "chat", "targets": [{"provider": "slow", "model": "m"}]}]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=1)
    r = redis.Redis(port=redis_port)

    async def traffic() -> None:
        async with httpx.AsyncClient(headers=auth(), timeout=10) as c:
            url = f"{gw.urls[0]}/v1/chat/completions"
            whole = [c.post(url, json=CHAT) for _ in range(30)]
            streamed = [c.post(url, json={**CHAT, "stream": True}) for _ in range(30)]
            await asyncio.gather(*whole, *streamed)
            # clients that give up mid-stream
            for _ in range(10):
                async with c.stream("POST", url, json={**CHAT, "stream": True}) as resp:
                    async for _chunk in resp.aiter_bytes():
                        break

    asyncio.run(traffic())
    wait_until(lambda: in_flight(r) == 0, 10, "every lease to be released")
    assert r.zcard(LEASES) == 0
