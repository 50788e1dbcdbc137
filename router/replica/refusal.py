"""Why no target could take a request, as the client is told: no room, or an outage.

    a target in service but full (our limits, the provider's 429 cooldown)  -> 429 Saturated
    every target down, drained, or its circuit open                         -> 503 Unavailable

A mix is a lack of room (429): the full targets will have room again, and the client should
come back then. A 503 names why each target is out (a 429 there would hide an outage), with
Retry-After when an open circuit's trial time is known. Targets that cannot take this request
at all (excluded, or the request is over their TPM limit) count as neither: with nothing
else left the answer is 503 too. The rule reads only the decision's per-target codes and
wait, so the shared and the local (degraded) decisions are told alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.budgets import usd
from router.errors import QuotaExceeded, Saturated, TenantLimited, Unavailable
from router.state.store import Decision, RoutePlan, TenantPlan
from router.strategies import CAPACITY, Code, TenantCode

REASONS: dict[Code, str] = {
    Code.OK: "has room",
    Code.EXCLUDED: "excluded (already tried, or it cannot serve this request)",
    Code.UNHEALTHY: "down (failing health checks)",
    Code.COOLING: "cooling down after the provider's 429",
    Code.FULL: "at its in-flight limit",
    Code.RPM: "at its RPM limit",
    Code.TPM: "at its TPM limit",
    Code.DRAINED: "drained by an operator",
    Code.CIRCUIT: "circuit open after failed requests",
    Code.UNSEEN: "not looked at",
}
OVERSIZE = "the request is over its TPM limit"


def refusal(plan: RoutePlan, tokens: Sequence[int], d: Decision) -> Saturated | Unavailable:
    """The error for a decision that chose no target, before any attempt was made."""
    reasons, room_later = [], False
    for i, c in enumerate(d.candidates):
        oversize = c.code is Code.TPM and 0 < plan.static[i][1] < tokens[i]
        room_later = room_later or (c.code in CAPACITY and not oversize)
        reasons.append(f"{c.provider}: {OVERSIZE if oversize else REASONS[c.code]}")
    model, detail = plan.route.model, "; ".join(reasons)
    if room_later:
        retry = d.wait_ms / 1000 if d.wait_ms > 0 else 1.0
        return Saturated(f"no provider of route {model} has room now ({detail})", retry)
    # only an open circuit gives the wait a meaning here: when its trial may go
    circuit = any(c.code is Code.CIRCUIT for c in d.candidates)
    retry = d.wait_ms / 1000 if circuit and d.wait_ms > 0 else 0.0
    return Unavailable(f"no provider of route {model} is in service ({detail})", retry)


TENANT_CODES: dict[TenantCode, tuple[str, str]] = {
    TenantCode.IN_FLIGHT: ("tenant_in_flight_exceeded", "its limit of {} requests in flight"),
    TenantCode.RPM: ("tenant_rpm_exceeded", "its limit of {} requests per minute"),
    TenantCode.TPM: ("tenant_tpm_exceeded", "its limit of {} tokens per minute"),
}
"""Each tenant limit's error code and how a refusal names it."""


def tenant_refusal(tenant: TenantPlan, d: Decision) -> TenantLimited:
    """The error for a decision the tenant's own limits refused (429, with the shared
    state's Retry-After; none when waiting cannot help: the request alone is too large)."""
    never = d.wait_ms == -2
    retry = None if never else (d.wait_ms / 1000 if d.wait_ms > 0 else 1.0)
    if d.tenant_code is TenantCode.BUDGET:
        budget = f"${usd(tenant.budget_nano):.2f} per {tenant.period or 'month'}"
        if never:
            return QuotaExceeded(
                f"tenant {tenant.name}: the request's worst-case cost is over its budget of "
                f"{budget}",
                None,
            )
        return QuotaExceeded(
            f"tenant {tenant.name} has spent its budget of {budget} "
            f"(${usd(d.spent_nano):.6f} spent or reserved this period); it resets when the "
            "period ends",
            retry,
        )
    code, text = TENANT_CODES[d.tenant_code]
    limit = {
        TenantCode.IN_FLIGHT: tenant.max_in_flight,
        TenantCode.RPM: tenant.rpm,
        TenantCode.TPM: tenant.tpm,
    }[d.tenant_code]
    if never:
        return TenantLimited(
            f"tenant {tenant.name}: the request alone is over {text.format(limit)}", code, None
        )
    return TenantLimited(f"tenant {tenant.name} is at {text.format(limit)}", code, retry)
