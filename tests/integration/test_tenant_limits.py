"""Tenant limits and budgets hold summed over two replicas, with the openai SDK as client:
exactly the limit is served, the rest is refused with the tenant's own code and a
Retry-After from the shared state, and another tenant is not touched."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from router.budgets import cost_nano
from router.config import Price
from router.state.tenantstate import unpack_live
from tests.helpers import Cluster, Gateway, Mock, start_gateway, wait_until

KEYS = {"team-a": "team-a-key-0123456789", "team-b": "team-b-key-0123456789"}
ENV = {"TEAM_A_KEY": KEYS["team-a"], "TEAM_B_KEY": KEYS["team-b"]}
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
"""1000 nano-USD per prompt token, 2000 per completion token."""


def tenants(**a: Any) -> list[dict[str, Any]]:
    return [
        {"name": "team-a", "keys": [{"env": "TEAM_A_KEY"}], **a},
        {"name": "team-b", "keys": [{"env": "TEAM_B_KEY"}]},
    ]


def gateway(cluster: Cluster, tmp: Path, redis_url: str, *mock_args: str, **team_a: Any) -> Gateway:
    mock = Mock("a", *mock_args)
    targets = [{"provider": "a", "model": "m", "price": PRICE}]
    routes = [{"model": "chat", "targets": targets}]
    gw = start_gateway(cluster, tmp, redis_url, [mock], routes, replicas=0,
                       tenants=tenants(**team_a))  # fmt: skip
    for _ in range(2):
        gw.add_replica(ENV)
    return gw


def client(url: str, tenant: str) -> openai.AsyncOpenAI:
    # no retries: the SDK would otherwise wait out our Retry-After itself
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0)


async def ask(c: openai.AsyncOpenAI, **body: Any) -> Any:
    """The completion, or the SDK's error."""
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    try:
        return await c.chat.completions.create(model="chat", **body)
    except openai.APIStatusError as exc:
        return exc


def fire(gw: Gateway, tenant: str, n: int, concurrency: int, spread_s: float = 0,
         replica: int | None = None, **body: Any) -> list[Any]:  # fmt: skip
    """``n`` requests of ``tenant`` over both replicas (or the one numbered ``replica``),
    started over ``spread_s`` seconds."""

    async def run() -> list[Any]:
        urls = gw.urls if replica is None else [gw.urls[replica]]
        clients = [client(url, tenant) for url in urls]
        pick = itertools.cycle(clients)
        sem = asyncio.Semaphore(concurrency)

        async def one(k: int, c: openai.AsyncOpenAI) -> Any:
            await asyncio.sleep(spread_s * k / n)
            async with sem:
                return await ask(c, **body)

        try:
            return await asyncio.gather(*(one(k, next(pick)) for k in range(n)))
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(run())


def codes(results: list[Any]) -> list[str]:
    return [
        "ok" if not isinstance(r, openai.APIStatusError) else r.body["code"]  # type: ignore[index]
        for r in results
    ]


