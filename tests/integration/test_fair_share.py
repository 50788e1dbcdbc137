"""Fair share of a saturated route, cluster-wide: two replicas on a real Redis, a provider
held at its in-flight limit (2, answers of 200 ms), tenants flooding from different replicas.
Admissions are shared by weight within a priority band, a light tenant is not held behind
the flood, a higher band goes first, and the provider never answers 429."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import Cluster, Gateway, Mock, start_gateway, wait_until

LATENCY_S = 0.2
MAX_IN_FLIGHT = 2
FLOOD_S = 30.0
KEYS = {name: f"{name}-key-0123456789" for name in ("heavy", "batch", "light", "urgent")}
ENV = {f"{name.upper()}_KEY": key for name, key in KEYS.items()}


def gateway(cluster: Cluster, tmp: Path, redis_url: str, **weights: int) -> Gateway:
    mock = Mock("a", "--latency-ms", str(LATENCY_S * 1000), limits={"max_in_flight": 2})
    routes = [
        {"model": "chat", "queue_timeout_s": 60, "targets": [{"provider": "a", "model": "m"}]}
    ]
    tenants: list[dict[str, Any]] = [
        {"name": name, "keys": [{"env": f"{name.upper()}_KEY"}], "weight": weights.get(name, 1)}
        for name in ("heavy", "batch", "light")
    ]
    tenants.append({"name": "urgent", "keys": [{"env": "URGENT_KEY"}], "priority": 1})
    gw = start_gateway(cluster, tmp, redis_url, [mock], routes, replicas=0, tenants=tenants,
                       log={"level": "INFO", "decisions": "OFF", "access": "OFF"})  # fmt: skip
    for _ in range(2):
        gw.add_replica(ENV)
    return gw


async def flood(url: str, tenant: str, clients: int, until: float, log: list[Any]) -> None:
    """``clients`` connections of ``tenant`` asking back to back until ``until``."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:

        async def one_client() -> None:
            while time.monotonic() < until:
                sent = time.monotonic()
                try:  # a request still waiting at the end is given up (its ticket leaves)
                    r = await c.post("/v1/chat/completions", json=body, timeout=until - sent)
                except httpx.TimeoutException:
                    return
                log.append((tenant, sent, time.monotonic(), r.status_code))

        await asyncio.gather(*(one_client() for _ in range(clients)))


def shares(log: list[Any], tenants: tuple[str, ...], start: float, end: float) -> dict[str, float]:
    """Each tenant's share of the 200s answered in [start, end]."""
    done = [t for t, _, at, status in log if status == 200 and start <= at <= end and t in tenants]
    return {t: done.count(t) / len(done) for t in tenants}


def run_flood(gw: Gateway, light: bool) -> list[Any]:
    log: list[Any] = []

    async def main() -> None:
        until = time.monotonic() + FLOOD_S
        jobs = [
            flood(gw.urls[0], "heavy", 8, until, log),
            flood(gw.urls[1], "batch", 8, until, log),
        ]
        if light:
            jobs.append(light_user(gw.urls, until, log))
        await asyncio.gather(*jobs)

    asyncio.run(main())
    return log


