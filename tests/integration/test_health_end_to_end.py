"""healthd, two replicas and a provider that goes down and comes back: no traffic in between."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ENV, Cluster, Mock, auth, free_port, start_gateway, wait_until

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
HEALTH = {"interval_s": 0.3, "timeout_s": 0.5, "rise": 2, "fall": 2}


def view(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/readyz", timeout=5).json()["providers"])


@pytest.mark.slow
def test_traffic_avoids_a_provider_while_it_is_down(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    mocks = [Mock("a", health=HEALTH), Mock("b", health=HEALTH)]
    targets = [{"provider": m.name, "model": "m"} for m in mocks]
    routes = [{"model": "chat", "strategy": "round_robin", "targets": targets}]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=2)
    port = free_port()
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(gw.config), "--port", str(port)]
    cluster.start("healthd", argv, ENV)
    for url in gw.urls:
        wait_until(lambda u=url: view(u)["a"]["health"] == "up", 10, "a to be seen up")

    gw.mocks["a"].fault("error", status=503)
    broke = time.monotonic()
    for url in gw.urls:
        wait_until(lambda u=url: view(u)["a"]["health"] == "down", 10, "a to be seen down")
    detected = time.monotonic() - broke
    print(f"a seen down by both replicas {detected:.2f}s after it broke (bound: 2 x 0.3 + 0.5)")

    received = gw.mocks["a"].stats()["received"]
    for url in gw.urls * 10:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth(), timeout=10)
        assert r.headers["x-router-provider"] == "b"
        assert r.headers["x-router-attempts"] == "1"
    assert gw.mocks["a"].stats()["received"] == received

    gw.mocks["a"].fault("none")
    for url in gw.urls:
        wait_until(lambda u=url: view(u)["a"]["health"] == "up", 10, "a to be seen up again")
    providers = {
        httpx.post(f"{u}/v1/chat/completions", json=CHAT, headers=auth()).headers[
            "x-router-provider"
        ]
        for u in gw.urls * 4
    }
    assert providers == {"a", "b"}
