"""Failover on each error kind; clear OpenAI-shaped errors when every attempt fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, auth, start_gateway, wait_until

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("failover")
    cluster = Cluster(tmp)
    bad = Mock("bad", "--chunk-interval-ms", "5", timeouts={"read_s": 1.0})
    good = Mock("good", "--chunk-interval-ms", "5")
    bad2 = Mock("bad2", timeouts={"read_s": 1.0})
    dead = Mock("dead", alias_of=Mock("never-started"))  # a port nothing listens on
    pair = [{"provider": "bad", "model": "m"}, {"provider": "good", "model": "m"}]
    routes = [
        # weighted: the heavier "bad" is always tried first while it has room
        {"model": "chat", "strategy": "weighted", "max_attempts": 2,
         "targets": [{**pair[0], "weight": 100}, pair[1]]},
        {"model": "doomed", "max_attempts": 3, "timeout_s": 10,
         "targets": [{"provider": "bad", "model": "m"}, {"provider": "bad2", "model": "m"}]},
        {"model": "unreachable", "targets": [{"provider": "dead", "model": "m"}]},
        {"model": "short", "strategy": "weighted", "max_attempts": 2, "timeout_s": 0.8,
         "targets": [{**pair[0], "weight": 100}, pair[1]]},
        {"model": "to-dead", "strategy": "weighted", "max_attempts": 2,
         "targets": [{"provider": "dead", "model": "m", "weight": 100}, pair[1]]},
    ]  # fmt: skip
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        yield start_gateway(cluster, Path(tmp), url, [bad, good, bad2, dead], routes, replicas=2)
    finally:
        cluster.stop_all()


@pytest.fixture(autouse=True)
def _healthy(gw: Gateway, redis_port: int) -> None:
    for m in gw.mocks.values():
        m.fault("none")
        httpx.post(f"{m.url}/stats/reset", timeout=5)
    r = redis.Redis(port=redis_port)
    for key in r.scan_iter("rc:*provider:*"):
        if not key.endswith(b":leases"):
            # forget cooldowns and circuits from earlier tests
            r.hdel(key, "cool", "circ", "circ_until", "circ_trial", "circ_opens", "fails")


def post(url: str, body: dict[str, Any] = CHAT, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=30, **kw)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ({"mode": "error", "status": 500}, "http_5xx"),
        ({"mode": "error", "status": 503}, "http_5xx"),
        ({"mode": "hang"}, "timeout"),
        ({"mode": "close"}, "connect_error"),
        ({"mode": "bad_json"}, "bad_response"),
        ({"mode": "rate_limit", "retry_after_s": 3}, "http_429"),
    ],
)
def test_fails_over_on(gw: Gateway, redis_port: int, fault: dict[str, Any], outcome: str) -> None:
    counters = redis.Redis(port=redis_port, decode_responses=True)
    before = int(counters.hget("rc:{default}:provider:bad", f"o:{outcome}") or 0)
    gw.mocks["bad"].fault(**fault)
    r = post(gw.urls[0])
    assert r.status_code == 200, r.text
    assert r.headers["x-router-provider"] == "good"
    assert r.headers["x-router-attempts"] == "2"
    assert gw.mocks["bad"].stats()["faults"] == 1
    wait_until(
        lambda: int(counters.hget("rc:{default}:provider:bad", f"o:{outcome}") or 0) == before + 1,
        5,
        f"the {outcome} outcome to be recorded",
    )


def test_fails_over_on_connect_refused(gw: Gateway) -> None:
    r = post(gw.urls[0], {**CHAT, "model": "to-dead"})
    assert r.status_code == 200
    assert r.headers["x-router-attempts"] == "2"


def test_a_429_cools_the_provider_down_for_every_replica(gw: Gateway) -> None:
    gw.mocks["bad"].fault("rate_limit", retry_after_s=30, count=1)
    assert post(gw.urls[0]).headers["x-router-attempts"] == "2"
    for _ in range(5):  # the other replica now skips "bad" without trying it
        r = post(gw.urls[1])
        assert r.headers["x-router-provider"] == "good"
        assert r.headers["x-router-attempts"] == "1"
    assert gw.mocks["bad"].stats()["received"] == 1


def test_stream_fails_over_before_its_first_byte(gw: Gateway) -> None:
    gw.mocks["bad"].fault("error", status=502)
    with openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(**CHAT, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert raw.headers["x-router-provider"] == "good"
    assert text


def test_stream_cut_after_first_byte_ends_with_an_error_event(gw: Gateway) -> None:
    gw.mocks["bad"].fault("cut_stream", after_chunks=3)
    with (
        openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0) as c,
        pytest.raises(openai.APIError, match="mid-stream"),
    ):
        for _ in c.chat.completions.create(**CHAT, stream=True):
            pass


def test_every_attempt_failing_is_a_502_naming_the_providers(gw: Gateway) -> None:
    gw.mocks["bad"].fault("error", status=500)
    gw.mocks["bad2"].fault("error", status=503)
    r = post(gw.urls[0], {**CHAT, "model": "doomed"})
    assert r.status_code == 502
    err = r.json()["error"]
    assert "bad: http_5xx" in err["message"]
    assert "bad2: http_5xx" in err["message"]
    assert err["code"] == "all_attempts_failed"
    assert r.headers["x-router-attempts"] == "2"


def test_every_attempt_timing_out_is_a_504(gw: Gateway) -> None:
    gw.mocks["bad"].fault("hang")
    gw.mocks["bad2"].fault("hang")
    r = post(gw.urls[0], {**CHAT, "model": "doomed"})
    assert r.status_code == 504
    assert "timeout" in r.json()["error"]["message"]


def test_every_attempt_rate_limited_is_a_429(gw: Gateway) -> None:
    gw.mocks["bad"].fault("rate_limit", retry_after_s=2)
    gw.mocks["bad2"].fault("rate_limit", retry_after_s=7)
    r = post(gw.urls[0], {**CHAT, "model": "doomed"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"  # the longest cooldown the providers asked for


def test_unreachable_only_provider_is_a_502(gw: Gateway) -> None:
    r = post(gw.urls[0], {**CHAT, "model": "unreachable"})
    assert r.status_code == 502
    assert "dead: connect_error" in r.json()["error"]["message"]


def test_provider_400_is_passed_through_not_failed_over(gw: Gateway) -> None:
    gw.mocks["bad"].fault("error", status=400)
    r = post(gw.urls[0])
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert gw.mocks["good"].stats()["received"] == 0


def test_a_spent_time_budget_blames_no_further_provider(gw: Gateway, redis_port: int) -> None:
    """The first attempt used the route's whole timeout_s: no second target is leased and
    sent an attempt that could only time out (it was counted against a healthy provider)."""
    counters = redis.Redis(port=redis_port, decode_responses=True)
    key = "rc:{default}:provider:good"
    before = int(counters.hget(key, "o:timeout") or 0)
    gw.mocks["bad"].fault(mode="hang")
    r = post(gw.urls[0], {**CHAT, "model": "short"})
    assert r.status_code == 504, r.text
    assert "bad" in r.json()["error"]["message"]
    assert "good" not in r.json()["error"]["message"]
    assert int(counters.hget(key, "o:timeout") or 0) == before
    assert gw.mocks["good"].stats()["received"] == 0
