"""Local balancing for when Redis is unreachable: the replica's share of every limit.

While degraded, a replica decides alone with the same pure strategies (``strategies.py``)
over what it knows locally: the last health snapshot, its own in-flight leases, its own
cooldowns, and its own admissions in a sliding window, checked against its share of each
limit (the limit divided by the number of live replicas it last saw, at least 1). Its own
admissions are recorded in both modes, so the windows are right the moment Redis goes away.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from router.budgets import period_end, period_id
from router.config import BudgetPeriod, Config, Strategy
from router.state.health import ProviderHealth
from router.state.keys import WINDOW_BUCKETS
from router.state.store import Candidate, Decision, Lease, Outcome, RoutePlan, TenantPlan
from router.strategies import (
    Code,
    TargetView,
    TenantCode,
    TenantUse,
    choose,
    eligibility,
    tenant_verdict,
)

WINDOW_MS = WINDOW_BUCKETS * 1000
LOOK_AGAIN_MS = 1000
"""A queued request held back by a local limit looks again this often (or on a release)."""


@dataclass(slots=True)
class _Window:
    """This replica's own admissions to one provider over the sliding window."""

    log: deque[tuple[int, int, int]] = field(default_factory=deque)
    requests: int = 0
    tokens: int = 0

    def prune(self, now_ms: int) -> None:
        while self.log and self.log[0][0] <= now_ms - WINDOW_MS:
            _, tokens, requests = self.log.popleft()
            self.requests -= requests
            self.tokens -= tokens

    def add(self, now_ms: int, tokens: int, requests: int = 1) -> None:
        self.log.append((now_ms, tokens, requests))
        self.requests += requests
        self.tokens += tokens


def _wait_ms(views: Sequence[TargetView], candidates: Sequence[Candidate], now: int) -> int:
    """When a target may take the request, as acquire.lua's wait says it: -2 when none ever
    will by waiting (excluded, down, drained, or the request over its TPM limit), else the
    soonest end of a circuit or cooldown, and a second for a limit (the local window is not
    worth the script's arithmetic: a second is how often a queued request looks again)."""
    wait = -2
    for v, c in zip(views, candidates, strict=True):
        if c.code < Code.COOLING or c.code is Code.DRAINED or 0 < v.tpm < v.tokens:
            continue
        w = max(0, v.cooling_until_ms - now, v.circuit_until_ms - now)
        if c.code in (Code.FULL, Code.RPM, Code.TPM):
            w = max(w, LOOK_AGAIN_MS)
        wait = w if wait == -2 else min(wait, w)
    return wait


