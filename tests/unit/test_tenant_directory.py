"""Who a bearer key is: the config's keys, ``default``, and issued keys from a snapshot."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import Config, TenantSpec, parse_config
from router.errors import ConfigError
from router.replica.tenants import TenantDirectory, TenantView
from router.state.keys import Keys
from router.state.tenants import (
    KEY_PREFIX,
    IssuedKey,
    TenantsSnapshot,
    decode_snapshot,
    key_digest,
    new_key,
)

KEYS = Keys("rc", "default")
ENV = {"K": "client-key", "A": "team-a-key", "A2": "team-a-other", "B": "team-b-key"}


def config(**extra: Any) -> Config:
    data = {
        "client_keys": [{"env": "K"}],
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://p/v1"}],
        "routes": [{"model": m, "targets": [{"provider": "p", "model": "x"}]}
                   for m in ("chat", "embed")],
        **extra,
    }  # fmt: skip
    return parse_config(data, ENV)


TENANTS = [
    {"name": "team-a", "keys": [{"env": "A"}, {"env": "A2"}], "limits": {"rpm": 5},
     "routes": ["chat"]},
    {"name": "team-b", "keys": [{"env": "B"}], "budget": {"usd": 2.5, "period": "day"}},
]  # fmt: skip


def directory(**extra: Any) -> TenantDirectory:
    return TenantDirectory.from_config(config(**extra), KEYS)


def issued(key: str, tenant: str, key_id: str = "key_1", created_ms: int = 1000) -> IssuedKey:
    return IssuedKey(key_digest(key.encode()), tenant, key_id, created_ms)


def test_client_keys_are_the_default_tenant() -> None:
    d = directory()
    plan = d.resolve(b"client-key")
    assert plan is not None
    assert plan.name == "default"
    assert plan.owner == "config"
    assert (plan.rpm, plan.tpm, plan.budget_nano, plan.routes) == (0, 0, 0, None)


@pytest.mark.parametrize("token", [b"", b"client-ke", b"client-key ", b"CLIENT-KEY", b"x" * 500])
def test_anything_else_is_nobody(token: bytes) -> None:
    assert directory(tenants=TENANTS).resolve(token) is None


def test_config_tenants_keys_resolve_to_their_plans() -> None:
    d = directory(tenants=TENANTS)
    a, a2, b = d.resolve(b"team-a-key"), d.resolve(b"team-a-other"), d.resolve(b"team-b-key")
    assert a is not None
    assert a2 is a
    assert a.name == "team-a"
    assert a.rpm == 5
    assert a.routes == frozenset({"chat"})
    assert a.allows("chat")
    assert not a.allows("embed")
    assert b is not None
    assert b.name == "team-b"
    assert b.budget_nano == 2_500_000_000


def test_a_default_entry_sets_the_client_keys_limits_and_adds_keys() -> None:
    d = directory(tenants=[{"name": "default", "keys": [{"env": "A"}], "limits": {"tpm": 9}}])
    for token in (b"client-key", b"team-a-key"):
        plan = d.resolve(token)
        assert plan is not None
        assert plan.name == "default"
        assert plan.tpm == 9


def test_a_key_of_two_tenants_is_refused_naming_the_variable_never_the_key() -> None:
    tenants = [{"name": "x", "keys": [{"env": "K"}]}]
    with pytest.raises(ConfigError) as err:
        directory(tenants=tenants)
    assert "$K" in str(err.value)
    assert "client-key" not in str(err.value)


def test_a_snapshot_adds_api_tenants_and_issued_keys() -> None:
    d = directory(tenants=TENANTS)
    key, _ = new_key()
    snap = TenantsSnapshot(
        7,
        {"team-c": TenantSpec(name="team-c", limits={"max_in_flight": 2})},
        (issued(key, "team-c"), issued("issued-to-a", "team-a", "key_2")),
    )
    d2 = d.with_snapshot(snap)
    c = d2.resolve(key.encode())
    assert c is not None
    assert c.name == "team-c"
    assert c.owner == "api"
    assert c.max_in_flight == 2
    a = d2.resolve(b"issued-to-a")
    assert a is not None
    assert a.name == "team-a"
    assert a.owner == "config"
    assert d2.version == 7
    assert d.resolve(key.encode()) is None
    assert d2.resolve(b"team-a-key") is not None  # the config's keys stay


def test_the_config_wins_a_name_the_api_also_holds() -> None:
    d = directory(tenants=TENANTS).with_snapshot(
        TenantsSnapshot(1, {"team-a": TenantSpec(name="team-a", limits={"rpm": 999})}, ())
    )
    plan = d.plans["team-a"]
    assert plan.owner == "config"
    assert plan.rpm == 5


def test_keys_of_unknown_tenants_are_refused() -> None:
    snap = TenantsSnapshot(2, {}, (issued("orphan", "gone-from-config"),))
    assert directory().with_snapshot(snap).resolve(b"orphan") is None


def test_revoking_is_a_snapshot_without_the_key() -> None:
    d = directory().with_snapshot(TenantsSnapshot(1, {}, (issued("k1", "default"),)))
    assert d.resolve(b"k1") is not None
    assert d.with_snapshot(TenantsSnapshot(2, {}, ())).resolve(b"k1") is None


def test_entries_list_every_tenant_with_owner_and_key_ids_config_first() -> None:
    snap = TenantsSnapshot(
        3,
        {"zeta": TenantSpec(name="zeta"), "alpha": TenantSpec(name="alpha")},
        (issued("k2", "alpha", "key_b", 2000), issued("k1", "alpha", "key_a", 1000)),
    )
    entries = directory(tenants=TENANTS).with_snapshot(snap).entries()
    assert [(e.plan.name, e.plan.owner) for e in entries] == [
        ("default", "config"), ("team-a", "config"), ("team-b", "config"),
        ("alpha", "api"), ("zeta", "api"),
    ]  # fmt: skip
    by_name = {e.plan.name: e for e in entries}
    assert [k.id for k in by_name["alpha"].issued] == ["key_a", "key_b"]
    assert (by_name["default"].config_keys, by_name["team-a"].config_keys) == (1, 2)


def test_new_keys_are_long_random_and_prefixed() -> None:
    keys = {new_key() for _ in range(100)}
    assert len({k for k, _ in keys}) == 100
    assert len({i for _, i in keys}) == 100
    for key, key_id in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) >= len(KEY_PREFIX) + 43
        assert key_id.startswith("key_")
        assert len(key_id) == 16


def test_snapshot_decoding_skips_unreadable_records() -> None:
    good = TenantSpec(name="ok").model_dump_json().encode()
    raw = [
        b"4",
        [b"ok", good, b"bad", b"{not json", b"mismatch", good],
        [b"ab" * 32, b'{"tenant":"ok","id":"key_1","created_ms":5}', b"cd" * 32, b"[]"],
    ]
    snap = decode_snapshot(raw)
    assert snap.version == 4
    assert list(snap.specs) == ["ok"]
    assert snap.keys == (IssuedKey("ab" * 32, "ok", "key_1", 5),)


def test_events_newer_than_the_directory_call_for_a_reread() -> None:
    view = TenantView(None, directory().with_snapshot(TenantsSnapshot(5, {}, ())), 30)  # type: ignore[arg-type]
    assert view.apply(b'{"version": 6}')
    assert not view.apply(b'{"version": 5}')
    assert not view.apply(b"not json")
    assert not view.apply(b"[6]")
    assert not view.apply(b'{"version": "9"}')
