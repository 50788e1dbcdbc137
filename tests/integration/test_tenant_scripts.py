"""The tenant's part of the acquire and release scripts, against a real Redis: limits checked
before any target, nothing leased when refused, spend reserved then corrected, usage recorded
once per lease, and the scripts' budget periods equal to router/budgets.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from router.budgets import period_end, period_id
from router.config import BudgetPeriod, Config, TenantSpec, parse_config
from router.state.store import Charge, Decision, Lease, Outcome, RoutePlan, Store, TenantPlan
from router.state.tenantstate import pack_live, unpack_live
from router.strategies import Code, TenantCode

ENV = {"K": "client-key"}


def config(redis_url: str) -> Config:
    data = {
        "redis_url": redis_url,
        "client_keys": [{"env": "K"}],
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://x/v1",
                       "limits": {"rpm": 1000}}],
        "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
    }  # fmt: skip
    return parse_config(data, ENV)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_config(config(redis_url))
    await s.start()
    yield s
    await s.close()


def tenant(s: Store, **spec: Any) -> TenantPlan:
    return TenantPlan.build(TenantSpec.model_validate({"name": "t", **spec}), s.keys)


async def take(
    s: Store, t: TenantPlan, lease_id: str, tokens: int = 100, cost: int = 0, counted: bool = True
) -> Decision:
    cfg = config("redis://unused")
    plan = RoutePlan.build(cfg, cfg.routes[0], s.keys)
    return await s.acquire(
        plan, lease_id, [tokens], [False], rand=0, expected_output=16,
        tenant=t, tenant_tokens=tokens, cost_nano=cost, counted=counted,
    )  # fmt: skip


def lease_of(d: Decision, lease_id: str, t: TenantPlan, tokens: int = 100, cost: int = 0) -> Lease:
    pid = period_id(t.period or BudgetPeriod.MONTH, d.bucket)
    return Lease(lease_id, "p", d.bucket, tokens, False, t.name, "m", tokens, cost, pid)


async def live(s: Store, t: TenantPlan) -> dict[str, int]:
    return unpack_live(await s.client.get(t.keys[1]))


async def fields(s: Store, key: str) -> dict[str, str]:
    raw = await s.client.hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_rpm_refuses_before_any_target_and_leases_nothing(store: Store) -> None:
    t = tenant(store, limits={"rpm": 2})
    assert (await take(store, t, "a")).index == 0
    assert (await take(store, t, "b")).index == 0
    d = await take(store, t, "c")
    assert (d.index, d.tenant_code) == (None, TenantCode.RPM)
    assert all(c.code is Code.UNSEEN for c in d.candidates)  # no target was looked at
    assert 0 < d.wait_ms <= 62_000  # when the window's oldest bucket leaves it
    assert await store.in_flight("p") == 2  # the refused request holds nothing
    prov = await store.provider_fields("p")
    assert prov["rpm"] == "2"
    # a failover attempt of a request already counted is not counted again
    assert (await take(store, t, "d", counted=False)).index == 0


async def test_in_flight_frees_on_release_and_on_expiry(store: Store) -> None:
    t = tenant(store, limits={"max_in_flight": 1})
    d = await take(store, t, "a@t")  # such a tenant's lease ids name it
    d2 = await take(store, t, "b@t")
    assert (d2.index, d2.tenant_code, d2.wait_ms) == (None, TenantCode.IN_FLIGHT, -1)
    assert await store.release(lease_of(d, "a@t", t), Outcome("ok")) == 1
    assert await store.release(lease_of(d, "a@t", t), Outcome("ok")) == 0  # once only
    assert (await live(store, t))["in_flight"] == 0
    assert (await take(store, t, "c@t")).index == 0
    assert (await live(store, t))["in_flight"] == 1
    # its replica died: the lease expires, and the purge takes it off the tenant's count
    await store.client.zadd(store.keys.leases("p"), {"c@t": 1})
    await store.client.hdel(store.keys.provider("p"), "nm")  # maintenance at the next look
    other = tenant(store)
    other = TenantPlan(other.name + "2", (store.keys.tenant("t2"), store.keys.tenant_live("t2")))
    assert (await take(store, other, "x")).index == 0  # its look at p purges c@t
    assert (await live(store, t))["in_flight"] == 0
    assert (await take(store, t, "d@t")).index == 0


async def test_tpm_reserves_then_corrects_to_usage(store: Store) -> None:
    t = tenant(store, limits={"tpm": 250})
    d = await take(store, t, "a", tokens=200)
    assert (await take(store, t, "b", tokens=100)).tenant_code is TenantCode.TPM
    # the provider reported 40 tokens: the window keeps 40
    out = Outcome("ok", tenant_token_correction=-160, served=True, prompt_tokens=30,
                  completion_tokens=10)  # fmt: skip
    await store.release(lease_of(d, "a", t, tokens=200), out)
    assert (await live(store, t))["tpm"] == 40
    assert (await take(store, t, "c", tokens=200)).index == 0
    too_big = await take(store, t, "d", tokens=300)
    assert (too_big.tenant_code, too_big.wait_ms) == (TenantCode.TPM, -2)  # never fits


async def test_budget_reserved_corrected_and_usage_recorded_once(store: Store) -> None:
    t = tenant(store, budget={"usd": 0.000001, "period": "day"})  # 1000 nano-USD
    assert t.budget_nano == 1000
    d = await take(store, t, "a", cost=600)
    assert d.spent_nano == 600
    refused = await take(store, t, "b", cost=600)
    assert refused.tenant_code is TenantCode.BUDGET
    end_ms = period_end(BudgetPeriod.DAY, refused.bucket) * 1000
    assert refused.wait_ms == end_ms - refused.now_ms
    # served for 250 nano-USD: the other 350 come back
    out = Outcome("ok", tenant_token_correction=-50, spend_correction=-350, served=True,
                  prompt_tokens=40, completion_tokens=10, cost_nano=250)  # fmt: skip
    lease = lease_of(d, "a", t, cost=600)
    assert await store.release(lease, out) == 1
    assert await store.release(lease, out) == 0  # retried: counted once
    assert (await live(store, t))["spend_nano"] == 250
    assert (await take(store, t, "b2", cost=600)).index == 0
    assert (await take(store, t, "c", cost=2000)).wait_ms == -2  # over the whole budget
    day = (await store.client.keys(store.keys.usage("day", "*")))[0].decode()
    usage = await fields(store, day)
    assert usage == {"t|m|p|req": "1", "t|m|p|in": "40", "t|m|p|out": "10", "t|m|p|cost": "250"}
    assert 0 < await store.client.ttl(day) <= 62 * 86_400


async def test_a_failed_attempt_refunds_the_tenant(store: Store) -> None:
    t = tenant(store, limits={"tpm": 1000}, budget={"usd": 1})
    d = await take(store, t, "a", tokens=300, cost=5000)
    await store.release(
        lease_of(d, "a", t, tokens=300, cost=5000),
        Outcome("http_5xx", tenant_token_correction=-300, spend_correction=-5000),
    )
    f = await live(store, t)
    assert (f["tpm"], f["spend_nano"], f["rpm"]) == (0, 0, 1)
    assert f["in_flight"] == 0  # no max_in_flight: in flight is not counted
    assert await store.client.keys(store.keys.usage("*", "*")) == []  # nothing served


def _period_script() -> str:
    text = resources.files("router.state").joinpath("lua", "acquire.lua").read_text()
    body = text[text.index("-- period:begin") : text.index("-- period:end")]
    return (
        "local sec = tonumber(ARGV[1])\n" + body + "\nlocal out = {}\n"
        "for c = 1, 3 do local p, e = period(c); out[#out + 1] = p; out[#out + 1] = e end\n"
        "return out"
    )


@settings(max_examples=300, deadline=None)
@given(sec=st.integers(min_value=0, max_value=4_102_444_800))  # 1970 to 2100
async def test_lua_periods_match_python(redis_port: int, sec: int) -> None:
    client = aioredis.Redis(port=redis_port)
    try:
        got = await client.eval(_period_script(), 0, sec)
    finally:
        await client.aclose()
    want = []
    for p in (BudgetPeriod.DAY, BudgetPeriod.WEEK, BudgetPeriod.MONTH):
        want += [period_id(p, sec), period_end(p, sec)]
    assert [int(x) for x in got] == want


async def test_charges_of_requests_served_alone(store: Store) -> None:
    t = tenant(store, budget={"usd": 1, "period": "day"})
    d = await take(store, t, "a", cost=500)  # a shared admission: this period, 500 spent
    pid = period_id(BudgetPeriod.DAY, d.bucket)

    async def charge(period: int, cost: int) -> None:
        await store.charge(Charge("t", "m", "p", period, d.bucket, 2, 30, 10, cost))

    await charge(pid, 700)  # the same period: added
    assert (await live(store, t))["spend_nano"] == 1200
    await charge(pid - 1, 900)  # a period that is over: usage only
    assert (await live(store, t))["spend_nano"] == 1200
    f = await live(store, t)
    await store.client.set(t.keys[1], pack_live(**{**f, "period": pid - 1, "spend_nano": 5}))
    await charge(pid, 300)  # its period had no shared admission yet: it starts it
    f = await live(store, t)
    assert (f["period"], f["spend_nano"]) == (pid, 300)
    day = (await store.client.keys(store.keys.usage("day", "*")))[0].decode()
    usage = await fields(store, day)
    assert usage == {"t|m|p|req": "6", "t|m|p|in": "90", "t|m|p|out": "30", "t|m|p|cost": "1900"}
