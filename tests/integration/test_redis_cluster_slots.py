"""The pool's hash slot on a Redis Cluster: moved to another primary while two replicas
serve (resharding: ``ASK`` and ``TRYAGAIN`` followed, no 5xx, counting exact after), and
two pools on two primaries. The figures are printed."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from redis.cluster import key_slot
from redis.exceptions import TryAgainError

from router.config import load_config
from router.state.keys import Keys
from router.state.store import Store
from tests.helpers import (
    CLIENT_KEY,
    ENV,
    Cluster,
    Gateway,
    Mock,
    ctl,
    start_gateway,
    wait_until,
    write_config,
)
from tests.topologies import (
    ClusterSet,
    Traffic,
    ask,
    errorstats,
    exact_rpm,
    global_round_robin,
    metric,
    migrate_slot,
    node_id,
    primaries,
    state,
    status,
    topology_gateway,
)

SLOT_KEY = Keys("rc", "default").waiting()
"""A key in the pool's slot: every script key shares it."""
FILLER_KEYS = 5000
"""Keys added to the pool's slot before the full-speed migration."""


def reset_counts(gw: Gateway) -> None:
    for m in gw.mocks.values():
        httpx.post(f"{m.url}/stats/reset", timeout=5).raise_for_status()


def episode(
    gw: Gateway, nodes: ClusterSet, source: int, target: int, batch: int, hold: bool
) -> dict[str, Any]:
    """Move the pool's slot from ``source`` to ``target`` under traffic from both replicas
    (``hold``: each batch stays half moved until a script call meets it); the figures."""
    slot = key_slot(SLOT_KEY.encode())
    redirects = [errorstats(p) for p in (source, target)]
    degraded = [metric(u, "router_degraded_seconds_total") for u in gw.urls]
    errors = [metric(u, "router_redis_errors_total") for u in gw.urls]
    traffic = Traffic(gw)
    traffic.start()
    wait_until(lambda: traffic.served() >= 10, 10, "traffic to flow")

    def redirected() -> int:
        return sum(errorstats(source)[k] + errorstats(target)[k] for k in ("ASK", "TRYAGAIN"))

    def between() -> None:  # hold the slot half moved until a script call meets it
        seen = redirected()
        wait_until(lambda: redirected() > seen, 10, "a call to meet the half-moved slot")

    started = time.monotonic()
    during = traffic.served()
    moved = migrate_slot(nodes, slot, source, target, batch, between if hold else None)
    took = time.monotonic() - started
    during = traffic.served() - during
    fives = sum(traffic.end().values())
    assert fives == 0, traffic.statuses
    assert traffic.statuses[200] == traffic.served(), traffic.statuses
    assert nodes.owner(SLOT_KEY) == target
    assert ask(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 0
    assert moved["keys"] > 0
    on_target = ask(target, "CLUSTER", "GETKEYSINSLOT", str(slot), "100000")
    assert on_target  # (some may have expired since, or been deleted by a script)
    assert all(k.startswith("rc:{default}:") for k in on_target)
    after = [errorstats(p) for p in (source, target)]
    seen = {k: after[0][k] - redirects[0][k] + after[1][k] - redirects[1][k] for k in after[0]}
    pairs = zip(gw.urls, degraded, errors, strict=True)
    return {
        **moved, "ms": round(took * 1000), "requests_during": during,
        "requests": traffic.served(), "5xx": fives, **seen,
        "failed_calls": [int(metric(u, "router_redis_errors_total") - e) for u, _, e in pairs],
        "degraded_s": [
            round(metric(u, "router_degraded_seconds_total") - d, 3)
            for u, d in zip(gw.urls, degraded, strict=True)
        ],
    }  # fmt: skip


def test_the_pools_slot_moves_to_another_primary_under_traffic(
    cluster: Cluster, tmp_path: Path, nodes: ClusterSet
) -> None:
    gw = topology_gateway(cluster, tmp_path, nodes.url)
    wait_until(lambda: all(status(u) == "ready" for u in gw.urls), 20, "both replicas ready")
    first = nodes.owner(SLOT_KEY)
    assert first is not None
    second = next(p for p in primaries(nodes) if p != first)
    # a few keys, each batch held half moved until a call meets it
    held = episode(gw, nodes, first, second, batch=3, hold=True)
    assert held["ASK"] + held["TRYAGAIN"] > 0, held  # the traffic met the migration
    # and back at full speed, as redis-cli --cluster reshard does (10 keys a MIGRATE), with
    # the slot holding as many keys as a busy pool's pins and usage make
    with redis.Redis(port=second) as r:
        filler = r.pipeline(transaction=False)
        for i in range(FILLER_KEYS):
            filler.set(f"rc:{{default}}:filler:{i}", "x")
        filler.execute()
    # (moving the scripts' keys first would not help: while the slot migrates, a script call
    # naming a key that exists on neither side, an empty lease set say, gets TRYAGAIN)
    bulk = episode(gw, nodes, second, first, batch=10, hold=False)
    assert bulk["keys"] >= FILLER_KEYS

    reset_counts(gw)
    counts = global_round_robin(gw)
    rpm = exact_rpm(gw, "limited", "r1")
    print(
        f"\nslot {key_slot(SLOT_KEY.encode())}: batches held half moved {held};"
        f" at full speed with {FILLER_KEYS} more keys {bulk};"
        f" after: round robin {counts}, rpm {rpm}"
    )


async def test_a_burst_past_the_pool_waits_for_a_free_connection(
    tmp_path: Path, nodes: ClusterSet
) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    redis = {"pool_size": 2, "timeout_ms": 500}
    path = write_config(tmp_path / "r.yaml", nodes.url, [Mock("a")], routes, redis=redis)
    store = Store.from_config(load_config(path, dict(ENV)))
    await store.start(warm=1)
    try:
        # two connections per node, 300 callers on the pool's node and others: they wait
        # for one (RedisCluster alone fails them with MaxConnectionsError)
        calls = [store.provider_fields("a") for _ in range(100)]
        calls += [store.response_pin(f"resp_{i}") for i in range(100)]
        calls += [store.ping() for _ in range(100)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert store.shard() == (key_slot(SLOT_KEY.encode()), f"127.0.0.1:{nodes.owner(SLOT_KEY)}")
    finally:
        await store.close()


def pools_on_two_primaries(nodes: ClusterSet) -> tuple[str, str]:
    """Two pool names whose hash slots two different primaries own (chosen by their slots)."""
    found: dict[int, str] = {}
    for i in range(100):
        name = f"pool-{i}"
        owner = nodes.owner(Keys("rc", name).waiting())
        assert owner is not None
        found.setdefault(owner, name)
        if len(found) == 2:
            first, second = found.values()
            return first, second
    raise AssertionError("no two pools on two primaries")


def shard_cost(gw: Gateway, port: int, requests: int) -> dict[str, float]:
    """What ``requests`` chat requests (8 at a time) cost the primary on ``port``: its
    scripts' server time (``INFO commandstats``) and its CPU (``INFO cpu``) per request."""

    def cpu() -> float:
        info = ask(port, "INFO", "cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def send(url: str, n: int) -> None:  # one client (keep-alive) per sender
        with openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            for _ in range(n):
                client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )

    senders = 8
    assert ask(port, "CONFIG", "RESETSTAT") == "OK"
    before = cpu()
    started = time.monotonic()
    with ThreadPoolExecutor(senders) as pool:
        done = [
            pool.submit(send, gw.urls[i % len(gw.urls)], requests // senders)
            for i in range(senders)
        ]
        for f in done:
            f.result()  # any failure (no retries) fails the test
    took = time.monotonic() - started
    used = cpu() - before
    requests = senders * (requests // senders)
    stats = ask(port, "INFO", "commandstats")
    scripts = {k: v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")}
    calls = sum(int(v["calls"]) for v in scripts.values())
    usec = sum(int(v["usec"]) for v in scripts.values())
    every = sum(int(v["usec"]) for v in stats.values())
    return {
        "rps": round(requests / took),
        "script_calls_per_request": round(calls / requests, 2),
        "usec_per_script_call": round(usec / calls, 1),
        "script_usec_per_request": round(usec / requests, 1),
        "command_usec_per_request": round(every / requests, 1),
        "cpu_usec_per_request": round(1e6 * used / requests, 1),
    }


def test_two_pools_on_two_primaries_each_keep_their_keys_on_their_own(
    cluster: Cluster, tmp_path: Path, nodes: ClusterSet
) -> None:
    first, second = pools_on_two_primaries(nodes)
    gateways = {}
    for pool in (first, second):
        d = tmp_path / pool
        d.mkdir()
        mocks = [Mock(p, "--latency-ms", "5") for p in "abc"]
        routes = [{"model": "chat", "strategy": "round_robin",
                   "targets": [{"provider": p, "model": "m"} for p in "abc"]}]  # fmt: skip
        gateways[pool] = start_gateway(cluster, d, nodes.url, mocks, routes, pool=pool)
    for pool, gw in gateways.items():
        global_round_robin(gw)
        owner = nodes.owner(Keys("rc", pool).waiting())
        slot = key_slot(Keys("rc", pool).waiting().encode())
        shard = state(gw)["shard"]
        assert shard == {"slot": slot, "node": f"127.0.0.1:{owner}"}, shard
        if pool == first:  # the table's header says it too
            assert f"slot {slot} on 127.0.0.1:{owner}" in ctl(gw, "state")
        assert owner is not None
        mine = ask(owner, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000")
        assert mine
        assert all(k.startswith(f"rc:{{{pool}}}:") for k in mine)
        for other in primaries(nodes):
            if other != owner:
                assert ask(other, "KEYS", f"rc:{{{pool}}}:*") == []
    owner = nodes.owner(Keys("rc", first).waiting())
    assert owner is not None
    cost = shard_cost(gateways[first], owner, 480)
    print(f"\npools {first!r} and {second!r} on two primaries; one pool's shard: {cost}")


async def test_calls_on_a_half_moved_slot_follow_ask_and_moved(
    tmp_path: Path, nodes: ClusterSet
) -> None:
    """Both paths: the scripts' shared connection and the pooled client (over TLS it runs
    the scripts), with several free connections on each node."""
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    redis = {"timeout_ms": 200}
    path = write_config(tmp_path / "r.yaml", nodes.url, [Mock("a")], routes, redis=redis)
    store = Store.from_config(load_config(path, dict(ENV)))
    await store.start(warm=8)
    assert store.mux is not None
    moved, stays = Keys("rc", "default").provider("a"), SLOT_KEY
    await store.client.hset(moved, "x", "1")
    await store.client.set(stays, "2")
    await asyncio.gather(*(store.client.get(stays) for _ in range(8)))  # 8 free connections
    slot = key_slot(moved.encode())
    source = nodes.owner(SLOT_KEY)
    assert source is not None
    target = next(p for p in primaries(nodes) if p != source)
    script = "return redis.call('HGET', KEYS[1], 'x')"
    try:
        assert ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source)) == "OK"
        assert ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target)) == "OK"
        assert ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", moved)
        # ASK: the key is on the target
        for _ in range(3):
            assert await store.mux.execute("HGET", moved, "x") == b"1"
            assert await store.mux.evalsha("0" * 40, script, [moved], []) == b"1"
            assert await store.client.hget(moved, "x") == b"1"
            assert await store.client.eval(script, 1, moved) == b"1"
            assert await store.client.register_script(script)(keys=[moved]) == b"1"
        # TRYAGAIN: the keys split between the nodes, for longer than the call's timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TryAgainError):
            await store.mux.execute("EVAL", script, 2, moved, stays)
        assert 0.15 <= loop.time() - started <= 1.0  # the call's timeout, and a last try
        # the migration ends: MOVED
        assert ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", stays)
        for port in [target, source, *(p for p in primaries(nodes) if p not in (source, target))]:
            assert ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", node_id(target)) == "OK"
        assert await store.mux.execute("EVAL", script, 2, moved, stays) == b"1"
        assert await store.client.eval(script, 2, moved, stays) == b"1"
        assert store.shard() == (slot, f"127.0.0.1:{target}")
    finally:
        await store.close()
