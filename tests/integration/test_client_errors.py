"""Bad input gets a clear OpenAI-shaped error with the right status; no secret ever leaks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import SECRETS, Cluster, Gateway, Mock, auth, start_gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("errors")
    cluster = Cluster(tmp)
    mocks = [
        Mock("one", "--latency-ms", "400", limits={"max_in_flight": 1}),
        Mock("claude", api="anthropic"),
    ]
    routes = [
        {"model": "chat", "targets": [{"provider": "one", "model": "m"}]},
        {"model": "queued", "queue_timeout_s": 10, "targets": [{"provider": "one", "model": "m"}]},
        {"model": "claude-only", "targets": [{"provider": "claude", "model": "c"}]},
    ]
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        yield start_gateway(cluster, Path(tmp), url, mocks, routes, max_body_bytes=20_000)
    finally:
        cluster.stop_all()


def call(gw: Gateway, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {**auth(), "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{gw.urls[0]}/v1/chat/completions", content=content, headers=hdrs)


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["message"]
    assert r.headers["x-request-id"]
    return dict(err)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe\x00garbage",
        b'{"model": "chat"}',
        b'{"model": "chat", "messages": []}',
        b'{"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e12}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}',
    ],
)
def test_invalid_body_is_400(gw: Gateway, body: bytes) -> None:
    err = assert_openai_error(call(gw, body), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": ""},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": "Basic dGVzdA=="},
        {"Authorization": "Bearer"},
    ],
)
def test_bad_key_is_401(gw: Gateway, headers: dict[str, str]) -> None:
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=headers)
    assert assert_openai_error(r, 401)["type"] == "authentication_error"
    r = httpx.get(f"{gw.urls[0]}/v1/models", headers=headers)
    assert r.status_code == 401


def test_unknown_model_is_404(gw: Gateway) -> None:
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json={**CHAT, "model": "gpt-9"},
                   headers=auth())  # fmt: skip
    assert assert_openai_error(r, 404)["code"] == "model_not_found"


def test_unknown_path_is_openai_shaped_404(gw: Gateway) -> None:
    assert_openai_error(httpx.get(f"{gw.urls[0]}/v1/nothing", headers=auth()), 404)


def test_body_over_the_limit_is_413(gw: Gateway) -> None:
    big = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * 30_000 + b'"}]}'
    assert_openai_error(call(gw, big), 413)

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        yield big[:10_000]
        yield big[10_000:]

    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", content=chunks(), headers=auth())
    assert_openai_error(r, 413)


def test_saturated_is_429_with_retry_after_and_the_provider_never_sees_it(gw: Gateway) -> None:
    httpx.post(f"{gw.mocks['one'].url}/stats/reset")

    async def two() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=auth(), timeout=10) as c:
            first = asyncio.create_task(c.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT))
            await asyncio.sleep(0.15)  # let the first one take the only slot
            second = await c.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT)
            return [await first, second]

    first, second = asyncio.run(two())
    assert first.status_code == 200
    err = assert_openai_error(second, 429)
    assert err["type"] == "rate_limit_error"
    assert int(second.headers["retry-after"]) >= 1
    assert gw.mocks["one"].stats()["received"] == 1


def test_queued_requests_wait_for_room(gw: Gateway) -> None:
    httpx.post(f"{gw.mocks['one'].url}/stats/reset")

    async def three() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=auth(), timeout=20) as c:
            body = {**CHAT, "model": "queued"}
            url = f"{gw.urls[0]}/v1/chat/completions"
            return await asyncio.gather(*(c.post(url, json=body) for _ in range(3)))

    assert [r.status_code for r in asyncio.run(three())] == [200, 200, 200]
    stats = gw.mocks["one"].stats()
    assert stats["in_flight_peak"] == 1
    assert stats["received"] == 3


def test_a_route_none_of_whose_targets_serves_the_api_is_a_400(gw: Gateway) -> None:
    """Not an outage (no retry helps): the route cannot serve embeddings, and says so."""
    r = httpx.post(f"{gw.urls[0]}/v1/embeddings", json={"model": "claude-only", "input": "x"},
                   headers=auth())  # fmt: skip
    error = assert_openai_error(r, 400)
    assert "serves embeddings" in error["message"]
    assert r.json()["error"]["param"] == "model"


def test_no_secret_in_responses_logs_or_redis(gw: Gateway, redis_port: int) -> None:
    seen = [call(gw, b"{bad").text, httpx.get(f"{gw.urls[0]}/v1/models", headers=auth()).text]
    seen.append(httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=auth()).text)
    r = redis.Redis(port=redis_port)
    for key in r.scan_iter("*"):
        seen.append(key.decode())
        kind = r.type(key)
        if kind == b"hash":
            seen += [f"{k!r}{v!r}" for k, v in r.hgetall(key).items()]
        elif kind == b"zset":
            seen += [repr(m) for m in r.zrange(key, 0, -1)]
        elif kind == b"string":
            seen.append(repr(r.get(key)))
    seen += [proc.output() for proc, _ in gw.replicas]
    text = "\n".join(seen)
    assert "decision" in text  # the logs were read
    for secret in SECRETS:
        assert secret not in text
