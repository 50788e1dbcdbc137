"""The store's scripts against a real Redis (and the same scripts on the embedded store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.config import Config, parse_config
from router.state.keys import WINDOW_BUCKETS
from router.state.store import Lease, Outcome, RoutePlan, Store
from router.strategies import Code

ENV = {"K": "client-key"}


def config(redis_url: str | None, **limits: Any) -> Config:
    data = {
        "client_keys": [{"env": "K"}],
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://x/v1",
                       "limits": limits}],
        "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
    }  # fmt: skip
    if redis_url:
        data["redis_url"] = redis_url
    return parse_config(data, ENV)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_config(config(redis_url, rpm=3, tpm=1000))
    await s.start()
    yield s
    await s.close()


def plan_of(s: Store, cfg: Config) -> RoutePlan:
    return RoutePlan.build(cfg, cfg.routes[0], s.keys)


async def take(s: Store, plan: RoutePlan, lease_id: str, tokens: int = 100) -> Any:
    return await s.acquire(plan, lease_id, [tokens], [False], rand=0, expected_output=16)


async def test_release_is_idempotent(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=3, tpm=1000))
    d = await take(store, plan, "l1")
    assert d.index == 0
    lease = Lease("l1", "p", d.bucket, 100)
    assert await store.in_flight("p") == 1
    actual = Outcome("ok", token_correction=-60)
    assert await store.release(lease, actual) == 1
    assert await store.release(lease, actual) == 0  # a retried release changes nothing
    fields = await store.provider_fields("p")
    assert (fields["tpm"], fields["rpm"], fields["o:ok"]) == ("40", "1", "1")
    assert await store.in_flight("p") == 0


async def test_rpm_full_gives_the_time_its_oldest_bucket_leaves(
    store: Store, redis_url: str
) -> None:
    plan = plan_of(store, config(redis_url, rpm=3, tpm=1000))
    for i in range(3):
        assert (await take(store, plan, f"l{i}", tokens=1)).index == 0
    d = await take(store, plan, "l3", tokens=1)
    assert d.index is None
    assert d.candidates[0].code is Code.RPM
    # the window holds WINDOW_BUCKETS seconds: room comes back when this second leaves it
    assert (WINDOW_BUCKETS - 1) * 1000 <= d.wait_ms <= WINDOW_BUCKETS * 1000


async def test_the_window_slides(store: Store, redis_url: str) -> None:
    cfg = config(redis_url, rpm=3, tpm=1000)
    plan = plan_of(store, cfg)
    await take(store, plan, "first", tokens=1)
    key = store.keys.provider("p")
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    now_s = int((await r.time())[0])
    old = now_s - WINDOW_BUCKETS  # pretend two requests were admitted just over a window ago
    await r.hset(key, mapping={"wh": old, f"r:{old}": 2, f"t:{old}": 2, "rpm": 3, "tpm": 3,
                               "nm": (old + WINDOW_BUCKETS) * 1000})  # fmt: skip
    d = await take(store, plan, "second", tokens=1)
    assert d.index == 0  # the old bucket slid out, so there is room again
    fields = await r.hgetall(key)
    assert fields["rpm"] == "2"
    assert f"r:{old}" not in fields
    await r.aclose()


async def test_tpm_counts_the_reservation(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=100, tpm=1000))
    assert (await take(store, plan, "a", tokens=900)).index == 0
    d = await take(store, plan, "b", tokens=101)
    assert d.index is None
    assert d.candidates[0].code is Code.TPM
    assert (await take(store, plan, "c", tokens=100)).index == 0


async def test_a_request_over_the_tpm_limit_never_fits(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, tpm=1000))
    assert (await take(store, plan, "a", tokens=1001)).wait_ms == -2


async def test_scripts_reload_after_script_flush(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=3, tpm=1000))
    await store.client.script_flush()
    assert (await take(store, plan, "after-flush")).index == 0


async def test_renew_extends_live_leases_but_never_resurrects(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=3, tpm=1000))
    await take(store, plan, "live")
    key = store.keys.leases("p")
    before = await store.client.zscore(key, "live")
    assert await store.renew({"p": ["live", "gone"]}) == 1
    assert await store.client.zscore(key, "live") >= before
    assert await store.client.zscore(key, "gone") is None


async def test_a_429_cooldown_is_shared() -> None:
    s = Store.from_config(config(None))  # the embedded store runs the same scripts
    await s.start()
    cfg = config(None)
    plan = plan_of(s, cfg)
    d = await take(s, plan, "x")
    await s.release(Lease("x", "p", d.bucket, 100), Outcome("http_429", cooldown_ms=5000))
    d = await take(s, plan, "y")
    assert d.index is None
    assert d.candidates[0].code is Code.COOLING
    assert 4000 <= d.wait_ms <= 5000
    await s.close()


async def test_provider_figures_only_ever_raise_our_count(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=100, tpm=1000))
    d = await take(store, plan, "a", tokens=100)
    lease = Lease("a", "p", d.bucket, 100)
    # the provider says it has counted 700 tokens and 5 requests: more than our 100 and 1
    await store.release(lease, Outcome("ok", provider_requests=5, provider_tokens=700))
    fields = await store.provider_fields("p")
    assert (fields["rpm"], fields["tpm"]) == ("5", "700")
    d = await take(store, plan, "b", tokens=100)
    # a lower figure never lowers ours
    await store.release(Lease("b", "p", d.bucket, 100), Outcome("ok", provider_tokens=10))
    assert (await store.provider_fields("p"))["tpm"] == "800"


async def test_in_flight_count_in_the_hash_follows_the_lease_set(
    store: Store, redis_url: str
) -> None:
    """acquire reads the count from the provider hash ('inf', one HMGET per target); it must
    equal the unexpired leases whatever happened: releases, expiries, leases of an older
    version that wrote no count."""
    plan = plan_of(store, config(redis_url, rpm=100, tpm=100_000))
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pk, lk = store.keys.provider("p"), store.keys.leases("p")
    for i in range(3):
        assert (await take(store, plan, f"l{i}", tokens=1)).index == 0
    assert (await r.hget(pk, "inf"), await r.zcard(lk)) == ("3", 3)
    await store.release(Lease("l0", "p", 0, 1), Outcome("ok"))
    assert await r.hget(pk, "inf") == "2"
    # l1 expires (its expiry moved into the past): the next decision purges and counts it out
    now_ms = int((await r.time())[0]) * 1000
    await r.zadd(lk, {"l1": now_ms - 1})
    await r.hset(pk, "nm", now_ms - 1)  # as acquire records it: no later than any expiry
    d = await take(store, plan, "l3", tokens=1)
    assert d.candidates[0].in_flight == 2  # l2 and l3
    assert (await r.hget(pk, "inf"), await r.zcard(lk)) == ("2", 2)
    # leases written without a count (an older version) are counted on first sight
    await r.hdel(pk, "inf")
    await r.zadd(lk, {"old": now_ms + 60_000})
    d = await take(store, plan, "l4", tokens=1)
    assert d.candidates[0].in_flight == 4  # l2, l3, old, l4
    assert await r.hget(pk, "inf") == "4"
    await r.aclose()


async def test_a_blocked_provider_without_its_gate_flag_is_seen(
    store: Store, redis_url: str
) -> None:
    """'gate' tells acquire to read the blocking fields; state written without it (an older
    version) is still seen, at the next maintenance, and the flag set."""
    cfg = config(redis_url, rpm=100, tpm=100_000)
    plan = plan_of(store, cfg)
    assert (await take(store, plan, "warm", tokens=1)).index == 0
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pk = store.keys.provider("p")
    await r.hset(pk, "health", "down")  # no gate: acquire does not look, until it maintains
    await r.hdel(pk, "nm")  # as an older version left it: no maintenance time either
    d = await take(store, plan, "after", tokens=1)
    assert d.index is None
    assert d.candidates[0].code is Code.UNHEALTHY
    assert await r.hget(pk, "gate") == "1"
    await r.hset(pk, "health", "up")
    assert (await take(store, plan, "up-again", tokens=1)).index == 0
    assert await r.hget(pk, "gate") is None  # nothing blocks: the flag is dropped
    await r.aclose()


async def test_a_tenant_refused_in_a_queued_route_decodes(redis_url: str) -> None:
    """The tenant's refusal carries the queue's tail like every other answer (the script's
    optional blocks are named in ARGV[10], so the answer's shape follows from the call)."""
    from router.config import TenantSpec
    from router.state.store import QueueState, TenantPlan, Ticket
    from router.strategies import TenantCode

    s = Store.from_config(config(redis_url))
    await s.start()
    try:
        cfg = config(redis_url)
        plan = plan_of(s, cfg)
        spec = TenantSpec.model_validate({"name": "t", "limits": {"rpm": 1}})
        t = TenantPlan.build(spec, s.keys)
        ticket = Ticket("q1|t|0", False, 0, 1, "t", may_wait=True)
        kw: dict[str, Any] = {"tenant": t, "tenant_tokens": 1, "ticket": ticket}
        d = await s.acquire(plan, "l1", [1], [False], rand=0, expected_output=1, **kw)
        assert d.index == 0
        d = await s.acquire(plan, "l2", [1], [False], rand=0, expected_output=1, **kw)
        assert (d.index, d.tenant_code, d.queue_state) == (None, TenantCode.RPM, QueueState.NONE)
    finally:
        await s.close()


async def test_release_pins_a_response_without_a_tenant(store: Store, redis_url: str) -> None:
    plan = plan_of(store, config(redis_url, rpm=3, tpm=1000))
    d = await take(store, plan, "l1")
    lease = Lease("l1", "p", d.bucket, 100)
    assert await store.release(lease, Outcome("ok", response_id="resp_x")) == 1
    assert await store.response_pin("resp_x") == ("p", "")
    fields = await store.provider_fields("p")
    assert (fields["rpm"], fields["o:ok"]) == ("1", "1")  # the rest of the release as before
