"""The tenants' registry in the shared state: the tenants the admin API created and the keys it
issued (their live figures are ``router.state.tenantstate``'s). It runs the store's scripts;
only ``store.py`` talks to Redis.

A key issued here is returned once, to the caller, and never stored: Redis holds its SHA-256
(``Keys.tenant_keys``: hex digest -> ``{"tenant", "id", "created_ms"}``), and nothing here
logs it. Every change bumps ``Keys.tenants_version`` and publishes ``{"version": v}`` on
``Keys.tenants_channel`` in the same script, so the replicas (``router.replica.tenants``)
re-read one consistent snapshot. A 256-bit random key needs no slow hash: a plain SHA-256
cannot be reversed, and no dictionary holds it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from router.config import TenantSpec
from router.errors import ConfigOwned, Conflict, KeyNotFound, TenantNotFound
from router.state.store import Store, decode_text

log = logging.getLogger("router.tenants")

KEY_PREFIX = "sk-rc-"
"""How every issued key starts (so a leaked one is recognisable, e.g. by secret scanners)."""
KEY_BYTES = 32
"""Random bytes of an issued key (256 bits, URL-safe base64 after the prefix)."""


def key_digest(token: bytes) -> str:
    """What Redis and the replicas hold of a key: its SHA-256, hex."""
    return hashlib.sha256(token).hexdigest()


def new_key() -> tuple[str, str]:
    """A new key and its id (``key_`` and 12 hex digits: names the key, reveals nothing)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES), "key_" + secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key the admin API issued, as Redis holds it: its hash, never the key."""

    digest: str
    tenant: str
    id: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class TenantsSnapshot:
    """The admin API's tenants and issued keys at one version."""

    version: int
    specs: Mapping[str, TenantSpec]
    keys: tuple[IssuedKey, ...]


EMPTY = TenantsSnapshot(0, {}, ())


def _pairs(raw: Any) -> list[tuple[str, str]]:
    items = [decode_text(x) for x in (raw or [])]
    return list(zip(items[::2], items[1::2], strict=True))


def _spec(name: str, text: str) -> TenantSpec | None:
    try:
        spec = TenantSpec.model_validate_json(text)
    except ValidationError:
        spec = None
    if spec is None or spec.name != name:
        log.warning("unreadable tenant spec in Redis, ignored", extra={"fields": {"tenant": name}})
        return None
    return spec


def _issued(digest: str, text: str) -> IssuedKey | None:
    try:
        rec = orjson.loads(text)
        return IssuedKey(digest, str(rec["tenant"]), str(rec["id"]), int(rec["created_ms"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("unreadable issued key record in Redis, ignored")
        return None


def decode_snapshot(raw: Sequence[Any]) -> TenantsSnapshot:
    """``read_tenant_registry.lua``'s answer; a record that does not parse is left out (logged)."""
    specs = {n: s for n, t in _pairs(raw[1]) if (s := _spec(n, t)) is not None}
    keys = tuple(k for d, t in _pairs(raw[2]) if (k := _issued(d, t)) is not None)
    return TenantsSnapshot(int(raw[0]), specs, keys)


class TenantStore:
    """Tenants and issued keys in Redis; every change reaches every replica (pub/sub)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def read(self) -> TenantsSnapshot:
        """The admin API's tenants and issued keys, one consistent version."""
        k = self.keys
        keys = (k.tenants_version(), k.tenants(), k.tenant_keys())
        return decode_snapshot(await self.store.call("read_tenant_registry", keys, ()))

    async def _put(self, spec: TenantSpec, mode: str, room: int) -> int:
        k = self.keys
        args = (spec.name, spec.model_dump_json(), mode, room, k.tenants_channel())
        return int(await self.store.call("put_tenant", (k.tenants_version(), k.tenants()), args))

    async def create(
        self, spec: TenantSpec, config_names: Collection[str], max_tenants: int
    ) -> int:
        """Create ``spec``; the new version. ``config_names`` (``default`` among them) are
        refused, and count against ``max_tenants`` with the admin API's."""
        _not_config_owned(spec.name, config_names)
        v = await self._put(spec, "create", max_tenants - len(config_names))
        if v == -1:
            raise Conflict(f"tenant '{spec.name}' exists (PUT changes it)", "tenant_exists")
        if v == -2:
            raise Conflict(
                f"max_tenants ({max_tenants}) reached, the config's and default included",
                "too_many_tenants",
            )
        return v

    async def update(self, spec: TenantSpec, config_names: Collection[str]) -> int:
        """Replace the spec of a tenant the admin API created; the new version."""
        _not_config_owned(spec.name, config_names)
        v = await self._put(spec, "update", 0)
        if v == -1:
            raise TenantNotFound(f"no tenant named '{spec.name}' (POST /admin/tenants creates one)")
        return v

    async def delete(self, name: str, config_names: Collection[str]) -> tuple[int, int]:
        """Remove a tenant the admin API created, and its issued keys: (version, keys revoked)."""
        _not_config_owned(name, config_names)
        k = self.keys
        keys = (k.tenants_version(), k.tenants(), k.tenant_keys())
        raw = await self.store.call("delete_tenant", keys, (name, k.tenants_channel()))
        if int(raw[0]) == -1:
            raise TenantNotFound(f"no tenant named '{name[:64]}'")
        return int(raw[0]), int(raw[1])

    async def issue_key(
        self, tenant: str, config_names: Collection[str], max_keys: int
    ) -> tuple[IssuedKey, str]:
        """A new key for ``tenant`` (config-owned or the admin API's): its record and the key
        itself, which exists nowhere else from then on."""
        key, key_id = new_key()
        digest = key_digest(key.encode())
        k = self.keys
        args = (
            tenant,
            1 if tenant in config_names else 0,
            digest,
            key_id,
            max_keys,
            k.tenants_channel(),
        )
        keys = (k.tenants_version(), k.tenants(), k.tenant_keys())
        raw = await self.store.call("issue_key", keys, args)
        code, created = int(raw[0]), int(raw[1])
        if code == -1:
            raise TenantNotFound(f"no tenant named '{tenant[:64]}'")
        if code == -2:
            raise Conflict(f"max_tenant_keys ({max_keys}) reached", "too_many_keys")
        if code < 0:  # a 256-bit collision: not in this universe, but never a silent overwrite
            raise Conflict("the new key collided with an issued one: try again", "key_exists")
        return IssuedKey(digest, tenant, key_id, created), key

    async def revoke_key(self, tenant: str, key_id: str) -> int:
        """Revoke ``tenant``'s key ``key_id``; the new version."""
        k = self.keys
        args = (tenant, key_id, k.tenants_channel())
        v = int(await self.store.call("revoke_key", (k.tenants_version(), k.tenant_keys()), args))
        if v == -1:
            raise KeyNotFound(f"tenant '{tenant[:64]}' has no issued key '{key_id[:64]}'")
        return v


def _not_config_owned(name: str, config_names: Collection[str]) -> None:
    if name in config_names:
        raise ConfigOwned(
            f"tenant '{name}' is named in the config (or is the default tenant): "
            "change it in the config file"
        )
