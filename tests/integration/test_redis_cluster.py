"""Two replicas on ``redis+cluster://``: three primaries and three replicas as real
processes. Round robin stays global and an RPM limit exact; then the primary owning the
pool's slot is failed over, planned (``CLUSTER FAILOVER`` on its replica) and unplanned
(SIGKILL), under traffic: no 5xx, counting exact again after. The figures are printed."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from redis.exceptions import RedisError

from router.config import load_config
from router.errors import StoreError
from router.state.keys import Keys
from router.state.store import Store
from tests.helpers import (
    ENV,
    Cluster,
    Gateway,
    Mock,
    async_wait_until,
    redis_server_binary,
    wait_until,
    write_config,
)
from tests.topologies import (
    ClusterSet,
    Traffic,
    exact_rpm,
    global_round_robin,
    healthd_leads_and_publishes,
    start_healthd,
    state,
    status,
    tenant_key_on_both_replicas,
    topology_gateway,
)

SLOT_KEY = Keys("rc", "default").waiting()
"""A key in the pool's slot: the node owning it runs every script."""


def failover(gw: Gateway, nodes: ClusterSet, kill: bool) -> dict[str, float | int]:
    """Move the pool's slot to the owner's replica under traffic; the episode's figures."""
    owner = nodes.owner(SLOT_KEY)
    assert owner is not None
    successor = nodes.replica_of(owner)
    traffic = Traffic(gw)
    traffic.start()
    wait_until(lambda: traffic.served() >= 10, 10, "traffic to flow")
    started = time.monotonic()
    if kill:
        nodes.nodes[owner].kill()
    else:
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        subprocess.run(
            [cli, "-p", str(successor), "CLUSTER", "FAILOVER"],
            check=True,
            timeout=10,
            capture_output=True,
        )
    wait_until(lambda: nodes.owner(SLOT_KEY) == successor, 30, "the slot's new owner")
    moved = time.monotonic()
    wait_until(lambda: all(status(u) == "ready" for u in gw.urls), 30, "both replicas ready")
    back = time.monotonic()
    fives = sum(traffic.end().values())
    assert fives == 0, traffic.statuses
    return {
        "moved_ms": round(1000 * (moved - started)),
        "ready_ms": round(1000 * (back - started)),
        "requests": traffic.served(),
        "ok": traffic.statuses[200],
        "5xx": fives,
    }


def test_cluster_failovers_under_traffic(
    cluster: Cluster, tmp_path: Path, nodes: ClusterSet
) -> None:
    gw = topology_gateway(cluster, tmp_path, nodes.url)
    counts = global_round_robin(gw)
    before = exact_rpm(gw, "limited", "r1")
    start_healthd(cluster, gw.config)
    healthd_leads_and_publishes(gw)
    tenant_key_on_both_replicas(gw, "team-before")

    planned = failover(gw, nodes, kill=False)
    unplanned = failover(gw, nodes, kill=True)

    healthd_leads_and_publishes(gw)  # the lease, the probes and pub/sub survived
    tenant_key_on_both_replicas(gw, "team-after")
    after = exact_rpm(gw, "limited-after", "r2")
    assert len(state(gw)["providers"]) == 5
    print(
        f"\ncluster: round robin {counts}; rpm before {dict(before)} after {dict(after)};"
        f" planned failover {planned}; SIGKILL of the slot's primary {unplanned}"
    )


async def test_a_subscription_whose_node_dies_comes_back_on_another(
    tmp_path: Path, nodes: ClusterSet
) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    path = write_config(tmp_path / "r.yaml", nodes.url, [Mock("a")], routes)
    store = Store.from_config(load_config(path, dict(ENV)))
    await store.start(warm=1)
    try:
        sub = await store.subscribe("chan")
        port = sub._pubsub.connection.port
        nodes.nodes[port].kill()

        async def lost() -> bool:  # redis-py retries the dead node a few times first
            try:
                await sub.next(within=0.5)
            except StoreError:
                return True
            return False

        await async_wait_until(lost, 30, "the subscription to fail")
        await sub.close()
        sub = await store.subscribe("chan")  # the next known node
        assert sub._pubsub.connection.port != port

        async def heard() -> bool:
            with contextlib.suppress(RedisError):  # the cluster may be failing over
                await store.client.publish("chan", b"hello")
            return await sub.next(within=0.5) == b"hello"

        await async_wait_until(heard, 30, "a message on the new node")
        await sub.close()
    finally:
        await store.close()
