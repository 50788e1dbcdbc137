"""A request with more than one Authorization header is refused (400) everywhere a key is read.

Before, the hot path took the last of them and ``/v1/models`` and ``/admin/*`` the first, so
which key counted depended on the endpoint. A model name we echo back is cut short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import ADMIN_TOKEN, CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
GOOD, BAD = f"Bearer {CLIENT_KEY}", "Bearer not-a-key"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("auth")
    cluster = Cluster(tmp)
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    try:
        yield start_gateway(cluster, Path(tmp), f"redis://127.0.0.1:{redis_port}/0", [Mock("p")],
                            routes)  # fmt: skip
    finally:
        cluster.stop_all()


def call(gw: Gateway, method: str, path: str, *authorizations: str) -> httpx.Response:
    headers = httpx.Headers([("authorization", a) for a in authorizations])
    body = CHAT if method == "POST" else None
    return httpx.request(method, gw.urls[0] + path, headers=headers, json=body, timeout=10)


ENDPOINTS = [
    pytest.param("POST", "/v1/chat/completions", GOOD, id="chat"),
    pytest.param("GET", "/v1/models", GOOD, id="models"),
    pytest.param("GET", "/admin/state", f"Bearer {ADMIN_TOKEN}", id="admin"),
]


@pytest.mark.parametrize(("method", "path", "good"), ENDPOINTS)
def test_one_good_key_is_served(gw: Gateway, method: str, path: str, good: str) -> None:
    assert call(gw, method, path, good).status_code == 200


@pytest.mark.parametrize(("method", "path", "good"), ENDPOINTS)
@pytest.mark.parametrize("order", ["good first", "good last", "good twice"])
def test_two_authorization_headers_are_refused(
    gw: Gateway, method: str, path: str, good: str, order: str
) -> None:
    pair = {"good first": (good, BAD), "good last": (BAD, good), "good twice": (good, good)}
    r = call(gw, method, path, *pair[order])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert "more than one Authorization header" in err["message"]


def test_another_repeated_header_is_no_reason_to_refuse(gw: Gateway) -> None:
    headers = httpx.Headers([("authorization", GOOD), ("x-tag", "a"), ("x-tag", "b")])
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert r.status_code == 200, r.text


def test_an_unknown_model_is_named_cut_short(gw: Gateway) -> None:
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json={**CHAT, "model": "m" * 100_000},
                   headers={"authorization": GOOD}, timeout=10)  # fmt: skip
    assert r.status_code == 404
    assert len(r.json()["error"]["message"]) < 300
