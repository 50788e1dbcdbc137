"""A replica answers like OpenAI's API where a client looks beyond completions: a model by
its id (``created`` a real time), an unknown path (404) or method (405) in the error shape;
FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json`` only when ``api_docs`` is on."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

ROUTES = [
    {"model": "chat", "targets": [{"provider": "p", "model": "m"}]},
    {"model": "org/model", "targets": [{"provider": "p", "model": "m"}]},
]


@contextlib.contextmanager
def gateway(tmp: Path, redis_port: int, **extra: object) -> Iterator[tuple[Gateway, float]]:
    redis.Redis(port=redis_port).flushall()
    cluster = Cluster(tmp)
    before = time.time()
    try:
        url = f"redis://127.0.0.1:{redis_port}/0"
        yield start_gateway(cluster, tmp, url, [Mock("p")], ROUTES, **extra), before
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def started(
    tmp_path_factory: pytest.TempPathFactory, redis_port: int
) -> Iterator[tuple[Gateway, float]]:
    with gateway(tmp_path_factory.mktemp("paths"), redis_port) as both:
        yield both


@pytest.fixture
def gw(started: tuple[Gateway, float]) -> Gateway:
    return started[0]


def client(gw: Gateway, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=key, max_retries=0)


def test_a_model_is_retrieved_by_its_id(started: tuple[Gateway, float]) -> None:
    gw, before = started
    with client(gw) as c:
        model = c.models.retrieve("chat")
        listed = c.models.list().data
    assert (model.id, model.object, model.owned_by) == ("chat", "model", "router-cluster")
    assert before - 1 <= model.created <= time.time()  # when the replica loaded its config
    assert [(m.id, m.created) for m in listed] == [(r["model"], model.created) for r in ROUTES]


def test_a_model_whose_name_holds_a_slash_is_retrieved(gw: Gateway) -> None:
    with client(gw) as c:
        assert c.models.retrieve("org/model").id == "org/model"  # sent as org%2Fmodel


def test_an_unknown_model_is_openais_404(gw: Gateway) -> None:
    with client(gw) as c, pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("gpt-nope")
    assert caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"
    assert "gpt-nope" in caught.value.message


def test_retrieving_a_model_needs_a_key(gw: Gateway) -> None:
    with client(gw, "wrong-key") as c, pytest.raises(openai.AuthenticationError):
        c.models.retrieve("chat")


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nope", 404, None),
        ("POST", "/v1/nope", 404, None),
        ("GET", "/v1", 404, None),
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/embeddings", 405, "POST"),
        ("DELETE", "/v1/models", 405, "GET"),
        ("POST", "/healthz", 405, "GET"),
        ("GET", "/docs", 404, None),
        ("GET", "/redoc", 404, None),
        ("GET", "/openapi.json", 404, None),
    ],
)
def test_an_unknown_path_or_method_is_an_openai_error(
    gw: Gateway, method: str, path: str, status: int, allow: str | None
) -> None:
    r = httpx.request(method, f"{gw.urls[0]}{path}", headers={"Authorization": "Bearer x"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert path in error["message"]
    if status == 404:
        assert error["code"] == "unknown_url"
        assert error["message"] == f"Invalid URL ({method} {path})"
    else:
        assert error["code"] == "method_not_allowed"
        assert allow in r.headers["allow"]
        assert method in error["message"]


def test_a_long_unknown_path_is_cut_short_in_the_answer(gw: Gateway) -> None:
    r = httpx.get(f"{gw.urls[0]}/{'x' * 20_000}")
    assert r.status_code == 404
    assert len(r.json()["error"]["message"]) < 300


def test_api_docs_are_served_when_turned_on(tmp_path: Path, redis_port: int) -> None:
    with gateway(tmp_path, redis_port, api_docs=True) as (gw, _):
        base = gw.urls[0]
        schema = httpx.get(f"{base}/openapi.json").json()
        assert {"/v1/chat/completions", "/v1/embeddings", "/v1/models",
                "/v1/models/{model}"} <= set(schema["paths"])  # fmt: skip
        for page in ("/docs", "/redoc"):
            r = httpx.get(f"{base}{page}")
            assert r.status_code == 200
            assert "/openapi.json" in r.text
