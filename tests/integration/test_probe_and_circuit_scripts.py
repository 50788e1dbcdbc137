"""What a probe may do to a circuit that failed requests opened, in the scripts themselves.

A good probe of the model list never closes it (a provider often lists its models while its
completions fail); bringing the provider back up, it lets the one half-open trial go at once.
A good probe that is a real request (a completion) closes it, as a successful request does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.config import Config, parse_config
from router.state.health import HealthStore
from router.state.store import Lease, Outcome, RoutePlan, Store
from router.strategies import Code

COOLDOWN_MS = 60_000


def config(redis_url: str) -> Config:
    provider = {
        "name": "p", "kind": "openai", "base_url": "http://x/v1",
        "circuit": {"failures": 2, "cooldown_s": COOLDOWN_MS / 1000},
    }  # fmt: skip
    return parse_config({
        "redis_url": redis_url, "client_keys": [{"env": "K"}], "providers": [provider],
        "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
    }, {"K": "client-key"})  # fmt: skip


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_config(config(redis_url))
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def plan(store: Store, redis_url: str) -> RoutePlan:
    cfg = config(redis_url)
    return RoutePlan.build(cfg, cfg.routes[0], store.keys)


async def probe(store: Store, good: bool, real: bool = False) -> str:
    """One probe (rise and fall 1); the health state it left."""
    write = await HealthStore(store).report_probe("p", 0, good, 1.0, "", 1, 1, real=real)
    return write.state


async def request(store: Store, plan: RoutePlan, lease_id: str, outcome: str) -> None:
    d = await store.acquire(plan, lease_id, [1], [False], rand=0, expected_output=1)
    assert d.index == 0, d
    await store.release(Lease(lease_id, "p", d.bucket, 1), Outcome(outcome))


async def open_circuit(store: Store, plan: RoutePlan) -> dict[str, str]:
    """Two failed requests in a row open the circuit; its fields then."""
    await request(store, plan, "fail-1", "http_5xx")
    await request(store, plan, "fail-2", "http_5xx")
    fields = await store.provider_fields("p")
    assert fields["circ"] == "open"
    return fields


async def redis_ms(store: Store) -> int:
    seconds, micros = await store.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_good_model_list_probe_leaves_an_open_circuit_alone(
    store: Store, plan: RoutePlan
) -> None:
    assert await probe(store, True) == "up"
    opened = await open_circuit(store, plan)
    for _ in range(3):
        assert await probe(store, True) == "up"
    fields = await store.provider_fields("p")
    assert (fields["circ"], fields["circ_until"]) == ("open", opened["circ_until"])
    assert fields["fails"] == "2"  # a probe is no request: the failures in a row still count
    d = await store.acquire(plan, "blocked", [1], [False], rand=0, expected_output=1)
    assert d.index is None
    assert d.candidates[0].code is Code.CIRCUIT


async def test_a_probe_bringing_the_provider_up_lets_one_trial_go(
    store: Store, plan: RoutePlan
) -> None:
    assert await probe(store, True) == "up"
    await open_circuit(store, plan)
    assert await probe(store, False) == "down"
    assert await probe(store, True) == "up"  # healthd saw it recover: the trial may go now
    fields = await store.provider_fields("p")
    assert fields["circ"] == "open"
    assert int(fields["circ_until"]) <= await redis_ms(store)

    decisions = await asyncio.gather(*(
        store.acquire(plan, f"c{i}", [1], [False], rand=0, expected_output=1) for i in range(50)
    ))  # fmt: skip
    chosen = [i for i, d in enumerate(decisions) if d.index is not None]
    assert len(chosen) == 1  # one half-open trial, however many ask at once
    assert {d.candidates[0].code for d in decisions if d.index is None} == {Code.CIRCUIT}
    fields = await store.provider_fields("p")
    assert (fields["circ"], fields["circ_trial"]) == ("half", f"c{chosen[0]}")

    # the trial fails: open again, for twice the cooldown; the next good probe changes nothing
    trial = decisions[chosen[0]]
    await store.release(Lease(f"c{chosen[0]}", "p", trial.bucket, 1), Outcome("http_5xx"))
    fields = await store.provider_fields("p")
    assert (fields["circ"], fields["circ_opens"]) == ("open", "2")
    assert int(fields["circ_until"]) - await redis_ms(store) > COOLDOWN_MS
    assert await probe(store, True) == "up"
    assert (await store.provider_fields("p"))["circ_until"] == fields["circ_until"]


async def test_a_probe_leaves_a_trial_in_flight_alone(store: Store, plan: RoutePlan) -> None:
    assert await probe(store, True) == "up"
    await open_circuit(store, plan)
    assert await probe(store, False) == "down"
    assert await probe(store, True) == "up"
    d = await store.acquire(plan, "trial", [1], [False], rand=0, expected_output=1)
    assert d.index == 0
    half = await store.provider_fields("p")
    assert await probe(store, False) == "down"
    assert await probe(store, True) == "up"
    fields = await store.provider_fields("p")
    assert (fields["circ"], fields["circ_until"], fields["circ_trial"]) == (
        "half", half["circ_until"], "trial"
    )  # fmt: skip
    await store.release(Lease("trial", "p", d.bucket, 1), Outcome("ok"))
    assert "circ" not in await store.provider_fields("p")  # only its success closes it


async def test_a_good_probe_that_is_a_real_request_closes_the_circuit(
    store: Store, plan: RoutePlan
) -> None:
    assert await probe(store, True, real=True) == "up"
    await open_circuit(store, plan)
    assert await probe(store, True, real=True) == "up"
    fields = await store.provider_fields("p")
    assert "circ" not in fields
    assert (fields["fails"], fields["circ_opens"]) == ("0", "0")
    d = await store.acquire(plan, "after", [1], [False], rand=0, expected_output=1)
    assert d.index == 0
