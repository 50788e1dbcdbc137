"""Replicas follow shared health: circuits, drains and resyncs reach every replica."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.helpers import ENV, Cluster, Gateway, Mock, auth, start_gateway, wait_until

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def post(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth(), timeout=30)


def view(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/readyz", timeout=5).json())


def two_providers(cluster: Cluster, tmp_path: Path, redis_url: str, **extra: Any) -> Gateway:
    mocks = [
        Mock("flaky", circuit={"failures": 3, "cooldown_s": 30}),
        Mock("steady"),
    ]
    targets = [{"provider": m.name, "model": "m"} for m in mocks]
    routes = [{"model": "chat", "strategy": "round_robin", "max_attempts": 2, "targets": targets}]
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=2, **extra)


def test_a_circuit_opened_by_one_replica_stops_the_other(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = two_providers(cluster, tmp_path, redis_url)
    gw.mocks["flaky"].fault("error", status=500)
    first, second = gw.urls
    while gw.mocks["flaky"].stats()["faults"] < 3:  # bounded: each request tries flaky or not
        assert post(first).status_code == 200  # failover hides the failures from clients
    wait_until(lambda: view(second)["providers"]["flaky"]["circuit"] == "open", 10,
               "the open circuit to reach the other replica's view")  # fmt: skip
    before = gw.mocks["flaky"].stats()["received"]
    for _ in range(10):
        r = post(second)
        assert r.headers["x-router-provider"] == "steady"
        assert r.headers["x-router-attempts"] == "1"
    assert gw.mocks["flaky"].stats()["received"] == before


def test_a_lost_event_is_corrected_by_the_resync(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    gw = two_providers(cluster, tmp_path, redis_url, replica={"resync_s": 1})
    r = redis.Redis(port=redis_port)
    # a transition whose message was lost: the state and version change, nothing is published
    r.hset("rc:{default}:provider:flaky", mapping={"health": "down", "h_since": 1, "gate": 1})
    r.incr("rc:{default}:health:version")
    for url in gw.urls:
        wait_until(lambda u=url: view(u)["providers"]["flaky"]["health"] == "down", 10,
                   "the resync to correct the view")  # fmt: skip
    for _ in range(6):  # and the acquire script reads health from Redis itself
        assert post(gw.urls[0]).headers["x-router-provider"] == "steady"


def test_routerctl_drain_and_enable_reach_every_replica(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = two_providers(cluster, tmp_path, redis_url)

    def routerctl(*args: str) -> str:
        argv = [sys.executable, "-m", "router.ctl", *args, "--config", str(gw.config)]
        done = subprocess.run(argv, env={**os.environ, **ENV}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "drained for every replica" in routerctl("drain", "flaky")
    for url in gw.urls:
        wait_until(lambda u=url: view(u)["providers"]["flaky"]["drained"], 10, "the drain")
    assert {post(u).headers["x-router-provider"] for u in gw.urls * 3} == {"steady"}
    routerctl("enable", "flaky")
    wait_until(lambda: not view(gw.urls[1])["providers"]["flaky"]["drained"], 10, "the enable")
    assert "flaky" in {post(u).headers["x-router-provider"] for u in gw.urls * 3}
