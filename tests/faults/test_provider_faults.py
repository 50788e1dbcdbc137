"""Router -> provider faults: each ends in a failover or a clear OpenAI-shaped error, and
the replica's metrics and the shared outcome counters say what happened.

Provider ``bad`` is reached through a fault proxy (TCP-level faults: refused, hang, reset,
cut, delay); its HTTP-level faults come from the mock's own fault injection. Route ``pair``
tries ``bad`` first (weight 100 against 1) and fails over to ``good``; route ``solo`` has
only ``bad``, so a fault there is the client's error to see.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from tests.faults.proxy import Proxy, proxies
from tests.faults.support import (
    CHAT,
    KEYS,
    Samples,
    Via,
    counter,
    reset_provider_state,
    scrape,
    start,
    total,
)
from tests.helpers import Cluster, Gateway, Mock, auth, wait_until

READ_S = 1.0
"""bad's read timeout: a hang becomes a timeout after this long."""
TOKENS = 16


@dataclass
class Rig:
    gw: Gateway
    bad: Via
    good: Mock
    proxy: Proxy
    r: redis.Redis

    @property
    def url(self) -> str:
        return self.gw.urls[0]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Rig]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("provider-faults")
    cluster = Cluster(tmp)
    # circuits would open after a few failures in a row and hide bad from later tests
    bad = Via("bad", "--chunk-interval-ms", "50", timeouts={"read_s": READ_S, "connect_s": 1.0},
              circuit={"failures": 1000})  # fmt: skip
    good = Mock("good", "--chunk-interval-ms", "5")
    routes: list[dict[str, Any]] = [
        {"model": "pair", "strategy": "weighted", "max_attempts": 2,
         "targets": [{"provider": "bad", "model": "m", "weight": 100},
                     {"provider": "good", "model": "m"}]},
        {"model": "solo", "targets": [{"provider": "bad", "model": "m"}]},
    ]  # fmt: skip
    with proxies() as pool:
        proxy = pool(bad.port)
        bad.proxy_port = proxy.port
        try:
            gw = start(cluster, tmp, f"redis://127.0.0.1:{redis_port}/0", [bad, good], routes)
            yield Rig(gw, bad, good, proxy, redis.Redis(port=redis_port, decode_responses=True))
        finally:
            cluster.stop_all()


@pytest.fixture(autouse=True)
def _healthy(rig: Rig) -> None:
    rig.proxy.delay(0)
    rig.proxy.blackhole(False)
    rig.proxy.enable()
    for m in (rig.bad, rig.good):
        m.fault("none")
        httpx.post(f"{m.url}/stats/reset", timeout=5)
    reset_provider_state(rig.r, ["bad", "good"])


def post(rig: Rig, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{rig.url}/v1/chat/completions", json={**CHAT, "model": model, **extra},
                      headers=auth(), timeout=30)  # fmt: skip


def assert_openai_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["message"]
    return str(err["message"])


class Counters:
    """The replica's metrics and bad's shared outcome counter, to compare before/after."""

    def __init__(self, rig: Rig, outcome: str) -> None:
        self.rig = rig
        self.outcome = outcome
        self.metrics: Samples = scrape(rig.url)
        self.shared = counter(rig.r, "bad", outcome)

    def moved(self, name: str, **labels: str) -> float:
        now = scrape(self.rig.url)
        return total(now, name, **labels) - total(self.metrics, name, **labels)

    def wait_shared(self, n: int) -> None:
        want = self.shared + n
        wait_until(lambda: counter(self.rig.r, "bad", self.outcome) == want, 5,
                   f"o:{self.outcome} of bad to reach {want}")  # fmt: skip


Fault = tuple[Callable[[Rig], None], Callable[[Rig], None]]
"""How to inject a fault, and how to lift it."""


def _refuse(rig: Rig) -> None:
    rig.proxy.disable()
    rig.proxy.cut()  # and drop the router's pooled keep-alive connections


