"""An acquire carries a deadline in Redis time: run past it (its caller gave up long ago) it
leases nothing; a lease it took before is released, on whichever target holds it, as lost."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from router.config import parse_config
from router.errors import StoreError
from router.state.store import LOST, LostLease, RoutePlan, Store

ENV = {"K": "client-key"}
CFG = {
    "client_keys": [{"env": "K"}],
    "providers": [{"name": n, "kind": "openai", "base_url": "http://x/v1"} for n in "pq"],
    "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"},
                                          {"provider": "q", "model": "x"}]}],
}  # fmt: skip


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_config(parse_config({**CFG, "redis_url": redis_url}, ENV))
    await s.start()
    yield s
    await s.close()


def plan_of(s: Store) -> RoutePlan:
    cfg = parse_config(CFG, ENV)
    return RoutePlan.build(cfg, cfg.routes[0], s.keys)


async def in_flight(s: Store) -> int:
    return await s.in_flight("p") + await s.in_flight("q")


async def test_an_acquire_run_past_its_deadline_leases_nothing(store: Store) -> None:
    plan = plan_of(store)
    now = await store.time_ms()
    with pytest.raises(StoreError, match="after its deadline"):
        await store.acquire(plan, "late", [10, 10], [False, False], rand=0, expected_output=1,
                            not_after_ms=now - 1)  # fmt: skip
    assert await in_flight(store) == 0
    assert "rpm" not in await store.provider_fields("p")  # nothing counted either
    d = await store.acquire(plan, "on-time", [10, 10], [False, False], rand=0,
                            expected_output=1, not_after_ms=now + 60_000)  # fmt: skip
    assert d.index is not None
    assert await in_flight(store) == 1


async def test_a_lost_lease_is_released_on_the_target_that_holds_it(store: Store) -> None:
    plan = plan_of(store)
    d = await store.acquire(plan, "lost-1", [10, 10], [True, False], rand=0, expected_output=1)
    assert d.index == 1  # q: p was excluded
    lost = LostLease("lost-1", ("p", "q"), store.not_after_ms())
    assert await store.release_lost(lost) is True
    assert await in_flight(store) == 0
    assert (await store.provider_fields("q"))[f"o:{LOST}"] == "1"
    assert await store.release_lost(lost) is False  # released once only
    assert f"o:{LOST}" not in await store.provider_fields("p")
