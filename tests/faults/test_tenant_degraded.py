"""With Redis away, each replica holds a tenant to its share of the tenant's limits: the
limit divided by the live replicas it last saw (as providers' limits are shared)."""

from __future__ import annotations

import asyncio
import itertools
from functools import partial
from pathlib import Path

import httpx

from tests.faults.support import RedisServer, readyz, start, status
from tests.helpers import Cluster, Mock, wait_until

KEY = "team-a-key-0123456789"


def test_tenant_rpm_is_shared_out_while_degraded(
    cluster: Cluster, tmp_path: Path, own_redis: RedisServer
) -> None:
    tenants = [{"name": "team-a", "keys": [{"env": "TEAM_A_KEY"}], "limits": {"rpm": 20}}]
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    gw = start(cluster, tmp_path, own_redis.url, [Mock("a")], routes, replicas=0,
               tenants=tenants, replica={"heartbeat_s": 0.2})  # fmt: skip
    for _ in range(2):
        gw.add_replica({"REDIS_URL": "", "TEAM_A_KEY": KEY})

    def sees_two(url: str) -> bool:
        return readyz(url)["replicas_seen"] == 2

    for url in gw.urls:
        wait_until(partial(sees_two, url), 10, f"{url} to see both replicas")
    own_redis.kill()
    for url in gw.urls:
        wait_until(partial(lambda u: status(u) == "degraded", url), 10, f"{url} degraded")

    async def fire() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        urls = itertools.cycle(gw.urls)
        async with httpx.AsyncClient(headers=headers, timeout=30) as c:
            return await asyncio.gather(
                *(c.post(f"{next(urls)}/v1/chat/completions", json=body) for _ in range(40))
            )

    answers = asyncio.run(fire())
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) == 20  # 10 per replica: its share of 20
    assert len(refused) == 20
    assert {r.json()["error"]["code"] for r in refused} == {"tenant_rpm_exceeded"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)

    # Redis back (restarted empty): what the replicas served alone reaches the usage records
    own_redis.start()
    for url in gw.urls:
        wait_until(partial(lambda u: status(u) == "ready", url), 15, f"{url} back to shared")
    r = own_redis.client()

    def charged() -> dict[str, int]:
        days = r.keys("rc:{default}:usage:day:*")
        return {k: int(v) for k, v in r.hgetall(days[0]).items()} if days else {}

    wait_until(lambda: charged().get("team-a|chat|a|req") == 20, 10, "the degraded usage")
    assert charged()["team-a|chat|a|out"] == 20 * 16  # the mock's 16 tokens each
    assert r.exists("rc:{default}:tenant:team-a:live")  # its spend too (no price here: zero)