FAULTS: dict[str, tuple[Fault, str, int]] = {
    # name: ((inject, lift), outcome recorded, status when no other target exists)
    "connect refused": ((_refuse, lambda rig: rig.proxy.enable()), "connect_error", 502),
    "accept then hang": (
        (lambda rig: rig.proxy.blackhole(True), lambda rig: rig.proxy.blackhole(False)),
        "timeout", 504,
    ),
    "5xx": ((lambda rig: rig.bad.fault("error", status=503), lambda rig: None), "http_5xx", 502),
    "429": (
        (lambda rig: rig.bad.fault("rate_limit", retry_after_s=30), lambda rig: None),
        "http_429", 429,
    ),
    "malformed JSON": ((lambda rig: rig.bad.fault("bad_json"), lambda rig: None),
                       "bad_response", 502),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_fails_over_or_is_a_clear_error(rig: Rig, name: str) -> None:
    (inject, lift), outcome, status = FAULTS[name]
    before = Counters(rig, outcome)
    inject(rig)
    try:
        served = post(rig, "pair")
        assert served.status_code == 200, served.text
        assert served.headers["x-router-provider"] == "good"
        assert served.headers["x-router-attempts"] == "2"
        reset_provider_state(rig.r, ["bad"])  # forget the 429's cooldown: try bad again
        failed = post(rig, "solo")
    finally:
        lift(rig)
    message = assert_openai_error(failed, status)
    assert f"bad: {outcome}" in message
    assert failed.headers["x-router-attempts"] == "1"
    if status == 429:
        assert int(failed.headers["retry-after"]) >= 1
        print(f"\nevery attempt got a 429 (Retry-After 30): Retry-After "
              f"{failed.headers['retry-after']} to the client")  # fmt: skip
    failover = "router_failovers_total"
    assert before.moved(failover, route="pair", provider="bad", reason=outcome) == 1
    assert before.moved(failover, route="solo", provider="bad", reason=outcome) == 1
    requests = "router_requests_total"
    assert before.moved(requests, route="pair", provider="good", outcome="ok") == 1
    want = {"outcome": "saturated" if status == 429 else "failed",
            "status_class": f"{status // 100}xx"}  # fmt: skip
    assert before.moved(requests, route="solo", **want) == 1
    before.wait_shared(2)


def test_429_cooldown_keeps_every_later_request_off_the_provider(rig: Rig) -> None:
    rig.bad.fault("rate_limit", retry_after_s=30, count=1)
    assert post(rig, "pair").headers["x-router-attempts"] == "2"
    cool_until = int(rig.r.hget(KEYS.provider("bad"), "cool") or 0)
    sec, usec = rig.r.time()
    assert cool_until - (sec * 1000 + usec // 1000) > 25_000  # the provider's Retry-After
    assert post(rig, "pair").headers["x-router-attempts"] == "1"  # straight to good
    refused = post(rig, "solo")  # nothing else to try: saturated, told when to come back
    assert_openai_error(refused, 429)
    assert int(refused.headers["retry-after"]) > 25
    assert rig.bad.stats()["received"] == 1


def test_connection_reset_mid_request_fails_over(rig: Rig) -> None:
    rig.bad.fault("hang")
    before = Counters(rig, "connect_error")
    replies: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: replies.append(post(rig, "pair")), daemon=True)
    thread.start()
    wait_until(lambda: rig.bad.stats()["in_flight"] == 1, 5, "bad to hold the request")
    assert rig.proxy.reset() >= 1
    thread.join(10)
    assert replies, "no answer"
    assert replies[0].status_code == 200
    assert replies[0].headers["x-router-attempts"] == "2"
    assert before.moved("router_failovers_total", provider="bad", reason="connect_error") == 1
    before.wait_shared(1)
    wait_until(lambda: rig.bad.stats()["in_flight"] == 0, 5, "bad to notice the reset")


def read_stream(rig: Rig, on_token: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Stream a ``pair`` completion; what arrived: headers, tokens, error events, [DONE]."""
    out: dict[str, Any] = {"tokens": 0, "errors": [], "done": False}
    body = {**CHAT, "model": "pair", "stream": True, "max_tokens": TOKENS}
    with (
        httpx.Client(headers=auth(), timeout=30) as c,
        c.stream("POST", f"{rig.url}/v1/chat/completions", json=body) as resp,
    ):
        out["status"], out["headers"] = resp.status_code, resp.headers
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
            elif '"error"' in data:
                out["errors"].append(data)
            elif '"content":"tok' in data:
                out["tokens"] += 1
                on_token(out["tokens"])
    return out


@pytest.mark.parametrize("how", ["proxy cut", "mock cut_stream"])
def test_stream_cut_after_first_bytes_ends_with_an_error_event(rig: Rig, how: str) -> None:
    before = Counters(rig, "bad_response")
    ok_before = counter(rig.r, "bad", "ok")

    def cut_at_third(n: int) -> None:
        if n == 3:
            rig.proxy.cut()

    if how == "mock cut_stream":
        rig.bad.fault("cut_stream", after_chunks=4)
        got = read_stream(rig)
    else:
        got = read_stream(rig, cut_at_third)
    assert got["status"] == 200
    assert got["headers"]["x-router-provider"] == "bad"  # too late to fail over
    assert 1 <= got["tokens"] < TOKENS
    assert not got["done"]
    assert len(got["errors"]) == 1
    error = json.loads(got["errors"][0])["error"]
    assert error["code"] == "bad_response"
    assert "mid-stream" in error["message"]
    print(f"\n{how}: error event {got['errors'][0]}")
    before.wait_shared(1)  # the failure is recorded in the shared state
    assert counter(rig.r, "bad", "ok") == ok_before
    wait_until(lambda: rig.r.zcard(KEYS.leases("bad")) == 0, 5, "the lease to be released")
    assert before.moved("router_requests_total", route="pair", provider="bad") == 1
    assert before.moved("router_failovers_total") == 0  # past the first byte: no failover


def test_stream_cut_mid_stream_is_counted_as_failed(rig: Rig) -> None:
    # found by this suite (it was counted as ok), fixed in c731563
    before = Counters(rig, "ok")
    rig.bad.fault("cut_stream", after_chunks=4)
    got = read_stream(rig)
    assert len(got["errors"]) == 1
    requests = "router_requests_total"
    labels = {"route": "pair", "provider": "bad", "status_class": "2xx"}  # sent with byte one
    assert before.moved(requests, outcome="ok", **labels) == 0
    assert before.moved(requests, outcome="failed", **labels) == 1


def test_slow_stream_under_the_read_timeout_completes(rig: Rig) -> None:
    delay_ms = READ_S * 1000 / 5
    rig.proxy.delay(delay_ms)
    started = time.monotonic()
    got = read_stream(rig)
    took = time.monotonic() - started
    print(f"\nslow stream (+{delay_ms:.0f} ms per chunk through the proxy): {took:.2f}s")
    assert (got["status"], got["tokens"], got["done"], got["errors"]) == (200, TOKENS, True, [])
    assert got["headers"]["x-router-attempts"] == "1"
    assert got["headers"]["x-router-provider"] == "bad"


def test_stream_slower_than_the_read_timeout_fails_over_before_its_first_byte(rig: Rig) -> None:
    before = Counters(rig, "timeout")
    rig.proxy.delay(READ_S * 1000 * 1.5)
    got = read_stream(rig)
    assert (got["status"], got["tokens"], got["done"], got["errors"]) == (200, TOKENS, True, [])
    assert got["headers"]["x-router-provider"] == "good"
    assert got["headers"]["x-router-attempts"] == "2"
    assert before.moved("router_failovers_total", provider="bad", reason="timeout") == 1
    before.wait_shared(1)
