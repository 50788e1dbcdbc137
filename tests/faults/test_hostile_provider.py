"""A hostile provider (tests/faults/hostile.py): answers that never end or never stop growing.

Each attack ends in a failover or a clear OpenAI-shaped error, is counted against the hostile
provider (``bad_response``, ``timeout``, or its 5xx), and the replica's memory stays under
twice what it holds idle while other clients are served. Route ``pair`` tries ``hostile``
first (weight 100 against 1) and fails over to ``good``; ``solo`` has only ``hostile``;
``calm`` only ``good``, for the bystanders. The provider bounds are the defaults.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.faults.hostile import Hostile
from tests.faults.support import CHAT, Load, counter, reset_provider_state, scrape, total
from tests.helpers import (
    PROVIDER_KEY,
    Cluster,
    Gateway,
    Mock,
    auth,
    wait_until,
    write_config,
)

READ_S = 2.0
IDLE_S = 1.0
TOTAL_S = 3.0
ROUTE_TIMEOUT_S = 2.0


class HostileSpec(Mock):
    """The hostile provider's entry in the router's config (its server runs in this process)."""

    def __init__(self, hostile: Hostile, **provider: Any) -> None:
        super().__init__("hostile", **provider)
        self.port = hostile.port


@dataclass
class Rig:
    gw: Gateway
    hostile: Hostile
    r: redis.Redis

    @property
    def url(self) -> str:
        return self.gw.urls[0]

    @property
    def pid(self) -> int:
        return self.gw.replicas[0][0].pid


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Rig]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("hostile-provider")
    cluster = Cluster(tmp)
    good = Mock("good", "--chunk-interval-ms", "2")
    timeouts = {"read_s": READ_S, "connect_s": 1.0, "stream_idle_s": IDLE_S,
                "stream_total_s": TOTAL_S}  # fmt: skip
    routes: list[dict[str, Any]] = [
        {"model": "pair", "strategy": "weighted", "max_attempts": 2,
         "targets": [{"provider": "hostile", "model": "m", "weight": 100},
                     {"provider": "good", "model": "m"}]},
        {"model": "solo", "timeout_s": ROUTE_TIMEOUT_S,
         "targets": [{"provider": "hostile", "model": "m"}]},
        {"model": "calm", "targets": [{"provider": "good", "model": "m"}]},
    ]  # fmt: skip
    with Hostile() as hostile:
        try:
            cluster.mock("good", good.port, "--api", "openai", "--api-key", PROVIDER_KEY,
                         *good.args)  # fmt: skip
            # circuits would open after a few failures in a row and hide hostile from later tests
            spec = HostileSpec(hostile, timeouts=timeouts, circuit={"failures": 1000})
            config = write_config(tmp / "router.yaml", f"redis://127.0.0.1:{redis_port}/0",
                                  [spec, good], routes)  # fmt: skip
            gw = Gateway(cluster, config, [good])
            gw.add_replica({"REDIS_URL": ""})
            yield Rig(gw, hostile, redis.Redis(port=redis_port, decode_responses=True))
        finally:
            cluster.stop_all()


@pytest.fixture(autouse=True)
def _calm(rig: Rig) -> None:
    rig.hostile.mode = "ok"
    reset_provider_state(rig.r, ["hostile", "good"])


def post(rig: Rig, model: str, *, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{rig.url}/v1/chat/completions",
                      json={**CHAT, "model": model, "stream": stream},
                      headers=auth(), timeout=30)  # fmt: skip


def read_stream(rig: Rig, model: str) -> dict[str, Any]:
    """Stream a completion; what arrived: status, headers, tokens, error events, [DONE]."""
    out: dict[str, Any] = {"tokens": 0, "errors": [], "done": False, "body": ""}
    body = {**CHAT, "model": model, "stream": True}
    with (
        httpx.Client(headers=auth(), timeout=30) as c,
        c.stream("POST", f"{rig.url}/v1/chat/completions", json=body) as resp,
    ):
        out["status"], out["headers"] = resp.status_code, resp.headers
        if resp.status_code != 200:
            out["body"] = resp.read().decode()
            return out
        for line in resp.iter_lines():
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
            elif '"error"' in data:
                out["errors"].append(json.loads(data)["error"])
            elif '"content":"' in data:
                out["tokens"] += 1
    return out


def assert_openai_error(status: int, text: str, want: int) -> str:
    assert status == want, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "code", "param"}
    return str(err["message"])


ATTACKS: dict[str, tuple[bool, str, str]] = {
    # mode: (streamed request, outcome counted against hostile, what the message says)
    "huge_body": (False, "bad_response", "over 16777216 bytes"),
    "endless_body": (False, "bad_response", "over 16777216 bytes"),
    "gzip_bomb": (False, "bad_response", "inflates to over 16777216 bytes"),
    "endless_headers": (False, "bad_response", "headers are over 65536 bytes"),
    "many_headers": (False, "bad_response", "over 128 headers"),
    "huge_error": (False, "http_5xx", "500 (no readable body)"),
    "giant_event": (True, "bad_response", "SSE event over 4194304 bytes"),
    "streamed gzip_bomb": (True, "bad_response", "SSE event over 4194304 bytes"),
}


def attack(rig: Rig, name: str, model: str) -> tuple[int, str, dict[str, str]]:
    """Send the attack's request on ``model``: its status, body and headers."""
    stream, _, _ = ATTACKS[name]
    rig.hostile.mode = name.removeprefix("streamed ")
    if not stream:
        r = post(rig, model)
        return r.status_code, r.text, dict(r.headers)
    got = read_stream(rig, model)
    assert not got["errors"], got
    return got["status"], got["body"], dict(got["headers"])


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_answer_fails_over_or_is_a_clear_error(rig: Rig, name: str) -> None:
    _, outcome, why = ATTACKS[name]
    before, shared = scrape(rig.url), counter(rig.r, "hostile", outcome)
    status, _, headers = attack(rig, name, "pair")
    assert status == 200
    assert headers["x-router-provider"] == "good"
    assert headers["x-router-attempts"] == "2"
    status, text, headers = attack(rig, name, "solo")
    message = assert_openai_error(status, text, 502)
    assert f"hostile: {outcome}" in message
    assert why in message
    print(f"\n{name}: {message}")
    after = scrape(rig.url)
    failovers = "router_failovers_total"
    for route in ("pair", "solo"):
        moved = total(after, failovers, route=route, provider="hostile", reason=outcome) - total(
            before, failovers, route=route, provider="hostile", reason=outcome
        )
        assert moved == 1, route
    wait_until(lambda: counter(rig.r, "hostile", outcome) == shared + 2, 5,
               f"o:{outcome} of hostile to count both attempts")  # fmt: skip


