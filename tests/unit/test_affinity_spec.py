"""The affinity rule's pure parts: the key's digest and rendezvous order, the stored pin's
form, the refresh rule, bounded loads, and ``place``'s outcomes, from tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from router.config import Strategy
from router.state.affinity import Pin, PinMode, PinRequest, affinity_digest, hrw_order
from router.strategies import (
    Code,
    PinOutcome,
    PinView,
    TargetView,
    bounded_hash,
    eligibility,
    pin_due,
    place,
)

NAMES = ("a", "b", "c")
NOW = 1_000_000


def test_the_digest_is_short_fixed_and_route_scoped() -> None:
    d = affinity_digest("m", "session-1")
    assert len(d) == 32
    assert d == affinity_digest("m", "session-1")
    assert d != affinity_digest("m2", "session-1")
    assert "session" not in affinity_digest("m", "session-1" * 1000)


def test_the_order_is_a_deterministic_permutation() -> None:
    d = affinity_digest("m", "k")
    order = hrw_order(d, NAMES)
    assert sorted(order) == [0, 1, 2]
    assert order == hrw_order(d, NAMES)


def test_adding_a_target_moves_only_the_keys_it_takes() -> None:
    """Rendezvous hashing: with a fourth target a key's first choice is either unchanged or
    the new target; removing a target moves only the keys whose first choice it was."""
    four = (*NAMES, "d")
    moved = 0
    for k in range(500):
        d = affinity_digest("m", f"k{k}")
        before, after = NAMES[hrw_order(d, NAMES)[0]], four[hrw_order(d, four)[0]]
        assert after in (before, "d")
        moved += after == "d"
        two = ("a", "c")
        if before != "b":
            assert two[hrw_order(d, two)[0]] == before
    assert 80 < moved < 170  # about a quarter


def test_pin_requests() -> None:
    p = PinRequest.preferred("m", "v", NAMES, ttl_s=60, load_factor=2.0, tenant="t")
    assert (p.kind, p.mode, p.ttl_ms, p.load_factor, p.tenant) == (
        "route", PinMode.PREFERRED, 60_000, 2.0, "t",
    )  # fmt: skip
    assert p.key == affinity_digest("m", "v")
    assert list(p.order) == hrw_order(p.key, NAMES)
    r = PinRequest.response("resp_1", ttl_s=86400, tenant="t")
    assert (r.kind, r.key, r.mode, r.ttl_ms, r.order) == (
        "response", "resp_1", PinMode.REQUIRED, 86_400_000, (),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "pin"),
    [
        ("a|123|t", Pin("a", 123, "t")),
        ("a|123|", Pin("a", 123, "")),
        ("a|x|t", None),
        ("|123|t", None),
        ("garbage", None),
    ],
)
def test_stored_pins_parse(value: str, pin: Pin | None) -> None:
    assert Pin.parse(value) == pin


@pytest.mark.parametrize(
    ("left", "due"), [(100_000, False), (90_000, False), (89_999, True), (0, True)]
)
def test_a_pin_is_refreshed_under_90_percent_of_its_ttl(left: int, due: bool) -> None:
    assert pin_due(NOW + left, NOW, 100_000) is due


def test_bounded_loads_pass_over_a_loaded_first_choice() -> None:
    views = [TargetView(in_flight=f) for f in (4, 0, 2)]
    ok = [True, True, True]
    # mean with this request (4 + 0 + 2 + 1) / 3: the bound is ceil(1.25 * 7 / 3) = 3
    assert bounded_hash(views, ok, [0, 2, 1], 1.25) == (2, 0)
    assert bounded_hash(views, ok, [0, 2, 1], 2.0) == (0, 0)  # ceil(14 / 3) = 5
    assert bounded_hash(views, [False, True, True], [0, 2, 1], 1.0) == (1, 2)
    assert bounded_hash(views, [False] * 3, [0, 1, 2], 1.25) == (None, None)
    assert bounded_hash(views, ok, [], 1.25) == (None, None)  # no order: the strategy's


FULL = TargetView(max_in_flight=1, in_flight=1)
DOWN = TargetView(healthy=False)
DRAINED = TargetView(drained=True)
OK = TargetView()


@pytest.mark.parametrize(
    ("views", "pin", "required", "index", "outcome"),
    [
        ((OK, OK, OK), "b", False, 1, PinOutcome.HIT),
        ((OK, FULL, OK), "b", False, None, PinOutcome.SPILLED),
        ((OK, DOWN, OK), "b", False, None, PinOutcome.MOVED),
        ((OK, DRAINED, OK), "b", False, None, PinOutcome.MOVED),
        ((FULL, DOWN, FULL), "b", False, None, PinOutcome.NONE),  # no target: as without pin
        ((OK, OK, OK), None, False, 2, PinOutcome.NEW),  # order (2, 0, 1)
        ((OK, OK, OK), "gone", False, 2, PinOutcome.NEW),  # a pin naming no target
        ((OK, OK, FULL), None, False, 0, PinOutcome.NEW),  # the first eligible of the order
        ((OK, OK, TargetView(in_flight=5)), None, False, 0, PinOutcome.SPILLED),  # its load
        ((OK, OK, OK), "b", True, 1, PinOutcome.HIT),
        ((OK, FULL, OK), "b", True, None, PinOutcome.PIN_UNAVAILABLE),
        ((OK, OK, OK), "gone", True, None, PinOutcome.PIN_UNAVAILABLE),
        ((OK, OK, OK), None, True, None, PinOutcome.NONE),  # the strategy's choice
    ],
)
def test_place(
    views: tuple[TargetView, ...],
    pin: str | None,
    required: bool,
    index: int | None,
    outcome: PinOutcome,
) -> None:
    choice, got = place(
        Strategy.ROUND_ROBIN, views, NAMES, NOW, PinView(pin, (2, 0, 1), 1.25, required),
        rotation=1, rand=0, swrr=(0, 0, 0), expected_output=1,
    )  # fmt: skip
    assert got is outcome
    if index is not None:
        assert choice.index == index
    elif outcome in (PinOutcome.SPILLED, PinOutcome.MOVED) or (required and pin is None):
        assert choice.index is not None  # the strategy's: an eligible target
        assert eligibility(views[choice.index], NOW) is Code.OK
    else:
        assert choice.index is None


def test_a_pin_never_refuses() -> None:
    """Whatever the pin, a preferred pin chooses a target whenever the strategy would."""
    for views in [(OK, FULL, DOWN), (FULL, OK, DOWN), (DOWN, FULL, OK)]:
        for pin in (None, *NAMES):
            choice, _ = place(
                Strategy.WEIGHTED, views, NAMES, NOW, PinView(pin, (0, 1, 2)),
                rotation=1, rand=0, swrr=(0, 0, 0), expected_output=1,
            )  # fmt: skip
            assert choice.index is not None
            assert eligibility(views[choice.index], NOW) is Code.OK


def test_the_strategy_state_moves_only_when_the_strategy_chooses() -> None:
    views = (replace(OK, weight=3), OK, OK)
    hit, _ = place(
        Strategy.WEIGHTED, views, NAMES, NOW, PinView("b"),
        rotation=1, rand=0, swrr=(1, 2, 3), expected_output=1,
    )  # fmt: skip
    assert hit.swrr == (1, 2, 3)
    moved, outcome = place(
        Strategy.WEIGHTED, (OK, DOWN, OK), NAMES, NOW, PinView("b"),
        rotation=1, rand=0, swrr=(1, 2, 3), expected_output=1,
    )  # fmt: skip
    assert outcome is PinOutcome.MOVED
    assert moved.swrr != (1, 2, 3)
