"""See the tenants: each one's RPM and TPM used, requests in flight and spend this period.

A script call (``read_tenants.lua``) reads up to ``TENANTS_PER_CALL`` tenants at one instant
of Redis time, without changing anything. The windows are what acquire would count now: the
hash's running totals less the buckets that left the window since the last acquire slid it
(or the buckets still in it, when those are fewer). The spend field ``sp`` is of the period
``per`` names: it counts only when that is the tenant's current budget period, computed here
from the script's own clock by ``router.budgets.period_id``, the function the acquire script
is held equal to.

Public for every reader: the state poller's gauges, ``GET /admin/tenants`` and ``routerctl
tenants``. A tenant is given as its ``TenantPlan`` (its keys, limits and budget), so the
admin API's tenants are read like the config's. Nothing here is a secret.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.budgets import NANO, period_id, period_label
from router.config import DEFAULT_TENANT, Config, TenantSpec
from router.state.keys import TENANT_LIVE, TENANT_LIVE_FORMAT, WINDOW_BUCKETS, Keys
from router.state.store import Store, TenantPlan, decode_text


@dataclass(frozen=True, slots=True)
class TenantState:
    """One tenant as every replica sees it: its use against its limits and budget."""

    name: str
    owner: str
    """``config`` or ``api`` (created through the admin API)."""
    in_flight: int
    max_in_flight: int | None
    rpm_used: int
    rpm_limit: int | None
    tpm_used: int
    tpm_limit: int | None
    budget_nano: int | None
    """The spend cap per period (nano-USD); ``None``: no budget."""
    budget_period: str | None
    """``day``, ``week`` or ``month``; ``None``: no budget."""
    period_label: str | None
    """The current budget period as people write it (``2026-12``); ``None``: no budget."""
    spend_nano: int
    """Spend this budget period (served requests' cost plus the worst case of those in
    flight); 0 without a budget."""

    @property
    def spend_usd(self) -> float:
        return self.spend_nano / NANO

    @property
    def budget_usd(self) -> float | None:
        return None if self.budget_nano is None else self.budget_nano / NANO


def config_plans(cfg: Config, keys: Keys) -> list[TenantPlan]:
    """The config's tenants, ``default`` first (the config's entry of that name, else an
    unlimited one): the tenants known without the admin API's directory."""
    named = [t for t in cfg.tenants if t.name != DEFAULT_TENANT]
    spec = cfg.tenant(DEFAULT_TENANT) or TenantSpec(name=DEFAULT_TENANT)
    return [TenantPlan.build(spec, keys), *(TenantPlan.build(t, keys) for t in named)]


TENANTS_PER_CALL = 32
"""Tenants read by one script call. A call blocks Redis while it runs: its worst case (each
tenant's window half slid, so 31 buckets read each) took 22 ms of Redis time for 256 tenants
in one call on the benchmark machine, about 3 ms for 32; a tenant slid this second or idle
for a window costs 5 us."""


async def read_tenants(store: Store, tenants: Sequence[TenantPlan]) -> list[TenantState]:
    """The state of ``tenants``, in their order: each tenant read consistently (its window,
    leases and spend at one instant), one script call per ``TENANTS_PER_CALL`` of them, none
    for no tenant. Raises ``StoreError``."""
    out: list[TenantState] = []
    for i in range(0, len(tenants), TENANTS_PER_CALL):
        chunk = tenants[i : i + TENANTS_PER_CALL]
        keys = [k for plan in chunk for k in plan.keys]
        raw = await store.call("read_tenants", keys, (WINDOW_BUCKETS,))
        out += decode_tenants(raw, chunk)
    return out


def decode_tenants(raw: Sequence[Any], tenants: Sequence[TenantPlan]) -> list[TenantState]:
    """``read_tenants.lua``'s answer as one ``TenantState`` per plan."""
    sec = int(raw[0])
    out = []
    for i, plan in enumerate(tenants):
        rpm, tpm, in_flight, per, sp = raw[2 + 5 * i : 7 + 5 * i]
        out.append(_tenant(plan, int(rpm), int(tpm), int(in_flight), decode_text(per), sp, sec))
    return out


def _tenant(
    plan: TenantPlan, rpm: int, tpm: int, in_flight: int, per: str, sp: Any, sec: int
) -> TenantState:
    period = plan.period if plan.budget_nano else None
    current = period is not None and per.isdigit() and int(per) == period_id(period, sec)
    return TenantState(
        name=plan.name,
        owner=plan.owner,
        in_flight=in_flight,
        max_in_flight=plan.max_in_flight or None,
        rpm_used=rpm,
        rpm_limit=plan.rpm or None,
        tpm_used=tpm,
        tpm_limit=plan.tpm or None,
        budget_nano=plan.budget_nano if period is not None else None,
        budget_period=period.value if period is not None else None,
        period_label=period_label(period, sec) if period is not None else None,
        spend_nano=int(decode_text(sp)) if current else 0,  # read_tenants.lua: an integer
    )


def tenant_json(state: TenantState) -> dict[str, Any]:
    """The JSON form of one tenant's state: its fields, with spend and budget in dollars too."""
    return {
        "name": state.name,
        "owner": state.owner,
        "in_flight": state.in_flight,
        "max_in_flight": state.max_in_flight,
        "rpm_used": state.rpm_used,
        "rpm_limit": state.rpm_limit,
        "tpm_used": state.tpm_used,
        "tpm_limit": state.tpm_limit,
        "budget_period": state.budget_period,
        "period_label": state.period_label,
        "spend_nano": state.spend_nano,
        "spend_usd": state.spend_usd,
        "budget_nano": state.budget_nano,
        "budget_usd": state.budget_usd,
    }


LIVE_NAMES = tuple(name for name, _ in TENANT_LIVE)


def unpack_live(raw: bytes | None) -> dict[str, int]:
    """A tenant's live string as its fields (``TENANT_LIVE``); ``None`` (no such key) as a
    tenant with nothing yet."""
    if raw is None:
        return {name: (-1 if name == "period" else 0) for name in LIVE_NAMES}
    return {
        k: int(v) for k, v in zip(LIVE_NAMES, struct.unpack(TENANT_LIVE_FORMAT, raw), strict=True)
    }


def pack_live(**fields: int) -> bytes:
    """A tenant's live string with ``fields`` set (the rest as a tenant with nothing yet)."""
    values = {**unpack_live(None), **fields}
    return struct.pack(TENANT_LIVE_FORMAT, *(float(values[n]) for n in LIVE_NAMES))