def _share(limit: int | None, replicas: int) -> int:
    return max(1, limit // replicas) if limit else 0


@dataclass(slots=True)
class _TenantLocal:
    """What this replica knows of one tenant: its own admissions, and its spend."""

    window: _Window = field(default_factory=_Window)
    period: int = -1
    """The spend period the two figures below are of."""
    seen: int = 0
    """The tenant's spend as the shared state last told this replica (nano-USD)."""
    own: int = 0
    """What this replica admitted since it last saw the shared spend while deciding alone:
    reservations, corrected to the reported cost as they end."""


class LocalState:
    """What one replica knows alone, and its decisions while the shared store is away."""

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.replicas = 1
        """Live replicas last seen in the shared state (set by the heartbeat)."""
        self._windows: dict[str, _Window] = defaultdict(_Window)
        self._cooldowns: dict[str, int] = {}
        self._rotation: dict[str, int] = defaultdict(int)
        self._swrr: dict[str, list[int]] = {}
        self._tenants: dict[str, _TenantLocal] = defaultdict(_TenantLocal)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def admitted(self, provider: str, tokens: int) -> None:
        """Record one admission of ours (in either mode)."""
        now = self.now_ms()
        window = self._windows[provider]
        window.prune(now)
        window.add(now, tokens)

    def _tenant(self, tenant: TenantPlan, now: int) -> _TenantLocal:
        t = self._tenants[tenant.name]
        t.window.prune(now)
        pid = period_id(tenant.period or BudgetPeriod.MONTH, now // 1000)
        if t.period != pid:
            t.period, t.seen, t.own = pid, 0, 0
        return t

    def tenant_admitted(
        self, tenant: TenantPlan, tokens: int, counted: bool, spent: int | None, cost: int
    ) -> None:
        """Record one admission of ``tenant`` (in either mode): ``spent`` is its spend as
        the shared decision returned it (``None``: decided here alone, ``cost`` reserved)."""
        now = self.now_ms()
        t = self._tenant(tenant, now)
        t.window.add(now, tokens, 1 if counted else 0)  # a failover attempt: tokens only
        if spent is None:
            t.own += cost
        else:
            t.seen, t.own = spent, 0

    def tenant_released(self, lease: Lease, outcome: Outcome) -> None:
        """A lease taken here alone ended: its cost becomes what was charged."""
        if lease.tenant and lease.local:
            t = self._tenants[lease.tenant]
            if t.period == lease.period:
                t.own += outcome.spend_correction

    def tenant_check(
        self, tenant: TenantPlan, tokens: int, cost: int, *, counted: bool, in_flight: int
    ) -> TenantCode:
        """Whether ``tenant`` may have a request decided here alone: its limits divided by
        the live replicas, and its budget left when this replica last saw it, divided too."""
        now = self.now_ms()
        t = self._tenant(tenant, now)
        n = max(1, self.replicas)
        left = max(0, tenant.budget_nano - t.seen) // n if tenant.budget_nano else 0
        use = TenantUse(
            rpm=_share(tenant.rpm, n),
            tpm=_share(tenant.tpm, n),
            max_in_flight=_share(tenant.max_in_flight, n),
            budget=left if tenant.budget_nano else 0,
            in_flight=in_flight,
            rpm_used=t.window.requests,
            tpm_used=t.window.tokens,
            spent=t.own,
        )
        if tenant.budget_nano and left <= 0:
            return TenantCode.BUDGET
        return tenant_verdict(use, tokens, cost, counted)

    def tenant_refused(self, tenant: TenantPlan, code: TenantCode) -> Decision:
        """The decision for a tenant refused here alone."""
        now = self.now_ms()
        wait = LOOK_AGAIN_MS
        if code is TenantCode.IN_FLIGHT:
            wait = -1
        elif code is TenantCode.BUDGET:
            end = period_end(tenant.period or BudgetPeriod.MONTH, now // 1000)
            wait = end * 1000 - now
        t = self._tenants[tenant.name]
        return Decision(None, now, now // 1000, wait, (), code, t.seen + t.own)

    def cool(self, provider: str, cooldown_ms: int) -> None:
        """Remember a provider's 429 cooldown."""
        until = self.now_ms() + cooldown_ms
        self._cooldowns[provider] = max(self._cooldowns.get(provider, 0), until)

    def acquire(
        self,
        plan: RoutePlan,
        tokens: Sequence[int],
        excluded: Sequence[bool],
        *,
        in_flight: Mapping[str, int],
        health: Mapping[str, ProviderHealth],
        rand: int,
        expected_output: int,
    ) -> Decision:
        """Choose a target locally; record the admission like the acquire script would."""
        now = self.now_ms()
        views = [
            self._view(name, plan, i, tokens[i], excluded[i], in_flight, health, now)
            for i, name in enumerate(plan.providers)
        ]
        route = plan.route.model
        if plan.route.strategy is Strategy.ROUND_ROBIN:
            self._rotation[route] += 1
        swrr = self._swrr.setdefault(route, [0] * len(views))
        choice = choose(
            plan.route.strategy,
            views,
            now,
            rotation=self._rotation[route],
            rand=rand,
            swrr=swrr,
            expected_output=expected_output,
        )
        if choice.index is not None:
            self._swrr[route] = list(choice.swrr) or swrr
            self.admitted(plan.providers[choice.index], tokens[choice.index])
        candidates = tuple(
            Candidate(name, eligibility(v, now), v.in_flight, v.rpm_used, v.tpm_used, "local")
            for name, v in zip(plan.providers, views, strict=True)
        )
        wait = 0 if choice.index is not None else _wait_ms(views, candidates, now)
        return Decision(choice.index, now, now // 1000, wait, candidates)

    def _view(
        self,
        name: str,
        plan: RoutePlan,
        i: int,
        tokens: int,
        excluded: bool,
        in_flight: Mapping[str, int],
        health: Mapping[str, ProviderHealth],
        now: int,
    ) -> TargetView:
        limits = self.cfg.provider(name).limits
        window = self._windows[name]
        window.prune(now)
        h = health.get(name, ProviderHealth())
        n = max(1, self.replicas)
        return TargetView(
            weight=plan.static[i][3],
            rpm=_share(limits.rpm, n),
            tpm=_share(limits.tpm, n),
            max_in_flight=_share(limits.max_in_flight, n),
            tokens=tokens,
            in_flight=in_flight.get(name, 0),
            rpm_used=window.requests,
            tpm_used=window.tokens,
            cooling_until_ms=self._cooldowns.get(name, 0),
            healthy=h.health != "down",
            drained=h.drained,
            circuit_until_ms=h.circuit_until_ms if h.circuit else 0,
            excluded=excluded,
        )
