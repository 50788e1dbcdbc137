"""Degraded decisions hold a tenant to its share: limits over the live replicas, and the
budget left when the replica last saw the shared spend, divided too."""

from __future__ import annotations

from router.config import TenantSpec, parse_config
from router.replica.local import LocalState
from router.state.keys import Keys
from router.state.store import Lease, Outcome, TenantPlan
from router.strategies import TenantCode

CFG = parse_config(
    {
        "client_keys": [{"env": "K"}],
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://x/v1"}],
        "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
    },
    {"K": "k"},
)
KEYS = Keys("rc", "default")


class Clock:
    def __init__(self) -> None:
        self.t = 1_780_000_000.0

    def __call__(self) -> float:
        return self.t


def plan(**spec: object) -> TenantPlan:
    return TenantPlan.build(TenantSpec.model_validate({"name": "t", **spec}), KEYS)


def test_rpm_share_over_replicas() -> None:
    local = LocalState(CFG, Clock())
    local.replicas = 2
    t = plan(limits={"rpm": 20})
    admitted = 0
    for _ in range(15):
        if local.tenant_check(t, 10, 0, counted=True, in_flight=0) is TenantCode.OK:
            local.tenant_admitted(t, 10, True, None, 0)
            admitted += 1
    assert admitted == 10


def test_failover_attempts_are_not_counted_twice() -> None:
    local = LocalState(CFG, Clock())
    t = plan(limits={"rpm": 1})
    assert local.tenant_check(t, 1, 0, counted=True, in_flight=0) is TenantCode.OK
    local.tenant_admitted(t, 1, True, None, 0)
    assert local.tenant_check(t, 1, 0, counted=True, in_flight=0) is TenantCode.RPM
    assert local.tenant_check(t, 1, 0, counted=False, in_flight=0) is TenantCode.OK


def test_in_flight_share() -> None:
    local = LocalState(CFG, Clock())
    local.replicas = 3
    t = plan(limits={"max_in_flight": 7})  # 2 each
    assert local.tenant_check(t, 0, 0, counted=True, in_flight=1) is TenantCode.OK
    assert local.tenant_check(t, 0, 0, counted=True, in_flight=2) is TenantCode.IN_FLIGHT


def test_budget_share_is_of_what_was_left_when_last_seen() -> None:
    clock = Clock()
    local = LocalState(CFG, clock)
    local.replicas = 2
    t = plan(budget={"usd": 0.000010, "period": "day"})  # 10,000 nano-USD
    # a shared decision said 6,000 were spent: 4,000 left, 2,000 for this replica alone
    local.tenant_admitted(t, 0, True, 6_000, 1_000)
    assert local.tenant_check(t, 0, 1_500, counted=True, in_flight=0) is TenantCode.OK
    local.tenant_admitted(t, 0, True, None, 1_500)
    assert local.tenant_check(t, 0, 1_000, counted=True, in_flight=0) is TenantCode.BUDGET
    # the request cost 300 in the end: 1,200 come back to this replica's share
    pid = local._tenants["t"].period
    lease = Lease("x", "p", 0, 0, True, "t", "m", 0, 1_500, pid)
    local.tenant_released(lease, Outcome("ok", spend_correction=-1_200))
    assert local.tenant_check(t, 0, 1_000, counted=True, in_flight=0) is TenantCode.OK
    refused = local.tenant_refused(t, TenantCode.BUDGET)
    assert 0 < refused.wait_ms <= 86_400_000
    # a new day: a new period, nothing spent (half the budget for each of the two)
    clock.t += 86_400
    assert local.tenant_check(t, 0, 5_000, counted=True, in_flight=0) is TenantCode.OK
    assert local.tenant_check(t, 0, 5_001, counted=True, in_flight=0) is TenantCode.BUDGET


def test_period_bounds() -> None:
    from router.budgets import period_bounds, period_end, period_id
    from router.config import BudgetPeriod

    for sec in (0, 86_399, 86_400, 1_796_169_599, 1_796_169_600, 1_798_761_599, 4_102_444_799):
        for p in BudgetPeriod:
            pid, start, end = period_bounds(p, sec)
            assert start <= sec < end
            assert (pid, end) == (period_id(p, sec), period_end(p, sec))
            assert period_id(p, start) == pid != period_id(p, start - 1)