async def light_user(urls: list[str], until: float, log: list[Any]) -> None:
    """One request every 3 s, alternating the replicas."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEYS['light']}"}
    k = 0
    async with httpx.AsyncClient(headers=headers, timeout=120) as c:
        await asyncio.sleep(2.0)  # the flood first fills the queue
        while time.monotonic() < until - 1:
            sent = time.monotonic()
            r = await c.post(f"{urls[k % 2]}/v1/chat/completions", json=body)
            log.append(("light", sent, time.monotonic(), r.status_code))
            k += 1
            await asyncio.sleep(max(0.0, sent + 3.0 - time.monotonic()))


def test_equal_weights_share_equally_and_a_light_tenant_does_not_wait(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    r = redis.Redis.from_url(redis_url)
    r.config_resetstat()
    log = run_flood(gw, light=True)
    calls = r.info("commandstats")["cmdstat_evalsha"]["calls"]
    r.close()
    start = min(s for _, s, _, _ in log) + 3  # past the first fill
    end = max(at for _, _, at, _ in log) - 1
    got = shares(log, ("heavy", "batch"), start, end)
    served = sum(1 for _, _, at, st in log if st == 200 and start <= at <= end)
    rate = served / (end - start)
    light = [at - s - LATENCY_S for t, s, at, st in log if t == "light" and st == 200]
    waits = sorted(light)
    p95 = waits[max(0, int(len(waits) * 0.95) - 1)]
    stats = gw.mocks["a"].stats()
    print(f"\nshares {got}, {rate:.2f} admitted/s (limit {MAX_IN_FLIGHT / LATENCY_S:.0f}), "
          f"light waits p50 {statistics.median(waits):.3f} s p95 {p95:.3f} s over {len(waits)}, "
          f"provider 429s {stats['rate_limited']}, script calls per admitted request "
          f"{calls / sum(1 for *_, st in log if st == 200):.1f}")  # fmt: skip
    assert abs(got["heavy"] - 0.5) <= 0.05
    assert all(st == 200 for *_, st in log)
    assert stats["rate_limited"] == 0
    # the queue keeps the provider busy: each admission follows a release by one pub/sub
    # wake-up and one acquire; on a shared 2-core CI machine that turn-around has cost up to
    # 6 % of the 200 ms slots (9.47 admitted/s of 10), so the bound is 90 %, not a speed
    assert rate >= 0.9 * MAX_IN_FLIGHT / LATENCY_S
    assert len(waits) >= 8
    assert p95 < 1.0


def test_weights_three_to_one(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    gw = gateway(cluster, tmp_path, redis_url, heavy=3, batch=1)
    log = run_flood(gw, light=False)
    start = min(s for _, s, _, _ in log) + 3
    end = max(at for _, _, at, _ in log) - 1
    got = shares(log, ("heavy", "batch"), start, end)
    print(f"\nweights 3:1 -> shares {got}")
    assert abs(got["heavy"] - 0.75) <= 0.05
    assert gw.mocks["a"].stats()["rate_limited"] == 0


def test_a_higher_band_goes_first(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    """While two priority-0 tenants flood, a priority-1 tenant's burst is admitted before any
    waiting priority-0 request (those in flight finish; none admitted after the burst came).
    Admission order is read where it shows without the answers' jitter: the provider's
    arrivals (one host, one monotonic clock)."""
    gw = gateway(cluster, tmp_path, redis_url)
    log: list[Any] = []

    async def main() -> float:
        until = time.monotonic() + 12
        flooding = asyncio.gather(
            flood(gw.urls[0], "heavy", 8, until, log),
            flood(gw.urls[1], "batch", 8, until, log),
        )
        body = {"model": "chat", "messages": [{"role": "user", "content": "now"}]}
        headers = {"Authorization": f"Bearer {KEYS['urgent']}"}
        async with httpx.AsyncClient(headers=headers, timeout=60) as c:
            # six connections opened first, so the burst reaches both replicas at once
            warm = [c.get(f"{gw.urls[k % 2]}/v1/models") for k in range(6)]
            assert all(r.status_code == 200 for r in await asyncio.gather(*warm))
            await asyncio.sleep(4)  # the queue is full of priority-0 tickets

            async def one(k: int) -> None:
                r = await c.post(f"{gw.urls[k % 2]}/v1/chat/completions", json=body)
                log.append(("urgent", burst_at, time.monotonic(), r.status_code))

            burst_at = time.monotonic()
            await asyncio.gather(*(one(k) for k in range(6)))
        await flooding
        return burst_at

    burst_at = asyncio.run(main())
    urgent_done = max(at for t, _, at, st in log if t == "urgent" and st == 200)
    assert sum(1 for t, *_, st in log if t == "urgent" and st == 200) == 6
    arrivals = gw.mocks["a"].stats()["arrivals"]
    urgent = [at for at, text in arrivals if text == "now"]
    assert len(urgent) == 6
    # a priority-0 request admitted once the burst is queued (within 100 ms of sending it, over
    # open connections) reaches the provider before the burst's last request: none may
    between = [at for at, text in arrivals if text == "hi" and burst_at + 0.1 < at < max(urgent)]
    print(f"\nburst of 6 at priority 1 done {urgent_done - burst_at:.2f} s after it came, "
          f"at the provider {min(urgent) - burst_at:.3f}..{max(urgent) - burst_at:.3f} s; "
          f"priority-0 arrivals in between: {len(between)}")  # fmt: skip
    assert between == []
    # 6 requests, 2 at a time, 200 ms each: about 0.6 s
    assert urgent_done - burst_at < 1.5


@pytest.mark.timeout(240)
def test_an_rpm_limit_is_shared_the_same_way(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """RPM 60 at the provider: the first window fills at once, then its seconds free as they
    leave it (60 s later) and the waiting tickets take them in fair order.

    The second window frees all at once (the first was used up within a second), so the
    tenants keep more requests waiting than it holds (40 clients each): the queue never runs
    dry and every admission of the second window is the queue's. With fewer clients the queue
    empties mid-burst, the rest of the window goes to whoever asks first (no saturation, no
    fair order to speak of) and the shares measure the two replicas' speed instead."""
    mock = Mock("a", "--rpm", "60", limits={"rpm": 60})
    routes = [
        {"model": "chat", "queue_timeout_s": 90, "targets": [{"provider": "a", "model": "m"}]}
    ]
    tenants = [
        {"name": name, "keys": [{"env": f"{name.upper()}_KEY"}]} for name in ("heavy", "batch")
    ]
    gw = start_gateway(cluster, tmp_path, redis_url, [mock], routes, replicas=0, tenants=tenants,
                       log={"level": "INFO", "decisions": "OFF", "access": "OFF"})  # fmt: skip
    for _ in range(2):
        gw.add_replica(ENV)
    log: list[Any] = []

    async def main() -> None:
        until = time.monotonic() + 68
        await asyncio.gather(
            flood(gw.urls[0], "heavy", 40, until, log), flood(gw.urls[1], "batch", 40, until, log)
        )

    asyncio.run(main())
    r = redis.Redis.from_url(redis_url)
    try:  # the 80 clients left at once: their requests gave up their places, none is served
        wait_until(lambda: int(r.get("rc:{default}:waiting") or 0) == 0, 5, "no ticket left")
    finally:
        r.close()
    ok = sorted((at, t) for t, _, at, st in log if st == 200)
    second = [t for _, t in ok[60:]]  # the window's seconds freed again, taken from the queue
    share = second.count("heavy") / len(second)
    stats = gw.mocks["a"].stats()
    print(
        f"\nrpm 60: {len(ok)} admitted in 68 s (two windows: 120), after the first window "
        f"{len(second)} with heavy's share {share:.2f}; provider 429s {stats['rate_limited']}"
    )
    assert stats["rate_limited"] == 0
    assert len(ok) >= 0.95 * 120
    assert abs(share - 0.5) <= 0.05


