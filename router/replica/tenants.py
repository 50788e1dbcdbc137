"""A replica's tenants: who a bearer key is, and the view that keeps issued keys current.

The directory maps the SHA-256 of every key a replica honours to its tenant's plan: the
config's keys (``client_keys`` are the ``default`` tenant's), hashed once at start-up, and
the keys the admin API issued (Redis holds only their hashes). A request's token is hashed
and looked up: the lookup's timing depends on the digest, never on how much of a key a
guess got right, so it tells an attacker nothing a comparison of every key would not.

The view follows ``Keys.tenants_channel`` as ``HealthView`` follows health: subscribe
first, then read the snapshot, so no change falls in between; re-read on any event newer
than the snapshot, on every reconnect, every ``replica.resync_s`` and on recovery from
degraded mode. Each read builds a whole new directory, swapped in at once: a request sees
one version. While Redis is away the last directory keeps serving (a key revoked meanwhile
is refused once Redis answers again).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from router.config import DEFAULT_TENANT, Config, SecretRef
from router.errors import ConfigError
from router.replica.background import Followed
from router.state.keys import Keys
from router.state.store import Store, TenantPlan
from router.state.tenants import EMPTY, IssuedKey, TenantsSnapshot, TenantStore, key_digest
from router.state.tenantstate import config_plans

log = logging.getLogger("router.tenants")


@dataclass(frozen=True, slots=True)
class TenantEntry:
    """A tenant as the admin API lists it: its plan, and how many keys of each kind."""

    plan: TenantPlan
    config_keys: int
    """Keys the config lists for it (they have no id: the file names them)."""
    issued: tuple[IssuedKey, ...]
    """Keys the admin API issued it, oldest first."""


def _config_keys(cfg: Config) -> dict[str, list[SecretRef]]:
    refs: dict[str, list[SecretRef]] = {DEFAULT_TENANT: list(cfg.client_keys)}
    for t in cfg.tenants:
        refs.setdefault(t.name, []).extend(t.keys)
    return refs


def config_digests(cfg: Config) -> dict[str, str]:
    """The config's keys, hashed: digest -> tenant. A key listed for two tenants is refused
    (who would it be?); the error names the tenants, never the key."""
    out: dict[str, str] = {}
    problems = []
    for tenant, refs in _config_keys(cfg).items():
        for ref in refs:
            digest = key_digest(ref.value.get_secret_value().encode())
            other = out.setdefault(digest, tenant)
            if other != tenant:
                message = f"the key in ${ref.env} belongs to tenants {other!r} and {tenant!r}"
                problems.append(("tenants", message))
    if problems:
        raise ConfigError(problems)
    return out


class TenantDirectory:
    """Every tenant a replica knows, and the hash of every key it honours; immutable (a new
    snapshot makes a new directory)."""

    def __init__(
        self,
        keys: Keys,
        config: Mapping[str, TenantPlan],
        config_digests: Mapping[str, str],
        snapshot: TenantsSnapshot = EMPTY,
    ) -> None:
        self.keys = keys
        self.snapshot = snapshot
        self.config = dict(config)
        """The config-owned tenants (``default`` first, then the file's order)."""
        self.config_digests = dict(config_digests)
        api = {
            name: TenantPlan.build(spec, keys, owner="api")
            for name, spec in sorted(snapshot.specs.items())
            # a name the config took since the API created it: the config's wins
            if name not in self.config
        }
        self.plans: dict[str, TenantPlan] = {**self.config, **api}
        """Every tenant: the config's, then the admin API's by name."""
        by_digest = {d: self.plans[t] for d, t in self.config_digests.items()}
        for k in snapshot.keys:
            plan = self.plans.get(k.tenant)  # a key of a tenant gone from the config: refused
            if plan is not None:
                by_digest.setdefault(k.digest, plan)
        self._by_digest = by_digest

    @classmethod
    def from_config(cls, cfg: Config, keys: Keys) -> TenantDirectory:
        """The directory before any snapshot: the config's tenants and keys."""
        plans = {p.name: p for p in config_plans(cfg, keys)}
        return cls(keys, plans, config_digests(cfg))

    def with_snapshot(self, snapshot: TenantsSnapshot) -> TenantDirectory:
        """This directory's config part with ``snapshot`` for the rest."""
        return TenantDirectory(self.keys, self.config, self.config_digests, snapshot)

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def config_names(self) -> frozenset[str]:
        """The names the admin API may not take or change."""
        return frozenset(self.config)

    def resolve(self, token: bytes) -> TenantPlan | None:
        """The tenant whose key ``token`` is, or None (an empty token never is one)."""
        if not token:
            return None
        return self._by_digest.get(key_digest(token))

    def entries(self) -> list[TenantEntry]:
        """Every tenant with its keys: the config's first, then the admin API's by name."""
        counts: dict[str, int] = {}
        for tenant in self.config_digests.values():
            counts[tenant] = counts.get(tenant, 0) + 1
        issued: dict[str, list[IssuedKey]] = {}
        for k in sorted(self.snapshot.keys, key=lambda k: (k.created_ms, k.id)):
            issued.setdefault(k.tenant, []).append(k)
        return [
            TenantEntry(plan, counts.get(name, 0), tuple(issued.get(name, ())))
            for name, plan in self.plans.items()
        ]


class TenantView(Followed):
    """The replica's current ``TenantDirectory``, kept in step with Redis in the background."""

    name = "tenant-view"
    what = "tenants"
    logger = "router.tenants"

    def __init__(self, tenants: TenantStore, directory: TenantDirectory, resync_s: float) -> None:
        self.tenants = tenants
        self.directory = directory
        self.resync_s = resync_s
        self.resyncs = 0

    @property
    def version(self) -> int:
        return self.directory.version

    async def resync(self) -> None:
        """Read the snapshot again and swap in its directory (raises ``StoreError``)."""
        snap = await self.tenants.read()
        old = self.directory
        self.directory = old.with_snapshot(snap)
        self.resyncs += 1
        if snap.version != old.version:
            log.info(
                "tenants changed",
                extra={
                    "fields": {
                        "version": snap.version,
                        "api_tenants": len(snap.specs),
                        "issued_keys": len(snap.keys),
                    }
                },
            )

    @property
    def store(self) -> Store:
        return self.tenants.store

    def channel(self) -> str:
        return self.tenants.keys.tenants_channel()
