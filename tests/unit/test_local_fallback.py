"""Degraded-mode decisions: each replica keeps to its share of every limit."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import Config, parse_config
from router.replica.local import LocalState
from router.state.health import ProviderHealth
from router.state.keys import Keys
from router.state.store import RoutePlan
from router.strategies import Code


def make(strategy: str = "round_robin", **limits: Any) -> tuple[Config, RoutePlan]:
    cfg = parse_config(
        {"client_keys": [{"env": "K"}],
         "providers": [{"name": "a", "kind": "openai", "base_url": "http://a/v1", "limits": limits},
                       {"name": "b", "kind": "openai", "base_url": "http://b/v1"}],
         "routes": [{"model": "m", "strategy": strategy,
                     "targets": [{"provider": "a", "model": "x"},
                                 {"provider": "b", "model": "x"}]}]},
        {"K": "k"},
    )  # fmt: skip
    return cfg, RoutePlan.build(cfg, cfg.routes[0], Keys("rc", "default"))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def decide(state: LocalState, plan: RoutePlan, **kw: Any) -> Any:
    args: dict[str, Any] = {"in_flight": {}, "health": {}, "rand": 0, "expected_output": 16}
    return state.acquire(plan, [10, 10], [False, False], **{**args, **kw})


@pytest.mark.parametrize(("replicas", "share"), [(1, 6), (2, 3), (4, 1), (10, 1)])
def test_rpm_share_is_the_limit_over_the_live_replicas(replicas: int, share: int) -> None:
    cfg, plan = make("round_robin", rpm=6)
    state = LocalState(cfg, Clock())
    state.replicas = replicas
    chosen = [decide(state, plan).index for _ in range(20)]
    assert chosen.count(0) == share


def test_the_window_slides() -> None:
    cfg, plan = make(rpm=2)
    clock = Clock()
    state = LocalState(cfg, clock)
    state.admitted("a", 1)
    state.admitted("a", 1)
    assert state.acquire(plan, [1, 1], [False, True], in_flight={}, health={}, rand=0,
                         expected_output=1).index is None  # fmt: skip
    clock.t += 62
    assert decide(state, plan).index is not None


@pytest.mark.parametrize(
    ("health", "code"),
    [
        (ProviderHealth(health="down"), Code.UNHEALTHY),
        (ProviderHealth(drained=True), Code.DRAINED),
        (ProviderHealth(circuit="open", circuit_until_ms=10**13), Code.CIRCUIT),
    ],
)
def test_last_known_health_is_honoured(health: ProviderHealth, code: Code) -> None:
    cfg, plan = make()
    d = decide(LocalState(cfg, Clock()), plan, health={"a": health})
    assert d.index == 1
    assert d.candidates[0].code is code


def test_own_in_flight_and_cooldowns_count() -> None:
    cfg, plan = make(max_in_flight=4)
    state = LocalState(cfg, Clock())
    state.replicas = 2
    assert decide(state, plan, in_flight={"a": 2}).candidates[0].code is Code.FULL
    state.cool("a", 5000)
    assert decide(state, plan).candidates[0].code is Code.COOLING
