"""Affinity pins in the acquire and release scripts, against a real Redis: every outcome, the
tenant check of required pins, the refresh rule, the pins' counts and their trimming, response
pins written by release, and all of it beside the tenant and queue blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from router.config import Config, TenantSpec, parse_config
from router.state.affinity import PinRequest, hrw_order
from router.state.cluster import read_state
from router.state.store import (
    Decision,
    Lease,
    Outcome,
    QueueState,
    RoutePlan,
    Store,
    TenantPlan,
    Ticket,
)
from router.strategies import Code, PinOutcome, TenantCode

ENV = {"K": "client-key"}
TTL_MS = 600_000
NAMES = ("a", "b", "c")


def config(redis_url: str) -> Config:
    data = {
        "redis_url": redis_url,
        "client_keys": [{"env": "K"}],
        "providers": [
            {"name": n, "kind": "openai", "base_url": "http://x/v1",
             "limits": {"max_in_flight": 2}}
            for n in NAMES
        ],
        "routes": [{"model": "m", "strategy": "round_robin", "queue_timeout_s": 5,
                    "targets": [{"provider": n, "model": "x"} for n in NAMES]}],
    }  # fmt: skip
    return parse_config(data, ENV)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_config(config(redis_url))
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def plan(store: Store) -> RoutePlan:
    cfg = config("redis://unused")
    return RoutePlan.build(cfg, cfg.routes[0], store.keys)


def key_pin(value: str = "session-1", order: tuple[int, ...] | None = None) -> PinRequest:
    pin = PinRequest.preferred("m", value, NAMES, ttl_s=TTL_MS / 1000, load_factor=1.25)
    return pin if order is None else PinRequest(pin.kind, pin.key, pin.mode, TTL_MS, order)


def response_pin(tenant: str = "t") -> PinRequest:
    return PinRequest.response("resp_1", ttl_s=TTL_MS / 1000, tenant=tenant)


async def take(
    s: Store, plan: RoutePlan, lease_id: str, pin: PinRequest | None, **kw: Any
) -> Decision:
    n = len(plan.providers)
    excluded = kw.pop("excluded", [False] * n)
    return await s.acquire(
        plan, lease_id, [1] * n, excluded, rand=0, expected_output=1, affinity=pin, **kw
    )


async def stored(s: Store, plan: RoutePlan, pin: PinRequest) -> tuple[str, int, str] | None:
    raw = await s.client.get(s.pin_key(plan.route.model, pin))
    if raw is None:
        return None
    provider, expires, tenant = raw.decode().split("|")
    return provider, int(expires), tenant


async def pins(s: Store, provider: str) -> int:
    now_ms = await s.time_ms()
    return int(await s.client.zcount(s.keys.pins(provider), f"({now_ms}", "+inf"))


async def test_a_new_key_goes_to_its_rendezvous_choice_then_hits(
    store: Store, plan: RoutePlan
) -> None:
    pin = key_pin()
    first = NAMES[pin.order[0]]
    d = await take(store, plan, "l1", pin)
    assert (d.pin, d.pinned, d.index) == (PinOutcome.NEW, "", pin.order[0])
    assert (await stored(store, plan, pin) or ("",))[0] == first
    assert await pins(store, first) == 1
    # the same order on every replica: a function of the key and the names only
    assert list(pin.order) == hrw_order(pin.key, NAMES)
    d = await take(store, plan, "l2", pin)
    assert (d.pin, d.pinned, d.index) == (PinOutcome.HIT, first, pin.order[0])
    assert await pins(store, first) == 1
    # the pin decided: round robin's rotation never turned
    assert await store.client.get(store.keys.rotation("m")) is None


async def test_a_hot_pin_is_read_not_written_until_under_90_percent_of_its_ttl(
    store: Store, plan: RoutePlan
) -> None:
    pin = key_pin()
    key = store.pin_key("m", pin)
    await take(store, plan, "l1", pin)
    provider, _, tenant = await stored(store, plan, pin) or ("", 0, "")
    now_ms = await store.time_ms()
    # stored expiry 91 % of the TTL away: used now, it is not written (PTTL keeps our marker)
    await store.client.set(key, f"{provider}|{now_ms + int(0.91 * TTL_MS)}|{tenant}")
    await store.client.pexpire(key, 5000)
    d = await take(store, plan, "l1", pin)  # the same lease: the target never fills
    assert d.pin is PinOutcome.HIT
    assert 0 < await store.client.pttl(key) <= 5000
    # 89 % away: written again, a whole TTL from now
    await store.client.set(key, f"{provider}|{now_ms + int(0.89 * TTL_MS)}|{tenant}")
    await store.client.pexpire(key, 5000)
    d = await take(store, plan, "l1", pin)
    assert d.pin is PinOutcome.HIT
    assert await store.client.pttl(key) > TTL_MS - 5000
    _, expires, _ = await stored(store, plan, pin) or ("", 0, "")
    assert expires == d.now_ms + TTL_MS


async def test_a_pin_moves_off_an_out_of_service_target(store: Store, plan: RoutePlan) -> None:
    pin = key_pin()
    await take(store, plan, "l1", pin)
    first = NAMES[pin.order[0]]
    await store.client.hset(store.keys.provider(first), mapping={"drain": "1", "gate": 1})
    d = await take(store, plan, "l2", pin)
    assert d.pin is PinOutcome.MOVED
    assert d.pinned == first
    assert d.index is not None
    assert plan.providers[d.index] != first
    moved_to = plan.providers[d.index]
    assert (await stored(store, plan, pin) or ("",))[0] == moved_to
    assert (await pins(store, first), await pins(store, moved_to)) == (0, 1)
    # a failover attempt that excluded the pinned target moves it too
    d = await take(store, plan, "l3", pin, excluded=[n == moved_to for n in NAMES])
    assert d.pin is PinOutcome.MOVED
    assert d.pinned == moved_to


async def test_a_pin_spills_off_a_full_target(store: Store, plan: RoutePlan) -> None:
    pin = key_pin()
    await take(store, plan, "l1", pin)
    d = await take(store, plan, "l2", pin)
    first = NAMES[pin.order[0]]
    assert d.pin is PinOutcome.HIT  # two in flight: the pinned target is full (max 2)
    d = await take(store, plan, "l3", pin)
    assert d.pin is PinOutcome.SPILLED
    assert d.pinned == first
    assert d.candidates[pin.order[0]].code is Code.FULL
    assert d.index is not None
    assert (await stored(store, plan, pin) or ("",))[0] != first


async def test_bounded_loads_pass_over_a_loaded_first_choice(store: Store, plan: RoutePlan) -> None:
    pin = key_pin(order=(0, 1, 2))
    # 'a' holds 2 of 2 leases' worth of the mean: ceil(1.25 * (1 + 1) / 3) = 1 < 1 + 1
    await take(store, plan, "other", None, excluded=[False, True, True])
    d = await take(store, plan, "l1", pin)
    assert (d.pin, d.index) == (PinOutcome.SPILLED, 1)
    assert (await stored(store, plan, pin) or ("",))[0] == "b"


async def test_no_eligible_target_the_pin_changes_nothing(store: Store, plan: RoutePlan) -> None:
    pin = key_pin()
    await take(store, plan, "l1", pin)
    before = await stored(store, plan, pin)
    d = await take(store, plan, "l2", pin, excluded=[True, True, True])
    assert (d.index, d.pin, d.wait_ms) == (None, PinOutcome.NONE, -2)
    assert await stored(store, plan, pin) == before


async def test_a_required_pin_is_honoured_or_nothing_is_leased(
    store: Store, plan: RoutePlan
) -> None:
    pin = response_pin()
    key = store.keys.response_pin("resp_1")
    d = await take(store, plan, "l0", pin)  # no pin: the strategy chooses, nothing written
    assert (d.pin, d.index) == (PinOutcome.NONE, 1)
    assert await store.client.get(key) is None
    lease = Lease("l0", "b", d.bucket, 1, tenant="t")
    assert await store.release(lease, Outcome("ok", served=True, response_id="resp_1")) == 1
    d = await take(store, plan, "l1", pin)
    assert (d.pin, d.pinned, d.index) == (PinOutcome.HIT, "b", 1)
    await take(store, plan, "l2", pin)
    d = await take(store, plan, "l3", pin)  # 'b' is full: wait for it, nothing leased
    assert (d.pin, d.pinned, d.index) == (PinOutcome.PIN_UNAVAILABLE, "b", None)
    assert d.candidates[1].code is Code.FULL
    assert d.wait_ms == -1
    assert await store.in_flight("a") == 0
    assert await store.in_flight("c") == 0
    await store.client.hset(store.keys.provider("b"), mapping={"health": "down", "gate": 1})
    d = await take(store, plan, "l4", pin)
    assert (d.pin, d.index, d.candidates[1].code) == (PinOutcome.PIN_UNAVAILABLE, None, 2)


async def test_another_tenants_response_pin_is_not_revealed(store: Store, plan: RoutePlan) -> None:
    await store.client.set(store.keys.response_pin("resp_1"), "b|99999999999999|owner")
    d = await take(store, plan, "l1", response_pin("intruder"))
    assert (d.pin, d.pinned, d.index) == (PinOutcome.FOREIGN, "", None)
    assert all(c.code is Code.UNSEEN for c in d.candidates)
    assert sum([await store.in_flight(n) for n in NAMES]) == 0


async def test_a_required_pin_off_the_route_is_unavailable(store: Store, plan: RoutePlan) -> None:
    await store.client.set(store.keys.response_pin("resp_1"), "elsewhere|99999999999999|t")
    d = await take(store, plan, "l1", response_pin())
    assert (d.pin, d.pinned, d.index, d.wait_ms) == (
        PinOutcome.PIN_UNAVAILABLE, "elsewhere", None, -2,
    )  # fmt: skip


async def test_release_pins_a_response_and_the_pin_can_be_read_and_dropped(
    store: Store, plan: RoutePlan
) -> None:
    d = await take(store, plan, "l1", None)
    provider = plan.providers[d.index or 0]
    lease = Lease("l1", provider, d.bucket, 1, tenant="t", route="m")
    outcome = Outcome("ok", served=True, response_id="resp_9")
    assert await store.release(lease, outcome) == 1
    assert await store.response_pin("resp_9") == (provider, "t")
    key = store.keys.response_pin("resp_9")
    assert 0 < await store.client.pttl(key) <= store.response_pin_ttl_ms
    assert await pins(store, provider) == 1
    await store.client.delete(key)
    assert await store.release(lease, outcome) == 0  # a retried release pins it all the same
    assert await store.response_pin("resp_9") == (provider, "t")
    assert await store.drop_response_pin("resp_9")
    assert await store.response_pin("resp_9") is None
    assert await pins(store, provider) == 0
    assert not await store.drop_response_pin("resp_9")


async def test_expired_pins_leave_the_count_and_are_trimmed_on_write(
    store: Store, plan: RoutePlan
) -> None:
    now_ms = await store.time_ms()
    old = {f"pin:m:old{i}": now_ms - 1000 for i in range(5)}
    await store.client.zadd(store.keys.pins("a"), old)
    assert await pins(store, "a") == 0  # counted from now on
    d = await take(store, plan, "l1", key_pin(order=(0, 1, 2)))
    assert d.pin is PinOutcome.NEW
    assert d.index == 0
    assert await store.client.zcard(store.keys.pins("a")) == 1  # the expired ones trimmed
    cfg = config("redis://unused")
    state = await read_state(store, cfg)
    assert [p.pins for p in state.providers] == [1, 0, 0]


async def test_pins_with_the_tenant_and_queue_blocks(store: Store, plan: RoutePlan) -> None:
    spec = TenantSpec.model_validate({"name": "t", "limits": {"rpm": 2}})
    tenant = TenantPlan.build(spec, store.keys)
    pin = key_pin()

    def ticket(member: str, holds: bool = False) -> Ticket:
        return Ticket(f"{member}|t|0", holds, 0, 1, "t", may_wait=True)

    kw: dict[str, Any] = {"tenant": tenant, "tenant_tokens": 1}
    d = await take(store, plan, "l1", pin, ticket=ticket("q1"), **kw)
    assert (d.pin, d.tenant_code, d.queue_state) == (PinOutcome.NEW, TenantCode.OK, QueueState.NONE)
    d = await take(store, plan, "l2", pin, ticket=ticket("q2"), **kw)
    assert (d.pin, d.index) == (PinOutcome.HIT, pin.order[0])
    # the tenant's RPM refuses before any target: the pin takes no part, the tails decode
    d = await take(store, plan, "l3", pin, ticket=ticket("q3"), **kw)
    assert (d.tenant_code, d.pin, d.index, d.queue_state) == (
        TenantCode.RPM, PinOutcome.NONE, None, QueueState.NONE,
    )  # fmt: skip
    assert d.pinned == NAMES[pin.order[0]]
    # another's ticket waits at the head: this one queues behind it, whatever its pin
    await store.client.zadd(store.keys.queue("m"), {"head|u|0": 1})
    await store.client.zadd(store.keys.queue_expiry("m"), {"head|u|0": d.now_ms + 60_000})
    d = await take(store, plan, "l4", pin, ticket=ticket("q4"))
    assert (d.queue_state, d.queue_rank, d.index, d.pin) == (
        QueueState.WAITING, 1, None, PinOutcome.NONE,
    )  # fmt: skip