def test_tenant_rpm_over_two_replicas(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    gw = gateway(cluster, tmp_path, redis_url, limits={"rpm": 20})

    async def both() -> tuple[list[Any], list[Any]]:
        loop = asyncio.get_running_loop()
        a = loop.run_in_executor(None, lambda: fire(gw, "team-a", 60, 8, spread_s=8))
        b = loop.run_in_executor(None, lambda: fire(gw, "team-b", 30, 4, spread_s=8))
        return await a, await b

    a, b = asyncio.run(both())
    assert codes(a).count("ok") == 20
    refused = [r for r in a if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 40
    assert all(r.status_code == 429 for r in refused)
    assert {r.body["code"] for r in refused} == {"tenant_rpm_exceeded"}  # type: ignore[index]
    assert all(r.body["type"] == "rate_limit_error" for r in refused)  # type: ignore[index]
    assert codes(b) == ["ok"] * 30  # the other tenant is not touched
    assert gw.mocks["a"].stats()["ok"] == 50

    # the last refusal's Retry-After: a request after it succeeds
    retry = int(refused[-1].response.headers["retry-after"])
    assert 1 <= retry <= 62
    refused_at = time.monotonic()

    async def after() -> Any:
        await asyncio.sleep(max(0.0, refused_at + retry - time.monotonic()))
        async with client(gw.urls[1], "team-a") as c:
            return await ask(c)

    assert codes([asyncio.run(after())]) == ["ok"]


def test_tenant_in_flight_over_two_replicas(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url, "--latency-ms", "1500",
                 limits={"max_in_flight": 3})  # fmt: skip
    got = codes(fire(gw, "team-a", 10, concurrency=10))
    assert got.count("ok") == 3
    assert got.count("tenant_in_flight_exceeded") == 7
    assert codes(fire(gw, "team-b", 6, concurrency=6)) == ["ok"] * 6


def test_tenant_tpm_over_two_replicas(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    # each request reserves its prompt's estimate (9 tokens for "hello") + max_tokens (100)
    gw = gateway(cluster, tmp_path, redis_url, "--latency-ms", "1500",
                 limits={"tpm": 1000})  # fmt: skip
    got = codes(fire(gw, "team-a", 20, concurrency=20, max_tokens=100))
    assert got.count("ok") == 1000 // 109
    assert set(got) == {"ok", "tenant_tpm_exceeded"}
    # a request over the whole limit: refused, and told no wait helps
    big = fire(gw, "team-b", 1, 1, max_tokens=100)  # team-b: no limit
    assert codes(big) == ["ok"]
    alone = fire(gw, "team-a", 1, 1, max_tokens=5000)
    assert codes(alone) == ["tenant_tpm_exceeded"]
    assert "retry-after" not in alone[0].response.headers


def test_budget_stops_admissions_and_spend_is_the_reported_usage(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    # reserve: 9 x 1000 + 100 x 2000 = 209,000 nano-USD per request; budget 1,000,000
    gw = gateway(cluster, tmp_path, redis_url, budget={"usd": 0.001, "period": "day"})
    r = redis.Redis.from_url(redis_url)

    def settled() -> bool:  # every release has run (they follow the answers)
        return r.zcard("rc:{default}:provider:a:leases") == 0

    results = []
    for k in range(30):  # one at a time, over both replicas (24 fit: 34,000 each)
        wait_until(settled, 5, "the previous request's release")
        results += fire(gw, "team-a", 1, 1, replica=k % 2, max_tokens=100)
    wait_until(settled, 5, "the last release")
    served = [x for x in results if not isinstance(x, openai.APIStatusError)]
    refused = [x for x in results if isinstance(x, openai.APIStatusError)]
    assert served
    assert refused
    assert codes(results) == ["ok"] * len(served) + ["insufficient_quota"] * len(refused)
    assert all(x.status_code == 429 for x in refused)
    assert refused[0].body["type"] == "insufficient_quota"  # type: ignore[index]
    assert 0 < int(refused[0].response.headers["retry-after"]) <= 86_400
    price = Price.model_validate(PRICE)
    spent = sum(cost_nano(r.usage.prompt_tokens, r.usage.completion_tokens, price) for r in served)
    assert spent <= 1_000_000 < spent + 209_000  # stopped at the budget, not before

    r = redis.Redis.from_url(redis_url)
    try:
        tenant = unpack_live(r.get("rc:{default}:tenant:team-a:live"))
        assert tenant["spend_nano"] == spent  # every release has corrected its reservation
        day = r.keys("rc:{default}:usage:day:*")
        usage = {k.decode(): int(v) for k, v in r.hgetall(day[0]).items()}
    finally:
        r.close()
    assert usage["team-a|chat|a|cost"] == spent
    assert usage["team-a|chat|a|req"] == len(served)
    assert usage["team-a|chat|a|in"] == sum(x.usage.prompt_tokens for x in served)
    assert usage["team-a|chat|a|out"] == sum(x.usage.completion_tokens for x in served)


@pytest.mark.parametrize("stream", [False, True])
def test_streams_are_charged_by_their_usage(
    cluster: Cluster, tmp_path: Path, redis_url: str, stream: bool
) -> None:
    gw = gateway(cluster, tmp_path, redis_url, "--completion-tokens", "7",
                 budget={"usd": 1})  # fmt: skip

    async def run() -> None:
        async with client(gw.urls[0], "team-a") as c:
            if stream:
                s = await c.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
                )
                async for _ in s:
                    pass
            else:
                await ask(c)

    asyncio.run(run())
    r = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the release runs after the answer
            day = r.keys("rc:{default}:usage:day:*")
            if day and r.hget(day[0], "team-a|chat|a|req"):
                break
            time.sleep(0.02)
        usage = {k.decode(): int(v) for k, v in r.hgetall(day[0]).items()}
    finally:
        r.close()
    assert usage["team-a|chat|a|out"] == 7
    assert usage["team-a|chat|a|cost"] == usage["team-a|chat|a|in"] * 1000 + 7 * 2000


def test_budget_overshoot_when_the_prompt_is_underestimated(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """The one way spend passes a budget: a provider counting more prompt tokens than the
    estimate reserved (here 4 times as many). The overshoot is at most what the requests
    in flight at the crossing under-reserved: concurrency x (actual - reserved) cost."""
    gw = gateway(cluster, tmp_path, redis_url, "--prompt-token-scale", "4",
                 "--completion-tokens", "10", "--latency-ms", "300",
                 budget={"usd": 0.002, "period": "day"})  # fmt: skip
    text = "hello " * 100  # 600 characters: the router's estimate is 157 tokens
    concurrency = 6
    results = fire(gw, "team-a", 30, concurrency, max_tokens=10,
                   messages=[{"role": "user", "content": text}])  # fmt: skip
    served = [x for x in results if not isinstance(x, openai.APIStatusError)]
    assert {x.usage.prompt_tokens for x in served} == {600}
    reserved, actual = 157 * 1000 + 10 * 2000, 600 * 1000 + 10 * 2000
    spent = len(served) * actual
    overshoot = spent - 2_000_000
    bound = concurrency * (actual - reserved)
    print(
        f"\nbudget 2,000,000 nano-USD: {len(served)} served, spent {spent}, overshoot "
        f"{max(0, overshoot)} (bound {bound}: {concurrency} x {actual - reserved})"
    )
    assert overshoot <= bound
    assert set(codes(results)) == {"ok", "insufficient_quota"}
