"""router/strategies.py: the pure specification of eligibility and the five strategies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from router.config import Strategy
from router.strategies import (
    Choice,
    Code,
    TargetView,
    choose,
    eligibility,
    headroom,
    latency_cost,
    smooth_weighted,
)

NOW = 1_000_000
OK = TargetView()
DOWN = TargetView(healthy=False)
TIE_BREAKING = [Strategy.LEAST_CONNECTIONS, Strategy.LEAST_LATENCY, Strategy.HEADROOM]


def pick(
    strategy: Strategy,
    targets: Sequence[TargetView],
    *,
    rotation: int = 0,
    rand: int = 0,
    swrr: Sequence[int] | None = None,
    expected_output: int = 100,
) -> Choice:
    return choose(
        strategy,
        targets,
        NOW,
        rotation=rotation,
        rand=rand,
        swrr=[0] * len(targets) if swrr is None else swrr,
        expected_output=expected_output,
    )


# --- eligibility -----------------------------------------------------------------------

# Each reason a target can fail, in the order they are checked.
FAILURES: list[tuple[Code, dict[str, Any]]] = [
    (Code.EXCLUDED, {"excluded": True}),
    (Code.UNHEALTHY, {"healthy": False}),
    (Code.COOLING, {"cooling_until_ms": NOW + 1}),
    (Code.FULL, {"max_in_flight": 2, "in_flight": 2}),
    (Code.RPM, {"rpm": 10, "rpm_used": 10}),
    (Code.TPM, {"tpm": 1000, "tpm_used": 900, "tokens": 101}),
]


@pytest.mark.parametrize("first", range(len(FAILURES)), ids=[c.name for c, _ in FAILURES])
def test_eligibility_reports_the_first_reason_in_priority_order(first: int) -> None:
    """Every failure from ``first`` on is present; the earliest one is the answer."""
    fields: dict[str, Any] = {}
    for _, f in FAILURES[first:]:
        fields.update(f)
    assert eligibility(TargetView(**fields), NOW) is FAILURES[first][0]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, Code.OK, id="defaults"),
        pytest.param({"cooling_until_ms": NOW}, Code.OK, id="cooling-ends-now"),
        pytest.param({"cooling_until_ms": NOW - 1}, Code.OK, id="cooling-over"),
        pytest.param({"cooling_until_ms": NOW + 1}, Code.COOLING, id="cooling"),
        pytest.param({"max_in_flight": 2, "in_flight": 1}, Code.OK, id="one-slot-left"),
        pytest.param({"max_in_flight": 2, "in_flight": 3}, Code.FULL, id="over-full"),
        pytest.param({"max_in_flight": 0, "in_flight": 10**6}, Code.OK, id="in-flight-unlimited"),
        pytest.param({"rpm": 10, "rpm_used": 9}, Code.OK, id="last-request-of-minute"),
        pytest.param({"rpm": 10, "rpm_used": 10}, Code.RPM, id="rpm-spent"),
        pytest.param({"rpm": 0, "rpm_used": 10**6}, Code.OK, id="rpm-unlimited"),
        pytest.param({"tpm": 1000, "tpm_used": 900, "tokens": 100}, Code.OK, id="tpm-exactly"),
        pytest.param({"tpm": 1000, "tpm_used": 900, "tokens": 101}, Code.TPM, id="tpm-over"),
        pytest.param({"tpm": 1000, "tokens": 1001}, Code.TPM, id="request-bigger-than-tpm"),
        pytest.param({"tpm": 0, "tpm_used": 10**9, "tokens": 10**6}, Code.OK, id="tpm-unlimited"),
        pytest.param({"weight": 0, "ttft": 9.0}, Code.OK, id="weight-and-latency-irrelevant"),
    ],
)
def test_eligibility(fields: dict[str, Any], expected: Code) -> None:
    assert eligibility(TargetView(**fields), NOW) is expected


def test_codes_are_the_lua_scripts_numbers() -> None:
    assert [int(c) for c in Code] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


# --- round robin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eligible", "rotation", "expected"),
    [
        ((True, True, True), 0, 0),
        ((True, True, True), 1, 1),
        ((True, True, True), 2, 2),
        ((True, True, True), 3, 0),
        ((True, True, True), 7, 1),
        ((True, False, True), 1, 2),
        ((True, False, True), 4, 2),
        ((True, False, False), 2, 0),
        ((False, False, True), 0, 2),
    ],
)
def test_round_robin_takes_the_first_eligible_from_rotation_mod_n(
    eligible: tuple[bool, ...], rotation: int, expected: int
) -> None:
    targets = [OK if e else DOWN for e in eligible]
    for rand in (0, 1, 2):  # randomness plays no part
        choice = pick(Strategy.ROUND_ROBIN, targets, rotation=rotation, rand=rand, swrr=[4, 5, 6])
        assert choice == Choice(expected, (4, 5, 6))


def test_round_robin_ignores_load() -> None:
    targets = [TargetView(in_flight=100), TargetView(in_flight=0)]
    assert pick(Strategy.ROUND_ROBIN, targets, rotation=0).index == 0


# --- smooth weighted round robin -------------------------------------------------------


def swrr_sequence(
    weights: Sequence[int], eligible: Sequence[bool], picks: int
) -> tuple[list[int | None], tuple[int, ...]]:
    state: tuple[int, ...] = (0,) * len(weights)
    out: list[int | None] = []
    for _ in range(picks):
        choice = smooth_weighted(weights, state, eligible)
        out.append(choice.index)
        state = choice.swrr
    return out, state


@pytest.mark.parametrize(
    ("weights", "eligible", "expected"),
    [
        pytest.param((5, 1, 1), (True, True, True), "aabacaa", id="nginx-5-1-1"),
        pytest.param((1, 1, 1), (True, True, True), "abcabca", id="equal"),
        pytest.param((2, 1), (True, True), "abaaba", id="2-1"),
        pytest.param((5, 1, 1), (False, True, True), "bcbcbc", id="heavy-one-excluded"),
        pytest.param((5, 1, 1), (True, False, True), "aaacaaa", id="middle-excluded"),
        pytest.param((3,), (True,), "aaa", id="single"),
    ],
)
def test_smooth_weighted_sequence(
    weights: tuple[int, ...], eligible: tuple[bool, ...], expected: str
) -> None:
    picks, _ = swrr_sequence(weights, eligible, len(expected))
    assert "".join("abc"[i] for i in picks if i is not None) == expected
    assert len(picks) == len(expected)


def test_smooth_weighted_state_returns_to_zero_after_a_full_cycle() -> None:
    _, state = swrr_sequence((5, 1, 1), (True, True, True), 7)
    assert state == (0, 0, 0)


def test_smooth_weighted_leaves_ineligible_state_untouched() -> None:
    choice = smooth_weighted((5, 1, 1), (7, -3, 2), (True, False, True))
    assert choice == Choice(0, (7 + 5 - 6, -3, 2 + 1))


def test_smooth_weighted_with_nothing_eligible() -> None:
    assert smooth_weighted((1, 2), (3, 4), (False, False)) == Choice(None, (3, 4))


def test_weighted_strategy_uses_target_weights_and_feeds_state_back() -> None:
    targets = [TargetView(weight=5), TargetView(weight=1), TargetView(weight=1)]
    swrr: tuple[int, ...] = (0, 0, 0)
    picks = []
    for _ in range(7):
        choice = pick(Strategy.WEIGHTED, targets, swrr=swrr, rand=2, rotation=1)
        assert choice.index is not None
        picks.append("abc"[choice.index])
        swrr = choice.swrr
    assert "".join(picks) == "aabacaa"


def test_weighted_strategy_skips_ineligible_targets() -> None:
    targets = [TargetView(weight=5, excluded=True), TargetView(weight=1), TargetView(weight=2)]
    swrr: tuple[int, ...] = (0, 0, 0)
    picks = []
    for _ in range(6):
        choice = pick(Strategy.WEIGHTED, targets, swrr=swrr)
        picks.append(choice.index)
        swrr = choice.swrr
    assert picks == [2, 1, 2, 2, 1, 2]
    assert swrr[0] == 0


# --- least connections -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        pytest.param([(3, 1), (4, 2)], 1, id="4-of-2-beats-3-of-1"),
        pytest.param([(4, 2), (3, 1)], 0, id="order-irrelevant"),
        pytest.param([(0, 1), (5, 10)], 0, id="idle-wins"),
        pytest.param([(9, 10), (1, 1)], 0, id="0.9-beats-1"),
        pytest.param([(5, 1), (2, 1), (7, 1)], 1, id="fewest"),
    ],
)
def test_least_connections_is_relative_to_weight(
    loads: list[tuple[int, int]], expected: int
) -> None:
    targets = [TargetView(in_flight=f, weight=w) for f, w in loads]
    for rand in range(len(targets)):
        assert pick(Strategy.LEAST_CONNECTIONS, targets, rand=rand).index == expected


def test_least_connections_skips_ineligible_even_if_idle() -> None:
    targets = [TargetView(in_flight=0, excluded=True), TargetView(in_flight=50)]
    assert pick(Strategy.LEAST_CONNECTIONS, targets).index == 1


# --- least latency ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttft", "tpot", "in_flight", "expected_output", "cost"),
    [
        (0.0, 0.0, 5, 100, 0.0),
        (0.5, 0.0, 0, 100, 0.5),
        (0.5, 0.01, 0, 100, 1.5),
        (0.5, 0.01, 1, 100, 3.0),
        (0.25, 0.25, 3, 2, 3.0),
        (1.0, 1.0, 0, 0, 1.0),
    ],
)
def test_latency_cost(
    ttft: float, tpot: float, in_flight: int, expected_output: int, cost: float
) -> None:
    t = TargetView(ttft=ttft, tpot=tpot, in_flight=in_flight)
    assert latency_cost(t, expected_output) == pytest.approx(cost)


@pytest.mark.parametrize(
    ("targets", "expected_output", "expected"),
    [
        pytest.param([TargetView(ttft=0.5), TargetView(ttft=0.2)], 100, 1, id="lower-ttft"),
        pytest.param(
            [TargetView(ttft=0.1, tpot=0.05), TargetView(ttft=0.5, tpot=0.01)],
            100,
            1,
            id="long-output-favours-low-tpot",
        ),
        pytest.param(
            [TargetView(ttft=0.1, tpot=0.05), TargetView(ttft=0.5, tpot=0.01)],
            1,
            0,
            id="short-output-favours-low-ttft",
        ),
        pytest.param(
            [TargetView(ttft=0.2, in_flight=4), TargetView(ttft=0.5, in_flight=0)],
            100,
            1,
            id="load-penalty",
        ),
        pytest.param(
            [TargetView(ttft=0.01, tpot=0.001), TargetView()], 100, 1, id="unknown-is-tried-first"
        ),
        pytest.param(
            [TargetView(), TargetView(ttft=0.01, tpot=0.001)], 100, 0, id="unknown-first-either-way"
        ),
        pytest.param(
            [TargetView(in_flight=50), TargetView(ttft=0.01)], 100, 0, id="unknown-even-if-busy"
        ),
    ],
)
def test_least_latency_picks_the_lowest_cost(
    targets: list[TargetView], expected_output: int, expected: int
) -> None:
    for rand in range(len(targets)):
        choice = pick(Strategy.LEAST_LATENCY, targets, rand=rand, expected_output=expected_output)
        assert choice.index == expected


# --- headroom --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, 1.0, id="unlimited"),
        pytest.param({"rpm": 10, "rpm_used": 4}, 0.5, id="rpm"),
        pytest.param({"tpm": 1000, "tpm_used": 500, "tokens": 250}, 0.25, id="tpm"),
        pytest.param({"max_in_flight": 4, "in_flight": 1}, 0.5, id="in-flight"),
        pytest.param(
            {"rpm": 10, "rpm_used": 0, "tpm": 100, "tokens": 80, "max_in_flight": 10},
            0.2,
            id="min-is-tpm",
        ),
        pytest.param(
            {"rpm": 10, "rpm_used": 8, "tpm": 100, "tokens": 10, "max_in_flight": 10},
            0.1,
            id="min-is-rpm",
        ),
        pytest.param(
            {"rpm": 100, "tpm": 100, "tokens": 1, "max_in_flight": 2, "in_flight": 1},
            0.0,
            id="min-is-in-flight",
        ),
        pytest.param({"rpm": 10, "rpm_used": 9}, 0.0, id="last-slot-is-zero"),
    ],
)
def test_headroom_is_the_smallest_fraction_left(fields: dict[str, Any], expected: float) -> None:
    assert headroom(TargetView(**fields)) == pytest.approx(expected)


def test_headroom_strategy_picks_the_most_room() -> None:
    targets = [
        TargetView(rpm=10, rpm_used=5),  # 0.4
        TargetView(rpm=100, rpm_used=10, tpm=1000, tpm_used=600),  # min(0.89, 0.4)
        TargetView(tpm=1000, tpm_used=100, tokens=100),  # 0.8
    ]
    for rand in range(3):
        assert pick(Strategy.HEADROOM, targets, rand=rand).index == 2


def test_headroom_prefers_an_unlimited_target() -> None:
    targets = [TargetView(rpm=1000), TargetView()]
    assert pick(Strategy.HEADROOM, targets, rand=0).index == 1


# --- ties and nothing eligible ---------------------------------------------------------


@pytest.mark.parametrize("strategy", TIE_BREAKING)
@pytest.mark.parametrize(("rand", "expected"), [(0, 0), (1, 1), (2, 2), (3, 0), (5, 2)])
def test_ties_go_to_the_first_from_the_random_start(
    strategy: Strategy, rand: int, expected: int
) -> None:
    targets = [TargetView(in_flight=1, ttft=0.1, rpm=10)] * 3
    assert pick(strategy, targets, rand=rand, rotation=1) == Choice(expected, (0, 0, 0))


@pytest.mark.parametrize("strategy", TIE_BREAKING)
@pytest.mark.parametrize(("rand", "expected"), [(0, 0), (1, 2), (2, 2), (3, 0)])
def test_ties_skip_ineligible_targets(strategy: Strategy, rand: int, expected: int) -> None:
    targets = [TargetView(), TargetView(cooling_until_ms=NOW + 5), TargetView()]
    assert pick(strategy, targets, rand=rand).index == expected


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(
    "targets",
    [
        pytest.param([], id="no-targets"),
        pytest.param([DOWN], id="one-down"),
        pytest.param(
            [
                TargetView(excluded=True),
                TargetView(rpm=1, rpm_used=1),
                TargetView(tpm=10, tokens=11),
                TargetView(max_in_flight=1, in_flight=1),
                TargetView(cooling_until_ms=NOW + 1),
            ],
            id="each-for-its-reason",
        ),
    ],
)
def test_nothing_eligible_is_no_choice_and_keeps_the_state(
    strategy: Strategy, targets: list[TargetView]
) -> None:
    swrr = list(range(3, 3 + len(targets)))
    assert pick(strategy, targets, swrr=swrr, rotation=4, rand=2) == Choice(None, tuple(swrr))