def test_a_stream_dripping_before_its_first_event_ends_at_the_routes_timeout(rig: Rig) -> None:
    # before: each byte reset the read timeout, so the route's timeout_s never applied
    rig.hostile.mode = "drip_first"
    shared = counter(rig.r, "hostile", "timeout")
    started = time.monotonic()
    got = read_stream(rig, "solo")
    took = time.monotonic() - started
    print(f"\ndrip before the first event, timeout_s {ROUTE_TIMEOUT_S}: {took:.2f}s")
    message = assert_openai_error(got["status"], got["body"], 504)
    assert "hostile: timeout (no event within the route's timeout_s)" in message
    assert ROUTE_TIMEOUT_S - 0.1 < took < ROUTE_TIMEOUT_S + 1.5
    wait_until(lambda: counter(rig.r, "hostile", "timeout") == shared + 1, 5, "o:timeout")


@pytest.mark.parametrize(
    ("mode", "limit_s", "why"),
    [("drip_after", IDLE_S, "no event within stream_idle_s"),
     ("endless_events", TOTAL_S, "the stream ran past stream_total_s")],
)  # fmt: skip
def test_a_stream_stalling_or_endless_after_its_first_event_is_cut(
    rig: Rig, mode: str, limit_s: float, why: str
) -> None:
    # before: after the first event no limit applied (a byte a second held it for good)
    rig.hostile.mode = mode
    shared = counter(rig.r, "hostile", "timeout")
    started = time.monotonic()
    got = read_stream(rig, "pair")
    took = time.monotonic() - started
    print(f"\n{mode}: cut after {took:.2f}s, {got['tokens']} tokens: {got['errors']}")
    assert got["status"] == 200
    assert got["headers"]["x-router-provider"] == "hostile"  # too late to fail over
    assert got["tokens"] >= 1
    assert not got["done"]
    assert [e["code"] for e in got["errors"]] == ["timeout"]
    assert why in got["errors"][0]["message"]
    assert limit_s - 0.1 < took < limit_s + 1.5
    wait_until(lambda: counter(rig.r, "hostile", "timeout") == shared + 1, 5, "o:timeout")


def memory(pid: int) -> dict[str, int]:
    """A process's VmRSS and VmHWM (peak RSS), in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def test_replica_memory_stays_bounded_while_others_are_served(rig: Rig) -> None:
    with httpx.Client(headers=auth(), timeout=30) as c:  # warm up every code path first
        for model in ("calm", "pair", "solo"):
            for stream in (False, True):
                c.post(f"{rig.url}/v1/chat/completions",
                       json={**CHAT, "model": model, "stream": stream})  # fmt: skip
    idle = memory(rig.pid)["VmRSS"]
    Path(f"/proc/{rig.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: peak from now on
    failures: list[str] = []

    def attacker(names: list[str]) -> None:
        for name in names:
            for model in ("pair", "solo"):
                status, text, _ = attack(rig, name, model)
                if status not in (200, 502):
                    failures.append(f"{name} on {model}: {status} {text[:200]}")

    names = list(ATTACKS) * 3
    bystanders = Load([rig.url], workers=2, max_seconds=120, body={**CHAT, "model": "calm"})
    started = time.monotonic()
    with bystanders:
        threads = [threading.Thread(target=attacker, args=(names[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    took = time.monotonic() - started
    peak = memory(rig.pid)["VmHWM"]
    served = [s for s in bystanders.samples if s.status == 200]
    print(f"\n{len(names) * 2} attacks (2 at a time) in {took:.1f}s: replica RSS idle "
          f"{idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB ({peak / idle:.2f}x); "
          f"bystanders {len(served)}/{len(bystanders.samples)} served, slowest "
          f"{max(s.seconds for s in bystanders.samples):.2f}s")  # fmt: skip
    assert not failures
    assert peak < 2 * idle
    assert bystanders.samples
    assert len(served) == len(bystanders.samples), [s.error for s in bystanders.samples][:3]
    requests = total(scrape(rig.url), "router_requests_total", route="calm", outcome="ok")
    assert requests >= len(served)
