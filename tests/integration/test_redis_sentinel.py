"""Two replicas on ``redis+sentinel://``: a primary, its replica and three sentinels (quorum
2) as real processes. Round robin stays global, an RPM limit exact; then the primary is
killed (SIGKILL) under traffic: the replicas ride the outage out degraded, find the promoted
replica through the sentinels, and count exactly again. The figures are printed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.config import load_config
from router.state.store import Store
from tests.helpers import ENV, Cluster, Mock, ctl, wait_until, write_config
from tests.topologies import (
    PASSWORD,
    SentinelSet,
    Traffic,
    exact_rpm,
    global_round_robin,
    healthd_leads_and_publishes,
    sentinel_set,
    start_healthd,
    state,
    status,
    tenant_key_on_both_replicas,
    topology_gateway,
)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    d = tmp_path / "sentinel"
    d.mkdir()
    with sentinel_set(d) as s:
        yield s


def test_sentinel_failover_under_traffic(
    cluster: Cluster, tmp_path: Path, sentinels: SentinelSet
) -> None:
    gw = topology_gateway(cluster, tmp_path, sentinels.url)
    counts = global_round_robin(gw)
    before = exact_rpm(gw, "limited", "r1")
    start_healthd(cluster, gw.config)
    healthd_leads_and_publishes(gw)
    tenant_key_on_both_replicas(gw, "team-before")

    traffic = Traffic(gw)
    traffic.start()
    wait_until(lambda: traffic.served() >= 10, 10, "traffic to flow")
    killed = time.monotonic()
    sentinels.primary.kill()
    new = ("127.0.0.1", sentinels.replica_port)
    wait_until(lambda: new in sentinels.primary_addresses(), 30, "the sentinels' failover")
    promoted = time.monotonic()
    wait_until(
        lambda: all(status(u) == "ready" for u in gw.urls), 30, "both replicas back on Redis"
    )
    back = time.monotonic()
    # a one-shot client (routerctl) asks any sentinel: wait until all of them know
    wait_until(lambda: sentinels.primary_addresses() == {new}, 30, "every sentinel's view")
    fives = traffic.end()
    assert fives == {}, traffic.statuses
    degraded = [httpx.get(f"{u}/readyz", timeout=2).json() for u in gw.urls]

    healthd_leads_and_publishes(gw)  # the lease, the probes and pub/sub survived
    tenant_key_on_both_replicas(gw, "team-after")
    after = exact_rpm(gw, "limited-after", "r2")
    assert len(state(gw)["providers"]) == 5
    printed = [ctl(gw, "state"), *(proc.output() for proc in cluster.procs)]  # healthd too
    assert not any(PASSWORD in text for text in printed)

    print(
        f"\nsentinel: round robin {counts}; rpm before {dict(before)} after {dict(after)};"
        f" failover by the sentinels {1000 * (promoted - killed):.0f} ms;"
        f" kill to both replicas ready {1000 * (back - killed):.0f} ms;"
        f" replicas' degraded_s {[d['degraded_s'] for d in degraded]};"
        f" traffic {dict(traffic.statuses)} (5xx: {sum(fives.values())})"
    )


async def test_a_burst_past_the_pool_waits_and_a_subscription_hears_the_primary(
    tmp_path: Path, sentinels: SentinelSet
) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    redis = {"pool_size": 1, "timeout_ms": 500}
    path = write_config(tmp_path / "r.yaml", sentinels.url, [Mock("a")], routes, redis=redis)
    cfg = load_config(path, dict(ENV))
    store = Store.from_config(cfg)
    await store.start(warm=1)
    try:
        # one pooled connection, fifty callers: they wait for it (no "Too many connections")
        await asyncio.gather(*(store.ping() for _ in range(50)))
        sub = await store.subscribe("chan")
        await store.client.publish("chan", b"hello")
        heard = [await sub.next(within=1) for _ in range(2)]  # the first: the subscribe ack
        assert b"hello" in heard
        await sub.close()
    finally:
        await store.close()
