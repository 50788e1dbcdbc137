"""The five balancing strategies as pure functions: the readable specification.

The shared, atomic decision is made by ``lua/acquire.lua``; these functions say the same
thing in Python, serve tests (a property test feeds both the same state and asserts the same
choice) and explain the rules. Nothing here imports redis; time and randomness come in as
arguments.

- ``round_robin``: one rotation shared by every replica; the first eligible target from the
  counter's position.
- ``weighted``: smooth weighted round robin as nginx does it: each eligible target gains its
  weight, the largest current weight wins and pays back the total of the eligible weights.
- ``least_connections``: fewest requests in flight (cluster-wide) relative to weight.
- ``least_latency``: lowest expected cost ``(ttft + tpot * expected_output) * (in_flight + 1)``,
  from peak EWMAs of time to first token and time per output token (Peak EWMA, as in
  Finagle and Linkerd: a slow sample counts at once, faster ones decay in over time), with
  the in-flight count as the load penalty. Targets with no samples cost 0 and are tried first.
- ``headroom``: most remaining capacity, the smallest of the RPM, TPM and in-flight
  fractions left after this request.

Ties in the last three are broken by scanning from a random start, so equal targets share
the load.

Affinity (``place``) comes before the strategy: a request whose key is pinned goes to its
pinned target while that target can take it; a key with no pin goes to its consistent-hashing
choice (rendezvous order, computed by the caller) unless that target would then hold more than
``load_factor`` times the mean in flight of the eligible targets (consistent hashing with
bounded loads, Mirrokni, Thorup and Zadimoghaddam 2018); otherwise the strategy chooses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from math import ceil

from router.config import Strategy


class Code(IntEnum):
    """Why a target can or cannot take a request now (the numbers are the Lua script's)."""

    OK = 0
    EXCLUDED = 1
    UNHEALTHY = 2
    COOLING = 3
    FULL = 4
    RPM = 5
    TPM = 6
    DRAINED = 7
    CIRCUIT = 8
    UNSEEN = 9
    """Not looked at: round robin (without the decision log's detail) stops at the first
    target in the rotation with room; the script never reports this with detail."""


class TenantCode(IntEnum):
    """Why a tenant cannot take a request now (the numbers are the Lua script's)."""

    OK = 0
    IN_FLIGHT = 1
    RPM = 2
    TPM = 3
    BUDGET = 4


@dataclass(frozen=True, slots=True)
class TenantUse:
    """What a decision sees of a tenant: its limits (0 = unlimited) and its use now."""

    rpm: int = 0
    tpm: int = 0
    max_in_flight: int = 0
    budget: int = 0
    """Spend cap this period, nano-USD (0: none)."""
    in_flight: int = 0
    rpm_used: int = 0
    tpm_used: int = 0
    spent: int = 0
    """Spend this period, nano-USD, the reservations in flight included."""


def tenant_verdict(t: TenantUse, tokens: int, cost: int, counted: bool = True) -> TenantCode:
    """Whether the tenant can take a request reserving ``tokens`` and ``cost``; checked
    before any target, in this order. ``counted``: the request counts in its RPM (a
    failover attempt of a request already counted does not)."""
    checks = (
        (0 < t.max_in_flight <= t.in_flight, TenantCode.IN_FLIGHT),
        (counted and t.rpm > 0 and t.rpm_used + 1 > t.rpm, TenantCode.RPM),
        (t.tpm > 0 and t.tpm_used + tokens > t.tpm, TenantCode.TPM),
        (t.budget > 0 and t.spent + cost > t.budget, TenantCode.BUDGET),
    )
    return next((code for failed, code in checks if failed), TenantCode.OK)


class PinOutcome(IntEnum):
    """What affinity did for a decision (the numbers are the Lua script's)."""

    NONE = 0
    """No pin took part: no key, no pin of a required key, or no target could take it."""
    HIT = 1
    """The pinned target took it."""
    NEW = 2
    """No pin: its consistent-hashing choice took it, and is pinned now."""
    SPILLED = 3
    """The pinned (or consistent-hashing) target was only full: another took it, and is
    pinned now."""
    MOVED = 4
    """The pinned target was out of service (down, drained, circuit open, or excluded by this
    request's failover): another took it, and is pinned now."""
    PIN_UNAVAILABLE = 5
    """A required pin's target cannot take it now: nothing leased."""
    FOREIGN = 6
    """A required pin of another tenant: treated as absent, nothing leased or said of it."""


PIN_REFRESH = 0.9
"""A pin is written again when used with less than this fraction of its TTL left: a hot pin
costs one read per request, and lives between 0.9 and 1 TTL after its last use."""


def pin_due(expires_ms: int, now_ms: int, ttl_ms: int) -> bool:
    """Whether a pin used now is written again (its expiry pushed back)."""
    return expires_ms - now_ms < PIN_REFRESH * ttl_ms


CAPACITY = frozenset({Code.COOLING, Code.FULL, Code.RPM, Code.TPM})
"""In service but without room now (one of our limits, or the provider's 429 cooldown):
waiting helps, and a client refused for it is told 429."""
OUT_OF_SERVICE = frozenset({Code.UNHEALTHY, Code.DRAINED, Code.CIRCUIT})
"""Down by healthd's probes, drained by an operator, or its circuit open after failed
requests: an outage, which a client refused for it is told as 503."""


@dataclass(frozen=True, slots=True)
class TargetView:
    """What a decision sees of one target: its limits, shared figures and this request."""

    weight: int = 1
    rpm: int = 0
    """Limits; 0 means unlimited."""
    tpm: int = 0
    max_in_flight: int = 0
    tokens: int = 0
    """Tokens this request would reserve on this target."""
    in_flight: int = 0
    rpm_used: int = 0
    tpm_used: int = 0
    ttft: float = 0.0
    tpot: float = 0.0
    cooling_until_ms: int = 0
    healthy: bool = True
    excluded: bool = False
    drained: bool = False
    circuit_until_ms: int = 0
    """An open circuit (or its half-open trial) blocks the target until then."""


def eligibility(t: TargetView, now_ms: int) -> Code:
    """Whether ``t`` can take the request now, and if not, the first reason why."""
    checks = (
        (t.excluded, Code.EXCLUDED),
        (t.drained, Code.DRAINED),
        (not t.healthy, Code.UNHEALTHY),
        (t.circuit_until_ms > now_ms, Code.CIRCUIT),
        (t.cooling_until_ms > now_ms, Code.COOLING),
        (0 < t.max_in_flight <= t.in_flight, Code.FULL),
        (t.rpm > 0 and t.rpm_used + 1 > t.rpm, Code.RPM),
        (t.tpm > 0 and t.tpm_used + t.tokens > t.tpm, Code.TPM),
    )
    return next((code for failed, code in checks if failed), Code.OK)


def latency_cost(t: TargetView, expected_output: int) -> float:
    """Expected cost of sending the request to ``t`` (lower is better)."""
    return (t.ttft + t.tpot * expected_output) * (t.in_flight + 1)


def headroom(t: TargetView) -> float:
    """Smallest fraction of any limit left after this request (higher is better)."""
    h = 1.0
    if t.rpm > 0:
        h = min(h, (t.rpm - t.rpm_used - 1) / t.rpm)
    if t.tpm > 0:
        h = min(h, (t.tpm - t.tpm_used - t.tokens) / t.tpm)
    if t.max_in_flight > 0:
        h = min(h, (t.max_in_flight - t.in_flight - 1) / t.max_in_flight)
    return h


def _better(strategy: Strategy, a: TargetView, b: TargetView, expected_output: int) -> bool:
    if strategy is Strategy.LEAST_CONNECTIONS:
        return a.in_flight * b.weight < b.in_flight * a.weight
    if strategy is Strategy.LEAST_LATENCY:
        return latency_cost(a, expected_output) < latency_cost(b, expected_output)
    return headroom(a) > headroom(b)


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen target index (``None`` when none is eligible) and the new SWRR state."""

    index: int | None
    swrr: tuple[int, ...] = ()


def smooth_weighted(
    weights: Sequence[int], current: Sequence[int], eligible: Sequence[bool]
) -> Choice:
    """nginx's smooth weighted round robin over the eligible targets."""
    cw = list(current)
    total, best = 0, None
    for i, w in enumerate(weights):
        if eligible[i]:
            cw[i] += w
            total += w
            if best is None or cw[i] > cw[best]:
                best = i
    if best is not None:
        cw[best] -= total
    return Choice(best, tuple(cw))


def choose(
    strategy: Strategy,
    targets: Sequence[TargetView],
    now_ms: int,
    *,
    rotation: int,
    rand: int,
    swrr: Sequence[int],
    expected_output: int,
) -> Choice:
    """Pick a target; ``rotation`` is the shared counter after its increment."""
    eligible = [eligibility(t, now_ms) is Code.OK for t in targets]
    if not any(eligible):
        return Choice(None, tuple(swrr))
    if strategy is Strategy.WEIGHTED:
        return smooth_weighted([t.weight for t in targets], swrr, eligible)
    n = len(targets)
    start = rotation if strategy is Strategy.ROUND_ROBIN else rand
    best: int | None = None
    for k in range(n):
        i = (start + k) % n
        if not eligible[i]:
            continue
        if best is None:
            best = i
            if strategy is Strategy.ROUND_ROBIN:
                break
        elif _better(strategy, targets[i], targets[best], expected_output):
            best = i
    return Choice(best, tuple(swrr))


def bounded_hash(
    targets: Sequence[TargetView],
    eligible: Sequence[bool],
    order: Sequence[int],
    load_factor: float,
) -> tuple[int | None, int | None]:
    """Consistent hashing with bounded loads: the first eligible target of ``order`` (0-based
    indices, rendezvous order) whose in flight, with this request, stays within
    ``ceil(load_factor * (in flight over the eligible + 1) / eligible count)``; and the first
    eligible target of ``order`` (the unbounded choice). Some eligible target always fits (the
    least loaded is at most the mean), so ``None`` means ``order`` named none of them."""
    live = [t for t, ok in zip(targets, eligible, strict=True) if ok]
    if not live:
        return None, None
    cap = ceil(load_factor * (sum(t.in_flight for t in live) + 1) / len(live))
    first = None
    for i in order:
        if 0 <= i < len(targets) and eligible[i]:
            first = i if first is None else first
            if targets[i].in_flight + 1 <= cap:
                return i, first
    return None, first


@dataclass(frozen=True, slots=True)
class PinView:
    """What a decision knows of a request's pin: the pinned provider (``None``: no pin) and,
    for a key with none, its consistent-hashing order."""

    pin: str | None
    order: Sequence[int] = ()
    """0-based target indices, the key's rendezvous order (``router.state.affinity``)."""
    load_factor: float = 1.25
    required: bool = False
    """A response id's pin: honoured or nothing is leased; never made here."""


def place(
    strategy: Strategy,
    targets: Sequence[TargetView],
    providers: Sequence[str],
    now_ms: int,
    affinity: PinView,
    *,
    rotation: int,
    rand: int,
    swrr: Sequence[int],
    expected_output: int,
) -> tuple[Choice, PinOutcome]:
    """Pick a target for a request with an affinity key, and say what the pin did. The
    strategy (``choose``, whose arguments follow) decides only when the pin does not, and only
    then does its state (the rotation, the SWRR weights) move."""
    codes = [eligibility(t, now_ms) for t in targets]
    pinned = providers.index(affinity.pin) if affinity.pin in providers else None
    kept = Choice(None, tuple(swrr))
    if pinned is not None and codes[pinned] is Code.OK:
        return replace(kept, index=pinned), PinOutcome.HIT
    if affinity.required and affinity.pin is not None:
        return kept, PinOutcome.PIN_UNAVAILABLE
    chosen = choose(
        strategy, targets, now_ms, rotation=rotation, rand=rand, swrr=swrr,
        expected_output=expected_output,
    )  # fmt: skip
    if chosen.index is None or affinity.required:
        return chosen, PinOutcome.NONE
    if pinned is not None:
        gone = codes[pinned] in OUT_OF_SERVICE or codes[pinned] is Code.EXCLUDED
        return chosen, PinOutcome.MOVED if gone else PinOutcome.SPILLED
    eligible = [c is Code.OK for c in codes]
    pick, first = bounded_hash(targets, eligible, affinity.order, affinity.load_factor)
    if pick is not None:
        return replace(kept, index=pick), PinOutcome.NEW if pick == first else PinOutcome.SPILLED
    return chosen, PinOutcome.NEW if first is None else PinOutcome.SPILLED
