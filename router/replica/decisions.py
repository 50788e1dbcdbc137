"""The decision log: one JSON line per balancing decision (logger ``router.decision``, set by
``log.decisions``), with every candidate's figures as the acquire script saw them."""

from __future__ import annotations

import time

from router.config import Route
from router.state.store import Decision, QueueState
from router.strategies import PinOutcome, TenantCode
from router.telemetry.logs import decision_log, decisions_logged


def log_decision(
    request_id: str,
    route: Route,
    decision: Decision,
    attempt: int,
    started_ns: int,
    tenant: str | None = None,
) -> None:
    """Log one decision: whose request, every candidate's figures, the choice and why, and
    its cost."""
    if not decisions_logged():
        return
    chosen = decision.candidates[decision.index] if decision.index is not None else None
    fields = {
        "request_id": request_id,
        "tenant": tenant,
        "route": route.model,
        "strategy": route.strategy.value,
        "attempt": attempt,
        "chosen": chosen.provider if chosen else None,
        "reason": _reason(route, decision),
        "wait_ms": decision.wait_ms if chosen is None else 0,
        "tenant_spend_nano": decision.spent_nano if tenant else None,
        "pin": decision.pin.name.lower() if decision.pin is not PinOutcome.NONE else None,
        "pinned": decision.pinned or None,
        "decision_us": (time.perf_counter_ns() - started_ns) // 1000,
        "candidates": [
            {
                "provider": c.provider,
                "state": c.code.name.lower(),
                "in_flight": c.in_flight,
                "rpm": c.rpm_used,
                "tpm": c.tpm_used,
                "score": c.score,
            }
            for c in decision.candidates
        ],
    }
    decision_log.info("decision", extra={"fields": fields})


_WHY = {
    "round_robin": "next in the shared rotation with room",
    "weighted": "largest smooth weighted round-robin weight",
    "least_connections": "fewest in flight per weight",
    "least_latency": "lowest expected latency x (in flight + 1)",
    "headroom": "most limit left",
}


_PIN_WHY = {
    PinOutcome.HIT: "its affinity pin",
    PinOutcome.NEW: "consistent hashing of its affinity key (no pin yet; pinned now)",
    PinOutcome.SPILLED: "the pinned (or hashed) target was full, so {why}; pinned there now",
    PinOutcome.MOVED: "the pinned target was out of service, so {why}; pinned there now",
}


def _reason(route: Route, decision: Decision) -> str:
    if decision.index is not None:
        why = _WHY[route.strategy.value]
        return _PIN_WHY.get(decision.pin, "{why}").format(why=why)
    if decision.pin is PinOutcome.PIN_UNAVAILABLE:
        return f"the provider its response is pinned to ({decision.pinned}) cannot take it"
    if decision.pin is PinOutcome.FOREIGN:
        return "its previous response is another tenant's"
    if decision.tenant_code is not TenantCode.OK:
        return f"the tenant is at its limit: {decision.tenant_code.name.lower()}"
    if decision.queue_state is QueueState.WAITING:
        return (
            f"waits its turn: place {decision.queue_rank + 1} of {decision.queue_length} in "
            "the route's queue (priority band, then the tenants' weighted fair share)"
        )
    if decision.queue_state is QueueState.FULL:
        return f"the route's queue is full ({decision.queue_length} waiting)"
    if decision.queue_state is QueueState.BEHIND:
        return f"{decision.queue_length} requests wait before it, and it may wait no longer"
    states = sorted({c.code.name.lower() for c in decision.candidates})
    return "no target has room: " + ", ".join(states)
