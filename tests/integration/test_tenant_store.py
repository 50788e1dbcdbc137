"""The tenants' scripts against a real Redis: versions, caps, publishing, live figures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from router.config import TenantSpec, parse_config
from router.errors import ConfigOwned, Conflict, KeyNotFound, TenantNotFound
from router.replica.tenants import TenantDirectory
from router.state.store import Store
from router.state.tenants import TenantStore, key_digest
from tests.helpers import async_wait_until

CONFIG_NAMES = frozenset({"default", "team-a"})


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    cfg = parse_config(
        {"redis_url": redis_url, "client_keys": [{"env": "K"}],
         "providers": [{"name": "p", "kind": "openai", "base_url": "http://x/v1"}],
         "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}]},
        {"K": "client-key"},
    )  # fmt: skip
    s = Store.from_config(cfg)
    await s.start()
    yield s
    await s.close()


async def test_every_change_bumps_the_version_and_is_published(store: Store) -> None:
    tenants = TenantStore(store)
    sub = await store.subscribe(store.keys.tenants_channel())
    try:
        v1 = await tenants.create(TenantSpec(name="c"), CONFIG_NAMES, 10)
        v2 = await tenants.update(TenantSpec(name="c", limits={"rpm": 3}), CONFIG_NAMES)
        issued, key = await tenants.issue_key("c", CONFIG_NAMES, 10)
        v3 = (await tenants.read()).version
        v4 = await tenants.revoke_key("c", issued.id)
        assert [v1, v2, v3, v4] == [1, 2, 3, 4]
        seen: list[object] = []

        async def four() -> bool:
            data = await sub.next(within=0.2)  # (None too for the subscription's own notice)
            if data is not None:
                seen.append(orjson.loads(data))
            return len(seen) == 4

        await async_wait_until(four, 2.0, "four events")
        assert seen == [{"version": v} for v in (1, 2, 3, 4)]
    finally:
        await sub.close()
    snap = await tenants.read()
    assert snap.specs["c"].limits.rpm == 3
    assert snap.keys == ()
    assert issued.digest == key_digest(key.encode())
    assert issued.created_ms > 1_700_000_000_000


async def test_the_refusals(store: Store) -> None:
    tenants = TenantStore(store)
    with pytest.raises(ConfigOwned):
        await tenants.create(TenantSpec(name="default"), CONFIG_NAMES, 10)
    with pytest.raises(ConfigOwned):
        await tenants.delete("team-a", CONFIG_NAMES)
    with pytest.raises(TenantNotFound):
        await tenants.update(TenantSpec(name="nobody"), CONFIG_NAMES)
    with pytest.raises(TenantNotFound):
        await tenants.issue_key("nobody", CONFIG_NAMES, 10)
    with pytest.raises(KeyNotFound):
        await tenants.revoke_key("team-a", "key_000000000000")
    # max_tenants counts the config's two: room for two more
    await tenants.create(TenantSpec(name="x"), CONFIG_NAMES, 4)
    with pytest.raises(Conflict) as err:
        await tenants.create(TenantSpec(name="x"), CONFIG_NAMES, 4)
    assert err.value.code == "tenant_exists"
    await tenants.create(TenantSpec(name="y"), CONFIG_NAMES, 4)
    with pytest.raises(Conflict) as err:
        await tenants.create(TenantSpec(name="z"), CONFIG_NAMES, 4)
    assert err.value.code == "too_many_tenants"
    # max_tenant_keys is over every tenant, config-owned ones too
    await tenants.issue_key("team-a", CONFIG_NAMES, 2)
    await tenants.issue_key("x", CONFIG_NAMES, 2)
    with pytest.raises(Conflict) as err:
        await tenants.issue_key("y", CONFIG_NAMES, 2)
    assert err.value.code == "too_many_keys"
    # deleting a tenant revokes its keys only
    assert (await tenants.delete("x", CONFIG_NAMES))[1] == 1
    assert [k.tenant for k in (await tenants.read()).keys] == ["team-a"]


async def test_a_deleted_tenants_keys_stop_resolving(store: Store) -> None:
    tenants = TenantStore(store)
    await tenants.create(TenantSpec(name="c"), CONFIG_NAMES, 10)
    _, key = await tenants.issue_key("c", CONFIG_NAMES, 10)
    cfg_dir = TenantDirectory(store.keys, {}, {})

    async def resolves() -> bool:
        return cfg_dir.with_snapshot(await tenants.read()).resolve(key.encode()) is not None

    await async_wait_until(resolves, 1.0, "the issued key")
    await tenants.delete("c", CONFIG_NAMES)
    assert not await resolves()
