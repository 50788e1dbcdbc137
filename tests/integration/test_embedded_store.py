"""With no Redis configured, one replica runs on the embedded store and says so."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.helpers import Cluster, Mock, auth, start_gateway


def test_one_replica_runs_without_redis(cluster: Cluster, tmp_path: Path) -> None:
    os.environ.pop("REDIS_URL", None)
    mocks = [Mock("a", limits={"rpm": 2}), Mock("b")]
    targets = [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]
    routes = [{"model": "chat", "strategy": "round_robin", "targets": targets}]
    gw = start_gateway(cluster, tmp_path, None, mocks, routes)
    url = gw.urls[0]

    assert httpx.get(f"{url}/readyz").json()["store"] == "embedded"
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth()) for _ in range(6)
    ]
    assert {r.status_code for r in answers} == {200}
    assert gw.mocks["a"].stats()["ok"] == 2  # the same scripts enforce the limit
    assert gw.mocks["b"].stats()["ok"] == 4
    proc, _ = gw.replicas[0]
    assert "embedded in-process store" in proc.output()
