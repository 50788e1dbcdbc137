"""The Lua acquire script and the pure Python strategies make the same choice."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router.budgets import period_bounds, period_id
from router.config import BudgetPeriod, Strategy
from router.state.keys import TENANT_ARGS_FORMAT, WINDOW_BUCKETS, Keys
from router.state.store import _decode_decision, _script
from router.state.tenantstate import pack_live, unpack_live
from router.strategies import (
    Code,
    PinOutcome,
    PinView,
    TargetView,
    TenantCode,
    TenantUse,
    bounded_hash,
    choose,
    eligibility,
    place,
    tenant_verdict,
)

KEYS = Keys("t", "pool")


@pytest.fixture(scope="module")
def client(redis_port: int) -> Iterator[redis.Redis]:
    c = redis.Redis(port=redis_port)
    yield c
    c.close()


CIRCUITS = {1: ("open", 30), 2: ("open", -30), 3: ("half", 30)}
"""A circuit fixture: open and cooling down; open and cooled (its half-open trial may go:
choosing the target makes the request that trial); half-open, its trial in flight. The
state and when it ends (seconds from now)."""
BLOCKING = frozenset({1, 3})

limit = st.sampled_from([0, 0, 1, 5, 50])
floats = st.sampled_from([0.0, 0.5, 1.0, 12.25, 100.0, 1e-3, 3.3333333333333335])
target_views = st.builds(
    TargetView,
    weight=st.integers(1, 5),
    rpm=limit,
    tpm=st.sampled_from([0, 0, 10, 100, 1000]),
    max_in_flight=limit,
    tokens=st.integers(0, 60),
    in_flight=st.integers(0, 6),
    rpm_used=st.integers(0, 6),
    tpm_used=st.integers(0, 200),
    ttft=floats,
    tpot=floats,
    cooling_until_ms=st.sampled_from([0, 0, 0, 1]),
    healthy=st.sampled_from([True, True, True, False]),
    excluded=st.sampled_from([False, False, False, True]),
    drained=st.sampled_from([False, False, False, False, True]),
    circuit_until_ms=st.sampled_from([0, 0, 0, 0, *CIRCUITS]),
)


def _seed(client: redis.Redis, views: list[TargetView], now_s: int) -> list[str]:
    names = [f"p{i}" for i in range(len(views))]
    client.flushall()
    for name, v in zip(names, views, strict=True):
        fields: dict[str, str | int] = {
            "wh": now_s, "rpm": v.rpm_used, "tpm": v.tpm_used,
            f"r:{now_s}": v.rpm_used, f"t:{now_s}": v.tpm_used,
            "ttft": repr(v.ttft), "tpot": repr(v.tpot),
            "cool": (now_s + 30) * 1000 if v.cooling_until_ms else 0,
        }  # fmt: skip
        if not v.healthy:
            fields["health"] = "down"
        if v.drained:
            fields["drain"] = "1"
        if not v.healthy or v.drained or v.circuit_until_ms or v.cooling_until_ms:
            fields["gate"] = 1  # as the scripts that write those fields set it
        if v.circuit_until_ms:
            state, ends_s = CIRCUITS[v.circuit_until_ms]
            fields["circ"] = state
            fields["circ_until"] = (now_s + ends_s) * 1000
            if state == "half":
                fields["circ_trial"] = "another-request"
        client.hset(KEYS.provider(name), mapping=fields)
        for j in range(v.in_flight):
            client.zadd(KEYS.leases(name), {f"old-{j}": (now_s + 60) * 1000})
    return names


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(list(Strategy)),
    views=st.lists(target_views, min_size=1, max_size=6),
    rotation=st.integers(0, 1000),
    rand=st.integers(0, 2**31),
    swrr=st.lists(st.integers(-10, 10), min_size=6, max_size=6),
    expected=st.sampled_from([1, 16, 256]),
)
def test_same_choice(
    client: redis.Redis,
    strategy: Strategy,
    views: list[TargetView],
    rotation: int,
    rand: int,
    swrr: list[int],
    expected: int,
) -> None:
    now_s = int(client.time()[0])
    names = _seed(client, views, now_s)
    route = "r"
    client.set(KEYS.rotation(route), rotation)
    client.set(KEYS.swrr(route), ",".join(str(w) for w in swrr[: len(views)]))
    keys = [KEYS.rotation(route), KEYS.swrr(route)]
    args: list[object] = [strategy.value, "lease-1", 30000, rand, expected, len(views)]
    args += [WINDOW_BUCKETS, 1, (now_s + 60) * 1000, ""]  # detail, a deadline, no blocks
    for name, v in zip(names, views, strict=True):
        keys += [KEYS.provider(name), KEYS.leases(name)]
        args += [v.rpm, v.tpm, v.max_in_flight, v.weight, v.tokens, int(v.excluded)]
    raw = client.register_script(_script("acquire"))(keys=keys, args=args)
    decision = _decode_decision(raw, names)

    now_ms = now_s * 1000 + 500  # cooling fixtures sit 30 s away from now, either side
    views_now = [_with_cooling(v, now_ms) for v in views]
    spec = choose(
        strategy,
        views_now,
        now_ms,
        rotation=rotation + 1,
        rand=rand,
        swrr=swrr[: len(views)],
        expected_output=expected,
    )
    assert decision.index == spec.index
    assert [c.code for c in decision.candidates] == [eligibility(v, now_ms) for v in views_now]
    if strategy is Strategy.WEIGHTED and spec.index is not None:
        stored = client.get(KEYS.swrr(route)).decode().split(",")
        eligible = [eligibility(v, now_ms) is Code.OK for v in views_now]
        got = [int(float(s)) for s, ok in zip(stored, eligible, strict=True) if ok]
        want = [c for c, ok in zip(spec.swrr, eligible, strict=True) if ok]
        assert got == want
    # without detail (the decision log off), round robin stops looking at the first target
    # with room: the same choice, the same rotation afterwards, 9 for the targets not seen
    _seed(client, views, now_s)
    client.set(KEYS.rotation(route), rotation)
    client.set(KEYS.swrr(route), ",".join(str(w) for w in swrr[: len(views)]))
    args[7] = 0
    lean = _decode_decision(client.register_script(_script("acquire"))(keys=keys, args=args), names)
    assert lean.index == decision.index
    if strategy is Strategy.ROUND_ROBIN:
        assert client.get(KEYS.rotation(route)) == str(rotation + (spec.index is not None)).encode()
        n = len(views)
        order = [(rotation + 1 + k) % n for k in range(n)]
        codes = [lean.candidates[i].code for i in order]
        looked = [c for c in codes if c is not Code.UNSEEN]
        assert codes[: len(looked)] == looked  # a prefix of the rotation order
        assert all(c is not Code.OK for c in looked[:-1])
        assert (looked[-1] is Code.OK) == (spec.index is not None)


def _with_cooling(v: TargetView, now_ms: int) -> TargetView:
    from dataclasses import replace

    return replace(
        v,
        cooling_until_ms=now_ms + 30_000 if v.cooling_until_ms else 0,
        circuit_until_ms=now_ms + 30_000 if v.circuit_until_ms in BLOCKING else 0,
    )


tenant_uses = st.builds(
    TenantUse,
    rpm=limit,
    tpm=st.sampled_from([0, 0, 10, 100, 1000]),
    max_in_flight=limit,
    budget=st.sampled_from([0, 0, 100, 5000]),
    in_flight=st.integers(0, 6),
    rpm_used=st.integers(0, 6),
    tpm_used=st.integers(0, 200),
    spent=st.integers(0, 6000),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    use=tenant_uses,
    tokens=st.integers(0, 120),
    cost=st.integers(0, 3000),
    counted=st.booleans(),
    stale=st.booleans(),
    guess=st.booleans(),
)
def test_same_tenant_verdict(
    client: redis.Redis,
    use: TenantUse,
    tokens: int,
    cost: int,
    counted: bool,
    stale: bool,
    guess: bool,
) -> None:
    """The tenant's verdict is ``tenant_verdict``'s; spend of another period counts nothing."""
    now_s = int(client.time()[0])
    names = _seed(client, [TargetView()], now_s)
    pid = period_id(BudgetPeriod.MONTH, now_s)
    tk, tv = KEYS.tenant("t"), KEYS.tenant_live("t")
    client.set(tv, pack_live(
        rpm=use.rpm_used, tpm=use.tpm_used, in_flight=use.in_flight,
        next_maintenance_ms=(now_s + 30) * 1000, period=pid - 1 if stale else pid,
        spend_nano=use.spent, second=now_s, second_requests=use.rpm_used,
        second_tokens=use.tpm_used, oldest=now_s,
    ))  # fmt: skip
    keys = [KEYS.rotation("r"), KEYS.swrr("r"), KEYS.provider(names[0]), KEYS.leases(names[0])]
    keys += [tk, tv]
    args: list[object] = ["round_robin", "lease-1", 30000, 0, 16, 1, WINDOW_BUCKETS, 1]
    args += [(now_s + 60) * 1000, "t", 0, 0, 0, 1, tokens, 0]
    # the caller's guess of the period: right, or a month off (the script computes it then)
    guessed = period_bounds(BudgetPeriod.MONTH, now_s - (0 if guess else 40 * 86_400))
    args.append(struct.pack(TENANT_ARGS_FORMAT, use.rpm, use.tpm, use.max_in_flight, tokens,
                            use.budget, 3, cost, int(counted), *guessed))  # fmt: skip
    raw = client.register_script(_script("acquire"))(keys=keys, args=args)
    decision = _decode_decision(raw, names)

    seen = replace(use, spent=0) if stale else use
    want = tenant_verdict(seen, tokens, cost, counted)
    assert decision.tenant_code is want
    assert (decision.index == 0) is (want is TenantCode.OK)
    if want is TenantCode.OK:
        f = unpack_live(client.get(tv))
        assert (f["rpm"], f["tpm"], f["spend_nano"], f["period"]) == (
            use.rpm_used + counted, use.tpm_used + tokens, seen.spent + cost, pid,
        )  # fmt: skip
        # in flight is counted only for a tenant with a limit on it
        assert f["in_flight"] == use.in_flight + (1 if use.max_in_flight else 0)


PIN_TTL = 600_000
GHOST = "gone"
"""A provider no target of the route names (a pin left by an older config)."""


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(list(Strategy)),
    views=st.lists(target_views, min_size=1, max_size=6),
    rotation=st.integers(0, 1000),
    rand=st.integers(0, 2**31),
    swrr=st.lists(st.integers(-10, 10), min_size=6, max_size=6),
    pin=st.sampled_from([None, None, GHOST, 0, 1, 2, 3, 4, 5]),
    order=st.permutations(range(6)),
    cut=st.sampled_from([6, 6, 6, 2, 1, 0]),
    load_factor=st.sampled_from([1.0, 1.25, 2.0, 10.0]),
    required=st.booleans(),
    foreign=st.sampled_from([False, False, False, True]),
    stale=st.booleans(),
    detail=st.booleans(),
)
def test_same_pin_choice(
    client: redis.Redis,
    strategy: Strategy,
    views: list[TargetView],
    rotation: int,
    rand: int,
    swrr: list[int],
    pin: int | str | None,
    order: list[int],
    cut: int,
    load_factor: float,
    required: bool,
    foreign: bool,
    stale: bool,
    detail: bool,
) -> None:
    """With an affinity block the Lua chooses as ``place`` does, with the same outcome; it
    writes the pin only when made, moved or due (``pin_due``), and moves the strategy's state
    (the rotation, the SWRR weights) only when the strategy chose."""
    now_s = int(client.time()[0])
    names = _seed(client, views, now_s)
    n, route = len(views), "r"
    order = [i for i in order if i < n][:cut]  # cut short: the strategy may have to choose
    pinned = pin if isinstance(pin, str) or pin is None else names[pin % n]
    client.set(KEYS.rotation(route), rotation)
    client.set(KEYS.swrr(route), ",".join(str(w) for w in swrr[:n]))
    pin_key = KEYS.response_pin("resp_1") if required else KEYS.pin(route, "d1")
    # a fresh pin is not written again; a stale one (under 90 % of its TTL left) is
    expires = (now_s + 1) * 1000 + (PIN_TTL // 2 if stale else PIN_TTL)
    stored = f"{pinned}|{expires}|{'other' if foreign else 'me'}"
    if pinned is not None:
        client.set(pin_key, stored, px=PIN_TTL)
    keys = [KEYS.rotation(route), KEYS.swrr(route)]
    args: list[object] = [strategy.value, "lease-1", 30000, rand, 16, n]
    args += [WINDOW_BUCKETS, int(detail), (now_s + 60) * 1000, "a"]
    for name, v in zip(names, views, strict=True):
        keys += [KEYS.provider(name), KEYS.leases(name)]
        args += [v.rpm, v.tpm, v.max_in_flight, v.weight, v.tokens, int(v.excluded)]
    keys.append(pin_key)
    args += [2 if required else 1, PIN_TTL, "me", repr(load_factor)]
    args.append(",".join(str(i + 1) for i in order))
    raw = client.register_script(_script("acquire"))(keys=keys, args=args)
    d = _decode_decision(raw, names, pinned=True)

    now_ms = now_s * 1000 + 500
    views_now = [_with_cooling(v, now_ms) for v in views]
    if required and pinned is not None and foreign:  # another tenant's: nothing looked at
        event("FOREIGN")
        assert (d.index, d.pin, d.pinned) == (None, PinOutcome.FOREIGN, "")
        assert all(c.code is Code.UNSEEN for c in d.candidates)
        return
    view = PinView(pinned, order, load_factor, required)
    spec, outcome = place(
        strategy, views_now, names, now_ms, view,
        rotation=rotation + 1, rand=rand, swrr=swrr[:n], expected_output=16,
    )  # fmt: skip
    event(outcome.name)
    assert (d.index, d.pin, d.pinned) == (spec.index, outcome, pinned or "")
    codes = [eligibility(v, now_ms) for v in views_now]
    if outcome is PinOutcome.HIT and not detail:  # a hit looks at its target only
        codes = [c if i == spec.index else Code.UNSEEN for i, c in enumerate(codes)]
    assert [c.code for c in d.candidates] == codes

    before = stored.encode() if pinned is not None else None
    _check_pin_write(client, pin_key, outcome, stale, names, spec.index, d.now_ms, before)
    # the strategy's state moves only when the strategy chose
    eligible = [eligibility(v, now_ms) is Code.OK for v in views_now]
    hashed = bounded_hash(views_now, eligible, order, load_factor)[0]
    if pinned in names or required:
        hashed = None  # the pin or the strategy chose
    by_pin = outcome is PinOutcome.HIT or hashed is not None
    by_strategy = spec.index is not None and not by_pin
    if strategy is Strategy.ROUND_ROBIN:
        assert client.get(KEYS.rotation(route)) == str(rotation + by_strategy).encode()
    if strategy is Strategy.WEIGHTED:
        got = [int(float(w)) for w in client.get(KEYS.swrr(route)).decode().split(",")]
        if by_strategy:
            want = [c for c, ok in zip(spec.swrr, eligible, strict=True) if ok]
            assert [c for c, ok in zip(got, eligible, strict=True) if ok] == want
        else:
            assert got == swrr[:n]


def _check_pin_write(
    client: redis.Redis,
    pin_key: str,
    outcome: PinOutcome,
    stale: bool,
    names: list[str],
    index: int | None,
    now_ms: int,
    before: bytes | None,
) -> None:
    """The pin is written (and counted on its provider, off the one it left) only when made,
    moved, or hit with under 90 % of its TTL left; else it is as it was (``before``)."""
    stored = client.get(pin_key)
    pinned = before.decode().split("|")[0] if before is not None else None
    made = outcome in (PinOutcome.NEW, PinOutcome.SPILLED, PinOutcome.MOVED)
    if made or (outcome is PinOutcome.HIT and stale):
        assert index is not None
        provider, at, tenant = stored.decode().split("|")
        assert (provider, tenant) == (names[index], "me")
        assert int(at) - PIN_TTL == now_ms
        member = pin_key.removeprefix(KEYS.base + ":")
        assert client.zscore(KEYS.pins(provider), member) == int(at)
        if pinned is not None and pinned != provider:
            assert client.zscore(KEYS.pins(pinned), member) is None
    else:
        assert stored == before
