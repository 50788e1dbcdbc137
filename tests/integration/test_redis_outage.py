"""Redis stopped and restarted under load: replicas keep answering, then share again."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import (
    Cluster,
    Mock,
    Proc,
    auth,
    free_port,
    port_open,
    redis_server_binary,
    start_gateway,
    wait_until,
)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def start_redis(cluster: Cluster, port: int, tmp: Path) -> Proc:
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
    proc = cluster.start(f"redis-{time.monotonic_ns()}", argv)
    wait_until(lambda: port_open(port), 10, "redis-server to listen")
    return proc


class Load:
    """Steady client traffic over every replica, recording each answer's status."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = itertools.cycle(urls)
        self.statuses: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers=auth(), timeout=10) as c:
            while not self._stop.is_set():
                r = c.post(f"{next(self.urls)}/v1/chat/completions", json=CHAT)
                self.statuses.append((time.monotonic(), r.status_code))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(20)


def status(url: str) -> str:
    return str(httpx.get(f"{url}/readyz", timeout=5).json()["status"])


@pytest.mark.slow
def test_redis_restart_under_load(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(cluster, port, tmp_path)
    mocks = [Mock("a", limits={"rpm": 100000}), Mock("b", limits={"rpm": 100000})]
    targets = [{"provider": m.name, "model": "m"} for m in mocks]
    routes = [{"model": "chat", "targets": targets}]
    gw = start_gateway(cluster, tmp_path, f"redis://127.0.0.1:{port}/0", mocks, routes,
                       replicas=2, lease_ttl_s=5)  # fmt: skip
    with Load(gw.urls) as load:
        wait_until(lambda: len(load.statuses) >= 20, 10, "traffic")
        server.kill()
        down_at = time.monotonic()
        for url in gw.urls:
            wait_until(lambda u=url: status(u) == "degraded", 10, "degraded mode")
        n = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= n + 50, 20, "traffic while Redis is down")
        start_redis(cluster, port, tmp_path)  # empty: no scripts, no state
        up_at = time.monotonic()
        for url in gw.urls:
            wait_until(lambda u=url: status(u) == "ready", 20, "shared state again")
        n = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= n + 20, 10, "traffic after the restart")

    codes = {code for _, code in load.statuses}
    assert codes == {200}, codes
    served_down = sum(1 for t, _ in load.statuses if down_at <= t < up_at)
    print(f"served {served_down} requests while Redis was down ({up_at - down_at:.1f}s)")
    r = redis.Redis(port=port)
    counted = sum(int(r.hget(f"rc:{{default}}:provider:{m}", "rpm") or 0) for m in ("a", "b"))
    assert counted >= 20  # shared counting resumed
    for m in ("a", "b"):  # nothing left in flight, nothing double-counted
        wait_until(lambda m=m: r.zcard(f"rc:{{default}}:provider:{m}:leases") == 0, 10,
                   "the leases to be released")  # fmt: skip