def test_a_waiting_request_whose_client_leaves_gives_up_its_place(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """Clients that leave while their requests wait: the tickets leave the queue at once and
    the provider is never sent what nobody waits for any more."""
    mock = Mock("a", "--latency-ms", "1500", limits={"max_in_flight": 1})
    routes = [
        {"model": "chat", "queue_timeout_s": 30, "targets": [{"provider": "a", "model": "m"}]}
    ]
    tenants = [{"name": "heavy", "keys": [{"env": "HEAVY_KEY"}]}]
    gw = start_gateway(cluster, tmp_path, redis_url, [mock], routes, replicas=0, tenants=tenants)
    gw.add_replica(ENV)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEYS['heavy']}"}
    r = redis.Redis.from_url(redis_url)

    def waiting() -> int:
        return int(r.get("rc:{default}:waiting") or 0)

    async def main() -> int:
        async with httpx.AsyncClient(base_url=gw.urls[0], headers=headers, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await asyncio.to_thread(wait_until, lambda: gw.mocks["a"].stats()["in_flight"] == 1)
            async with httpx.AsyncClient(base_url=gw.urls[0], headers=headers) as leaving:
                waiters = [
                    asyncio.create_task(leaving.post("/v1/chat/completions", json=body))
                    for _ in range(5)
                ]
                await asyncio.to_thread(wait_until, lambda: waiting() == 5, 10, "5 tickets")
                for w in waiters:  # the clients give up: their connections close
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            await asyncio.to_thread(wait_until, lambda: waiting() == 0, 5, "the tickets gone")
            queued = r.zcard("rc:{default}:route:chat:queue")
            assert (await first).status_code == 200
            return queued

    try:
        assert asyncio.run(main()) == 0
        assert gw.mocks["a"].stats()["received"] == 1  # nothing sent for the clients that left
        assert "client_closed_request" in cluster.procs[-1].output()
    finally:
        r.close()


def test_waiting_past_the_queue_timeout_is_429_with_retry_after_from_the_queue(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """A request that waits its queue time out gets 429 with a Retry-After estimated from its
    place in the queue and the route's admission rate, not a constant; its ticket leaves."""
    mock = Mock("a", "--latency-ms", "2000", limits={"max_in_flight": 1})
    targets = [{"provider": "a", "model": "m"}]
    routes = [{"model": "chat", "queue_timeout_s": 1, "targets": targets}]
    tenants = [{"name": "heavy", "keys": [{"env": "HEAVY_KEY"}]}]
    gw = start_gateway(cluster, tmp_path, redis_url, [mock], routes, replicas=0, tenants=tenants)
    gw.add_replica(ENV)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEYS['heavy']}"}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.urls[0], headers=headers, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)  # it holds the one slot for 2 s
            waiting = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(4))
            )
            return [await first, *waiting]

    first, *waited = asyncio.run(main())
    assert first.status_code == 200
    assert [w.status_code for w in waited] == [429] * 4
    assert {w.json()["error"]["code"] for w in waited} == {"saturated"}
    retry = sorted(int(w.headers["retry-after"]) for w in waited)
    print(f"\nqueue timeout: Retry-After {retry}")
    assert all(1 <= x <= 600 for x in retry)
    r = redis.Redis.from_url(redis_url)
    try:  # every ticket left with its request
        assert r.zcard("rc:{default}:route:chat:queue") == 0
        assert int(r.get("rc:{default}:waiting") or 0) == 0
    finally:
        r.close()
