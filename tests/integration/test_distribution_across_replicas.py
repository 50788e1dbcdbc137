"""Each strategy spreads traffic as it promises, with two replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.faults.support import scrape, total
from tests.helpers import Cluster, Gateway, Mock, auth, start_gateway

STRATEGIES = ["round_robin", "weighted", "least_connections", "least_latency", "headroom"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("dist")
    cluster = Cluster(tmp)
    mocks = [
        Mock("p1", "--latency-ms", "10", weight=3),
        Mock("p2", "--latency-ms", "10", weight=2),
        Mock("p3", "--latency-ms", "120", weight=1),
    ]
    # headroom reads the providers' limits: give it provider names of its own, on the same
    # servers, so the other strategies' traffic is not in its windows
    limited = [
        Mock(f"h{i}", alias_of=m, limits={"rpm": rpm})
        for i, (m, rpm) in enumerate(zip(mocks, [1000, 500, 250], strict=True), 1)
    ]
    routes = [
        {"model": s, "strategy": s, "targets": [{"provider": m.name, "model": "m"} for m in
                                                 (limited if s == "headroom" else mocks)]}
        for s in STRATEGIES
    ]  # fmt: skip
    mocks += limited
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        yield start_gateway(cluster, Path(tmp), url, mocks, routes, replicas=2)
    finally:
        cluster.stop_all()


def drive(gw: Gateway, model: str, n: int, concurrency: int = 24) -> dict[str, int]:
    """Send ``n`` chat requests spread over both replicas; return each provider's own count."""
    for m in gw.mocks.values():
        httpx.post(f"{m.url}/stats/reset", timeout=5)
    urls = itertools.cycle(gw.urls)

    async def run() -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        async with httpx.AsyncClient(headers=auth(), timeout=30) as client:

            async def one(url: str) -> int:
                async with sem:
                    r = await client.post(f"{url}/v1/chat/completions", json=body)
                    return r.status_code

            return await asyncio.gather(*(one(next(urls)) for _ in range(n)))

    statuses = asyncio.run(run())
    assert set(statuses) == {200}
    stats = {name: m.stats() for name, m in gw.mocks.items()}
    assert all(s["rate_limited"] == 0 for s in stats.values())
    counts = {name: int(s["ok"]) for name, s in stats.items()}
    print(f"{model} x{n}: {counts}")  # the figures for the issue note (pytest -s)
    return counts


def off_rotation(gw: Gateway) -> float:
    """Decisions the replicas made alone so far (a Redis reply later than ``redis.timeout_ms``,
    as on a machine too loaded to answer in time) and attempts failed over (a provider too
    slow to answer in time): each can put a request outside the global rotation."""
    n = 0.0
    for url in gw.urls:
        m = scrape(url)
        n += total(m, "router_decision_duration_seconds_count", mode="local")
        n += total(m, "router_failovers_total")
    return n


def test_round_robin_counts_within_one(gw: Gateway) -> None:
    before = off_rotation(gw)
    counts = drive(gw, "round_robin", 600, concurrency=8)
    off = off_rotation(gw) - before
    # each may put one more on a provider: none on a machine that is not starved (the CI run
    # that needed this, 199/202/199, had other work loading it)
    assert max(counts.values()) - min(counts.values()) <= 1 + off, (counts, off)


def test_weighted_within_two_percent_of_weights(gw: Gateway) -> None:
    counts = drive(gw, "weighted", 3000, concurrency=32)
    expected = {"p1": 1500, "p2": 1000, "p3": 500}
    for name, want in expected.items():
        assert abs(counts[name] - want) <= 0.02 * want, counts


def test_least_connections_avoids_the_busy_provider(gw: Gateway) -> None:
    counts = drive(gw, "least_connections", 600, concurrency=16)
    assert counts["p3"] < min(counts["p1"], counts["p2"]) / 2, counts


def test_least_latency_prefers_the_fast_providers(gw: Gateway) -> None:
    counts = drive(gw, "least_latency", 600, concurrency=8)
    assert counts["p3"] < 0.1 * sum(counts.values()), counts


def test_headroom_follows_the_limits(gw: Gateway) -> None:
    counts = drive(gw, "headroom", 700, concurrency=16)
    total = sum(counts.values())
    for name, share in {"p1": 4 / 7, "p2": 2 / 7, "p3": 1 / 7}.items():  # served by h1..h3
        assert abs(counts[name] / total - share) <= 0.03, counts
