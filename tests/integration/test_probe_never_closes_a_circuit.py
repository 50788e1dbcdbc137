"""A good probe of the model list does not close a circuit that failing completions opened.

The incident: a provider keeps answering ``GET /models`` with 200 while its completions fail
with 500. Real processes: healthd probing the mock's model list, a router replica, the
mock provider, the session's private Redis.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from router.state.keys import Keys
from tests.helpers import ENV, Cluster, Gateway, Mock, auth, free_port, start_gateway, wait_until

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEYS = Keys("rc", "default")
PROBE_S = 0.2
COOLDOWN_S = 3.0
CHAT_PROBE = {
    "method": "POST",
    "path": "/chat/completions",
    "body": {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
}


def post(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth(), timeout=30)


def fields(r: redis.Redis, provider: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.provider(provider)).items()}


def start(
    cluster: Cluster, tmp_path: Path, redis_url: str, cooldown_s: float = COOLDOWN_S,
    **health: Any,
) -> Gateway:  # fmt: skip
    """Provider ``flaky`` (circuit after 2 failures) and ``steady``, and one healthd."""
    health = {"interval_s": PROBE_S, "timeout_s": 1.0, "rise": 1, "fall": 2, **health}
    circuit = {"failures": 2, "cooldown_s": cooldown_s, "max_cooldown_s": cooldown_s}
    mocks = [Mock("flaky", health=health, circuit=circuit), Mock("steady")]
    targets = [{"provider": m.name, "model": "m"} for m in mocks]
    routes = [{"model": "chat", "strategy": "round_robin", "max_attempts": 2, "targets": targets}]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes)
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(gw.config)]
    # REDIS_URL empty: the config's URL (the private Redis) wins over the environment's
    cluster.start("healthd", [*argv, "--port", str(free_port())], {**ENV, "REDIS_URL": ""})
    return gw


def probed(r: redis.Redis, at_least: int) -> bool:
    """Whether healthd has recorded ``at_least`` good probes of flaky in a row."""
    return int(fields(r, "flaky").get("h_ok", 0)) >= at_least


def open_circuit(gw: Gateway, r: redis.Redis) -> None:
    """Real requests fail at flaky until its circuit opens (clients see steady's answers)."""
    gw.mocks["flaky"].fault("error", status=500, scope="api")  # GET /v1/models answers 200
    deadline = time.monotonic() + 20
    while fields(r, "flaky").get("circ") != "open":
        assert time.monotonic() < deadline, "the circuit did not open"
        assert post(gw.urls[0]).status_code == 200  # failover hides the failures


class Load:
    """Clients posting without pause from a few threads; every answer must be a 200."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                r = client.post(f"{self.url}/v1/chat/completions", json=CHAT, headers=auth())
                self.statuses.append(r.status_code)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.mark.slow
def test_good_model_list_probes_leave_the_circuit_to_real_requests(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    gw = start(cluster, tmp_path, redis_url)
    flaky = gw.mocks["flaky"]
    r = redis.Redis(port=redis_port)
    wait_until(lambda: fields(r, "flaky").get("health") == "up", 20, "healthd to see flaky up")
    open_circuit(gw, r)
    opened = fields(r, "flaky")

    # Open: good probes keep coming, and none closes the circuit or lets a request through.
    received = flaky.stats()["received"]
    good = int(opened.get("h_ok", 0))
    with Load(gw.urls[0]) as load:
        wait_until(lambda: probed(r, good + 3), 10, "three more good probes of flaky")
        seen = flaky.stats()["received"]
        now = fields(r, "flaky")  # read after: still cooling now, so no trial came before
        assert now["circ"] == "open"
        assert now["circ_until"] == opened["circ_until"]
        assert int(now["circ_until"]) > int(r.time()[0]) * 1000
    assert seen == received
    assert set(load.statuses) == {200}

    # Half-open, once per cooldown: one trial at a time, and a failed trial reopens it.
    started = time.monotonic()
    with Load(gw.urls[0], threads=16) as load:
        time.sleep(2.5 * COOLDOWN_S)  # the load runs; what it did is counted after
    elapsed = time.monotonic() - started
    trials = flaky.stats()["received"] - received
    periods = int(elapsed / COOLDOWN_S) + 1
    print(f"{trials} trial(s) reached flaky in {elapsed:.1f}s ({periods} half-open periods)")
    assert 1 <= trials <= periods
    assert set(load.statuses) == {200}
    assert fields(r, "flaky")["circ"] in ("open", "half")

    # Only a real request that succeeds closes it.
    flaky.fault("none")
    with Load(gw.urls[0]):
        wait_until(lambda: "circ" not in fields(r, "flaky"), 4 * COOLDOWN_S + 5,
                   "a successful trial to close the circuit")  # fmt: skip
    assert int(fields(r, "flaky").get("o:ok", 0)) >= 1
    assert "flaky" in {post(gw.urls[0]).headers["x-router-provider"] for _ in range(4)}


@pytest.mark.slow
def test_a_good_completion_probe_closes_the_circuit(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    # a long cooldown: only the probe can close the circuit within the test's deadline; the
    # failing probes never mark flaky down (fall), which would keep requests from it
    gw = start(cluster, tmp_path, redis_url, 120.0, probe=CHAT_PROBE, fall=1000)
    r = redis.Redis(port=redis_port)
    wait_until(lambda: fields(r, "flaky").get("health") == "up", 20, "healthd to see flaky up")
    open_circuit(gw, r)
    gw.mocks["flaky"].fault("none")
    wait_until(lambda: "circ" not in fields(r, "flaky"), 10,
               "a good completion probe to close the circuit")  # fmt: skip
