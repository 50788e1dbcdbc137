"""A request no target can take: 429 when some target is only full, 503 when all are out.

The same rule for a shared decision (the script's codes and wait) and a local one (degraded
mode), so a client is told the same either way.
"""

from __future__ import annotations

from typing import Any

import pytest

from router.config import parse_config
from router.errors import RouterError, Saturated, Unavailable, to_openai_error
from router.replica.local import LocalState
from router.replica.refusal import refusal
from router.state.health import ProviderHealth
from router.state.keys import Keys
from router.state.store import Candidate, Decision, RoutePlan
from router.strategies import Code

NOW_MS = 1_000_000


def plan(tpm: int | None = None) -> RoutePlan:
    limits = {"tpm": tpm} if tpm else {}
    cfg = parse_config(
        {"client_keys": [{"env": "K"}],
         "providers": [{"name": n, "kind": "openai", "base_url": f"http://{n}/v1",
                        "limits": limits} for n in ("a", "b")],
         "routes": [{"model": "chat", "targets": [{"provider": "a", "model": "x"},
                                                  {"provider": "b", "model": "x"}]}]},
        {"K": "k"},
    )  # fmt: skip
    return RoutePlan.build(cfg, cfg.routes[0], Keys("rc", "default"))


def decision(a: Code, b: Code, wait_ms: int) -> Decision:
    cands = tuple(Candidate(n, c, -1, -1, -1, "") for n, c in (("a", a), ("b", b)))
    return Decision(None, NOW_MS, NOW_MS // 1000, wait_ms, cands)


def body(err: RouterError) -> dict[str, Any]:
    return dict(to_openai_error(err)["error"])


@pytest.mark.parametrize(
    ("a", "b", "wait_ms", "status", "retry_after", "words"),
    [
        # every target out of service: an outage, each named
        (Code.CIRCUIT, Code.CIRCUIT, 12_300, 503, "13", ["a: circuit open", "b: circuit open"]),
        (Code.UNHEALTHY, Code.UNHEALTHY, -2, 503, None, ["a: down", "b: down"]),
        (Code.DRAINED, Code.DRAINED, -2, 503, None, ["a: drained", "b: drained"]),
        (Code.UNHEALTHY, Code.CIRCUIT, 4_000, 503, "4", ["a: down", "b: circuit open"]),
        (Code.DRAINED, Code.EXCLUDED, -2, 503, None, ["a: drained", "b: excluded"]),
        # some target only full: a lack of room, whatever the others are
        (Code.RPM, Code.CIRCUIT, 2_500, 429, "3", ["a: at its RPM limit", "b: circuit open"]),
        (Code.FULL, Code.UNHEALTHY, -1, 429, "1", ["a: at its in-flight limit", "b: down"]),
        (Code.COOLING, Code.DRAINED, 7_000, 429, "7", ["a: cooling down", "b: drained"]),
        (Code.TPM, Code.RPM, 900, 429, "1", ["a: at its TPM limit", "b: at its RPM limit"]),
    ],
)
def test_outage_is_503_and_capacity_is_429(
    a: Code, b: Code, wait_ms: int, status: int, retry_after: str | None, words: list[str]
) -> None:
    err = refusal(plan(), [10, 10], decision(a, b, wait_ms))
    assert err.status == status
    assert err.headers().get("Retry-After") == retry_after
    shape = body(err)
    assert set(shape) == {"message", "type", "code", "param"}
    for word in ["route chat", *words]:
        assert word in shape["message"]
    if status == 503:
        assert isinstance(err, Unavailable)
        assert (shape["type"], shape["code"]) == ("server_error", "no_provider_available")
    else:
        assert isinstance(err, Saturated)
        assert (shape["type"], shape["code"]) == ("rate_limit_error", "saturated")


def test_a_request_over_every_tpm_limit_is_no_lack_of_room() -> None:
    err = refusal(plan(tpm=100), [500, 500], decision(Code.TPM, Code.TPM, -2))
    assert err.status == 503
    assert "a: the request is over its TPM limit" in str(err)


def test_over_one_tpm_limit_while_another_is_full_is_a_lack_of_room() -> None:
    err = refusal(plan(tpm=100), [500, 500], decision(Code.TPM, Code.CIRCUIT, 3_000))
    assert err.status == 503  # a never fits, b is out: nothing will have room by waiting
    err = refusal(plan(tpm=100), [50, 50], decision(Code.TPM, Code.CIRCUIT, 3_000))
    assert err.status == 429


def local(health: dict[str, ProviderHealth], in_flight: dict[str, int] | None = None) -> Decision:
    cfg = parse_config(
        {"client_keys": [{"env": "K"}],
         "providers": [{"name": "a", "kind": "openai", "base_url": "http://a/v1",
                        "limits": {"max_in_flight": 1}},
                       {"name": "b", "kind": "openai", "base_url": "http://b/v1"}],
         "routes": [{"model": "chat", "targets": [{"provider": "a", "model": "x"},
                                                  {"provider": "b", "model": "x"}]}]},
        {"K": "k"},
    )  # fmt: skip
    p = RoutePlan.build(cfg, cfg.routes[0], Keys("rc", "default"))
    state = LocalState(cfg, lambda: NOW_MS / 1000)
    return state.acquire(p, [1, 1], [False, False], in_flight=in_flight or {}, health=health,
                         rand=0, expected_output=1)  # fmt: skip


OPEN = ProviderHealth(circuit="open", circuit_until_ms=NOW_MS + 8_000)
DOWN = ProviderHealth(health="down")
DRAINED = ProviderHealth(drained=True)


@pytest.mark.parametrize(
    ("health", "in_flight", "status", "wait_ms"),
    [
        ({"a": DOWN, "b": DRAINED}, {}, 503, -2),  # nothing to wait for: no queueing
        ({"a": OPEN, "b": DOWN}, {}, 503, 8_000),  # the circuit's trial time
        (
            {"a": OPEN, "b": ProviderHealth(circuit="half", circuit_until_ms=NOW_MS + 3_000)},
            {},
            503,
            3_000,
        ),  # fmt: skip
        ({"b": OPEN}, {"a": 1}, 429, 1_000),  # a full, b out: a lack of room
    ],
)
def test_degraded_decisions_are_told_alike(
    health: dict[str, ProviderHealth], in_flight: dict[str, int], status: int, wait_ms: int
) -> None:
    d = local(health, in_flight)
    assert d.index is None
    assert d.wait_ms == wait_ms
    assert refusal(plan(), [1, 1], d).status == status
