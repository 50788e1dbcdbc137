"""The official openai SDK talks to a replica: chat (whole and streamed), embeddings, models."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, start_gateway


@pytest.fixture
def gw(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    mocks = [
        Mock("oai", "--completion-tokens", "5", "--chunk-interval-ms", "5"),
        Mock("claude", "--completion-tokens", "5", api="anthropic"),
    ]
    routes = [
        {"model": "chat-oai", "targets": [{"provider": "oai", "model": "gpt-4o-mini"}]},
        {"model": "chat-claude", "targets": [{"provider": "claude", "model": "claude-3-5"}]},
        {"model": "embed", "targets": [{"provider": "oai", "model": "text-embedding-3-small"}]},
    ]
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes)


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0)


@pytest.mark.parametrize("route", ["chat-oai", "chat-claude"])
def test_chat_whole(gw: Gateway, route: str) -> None:
    with client(gw) as c:
        raw = c.chat.completions.with_raw_response.create(
            model=route,
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_tokens=50,
        )
    answer = raw.parse()
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 5
    assert raw.headers["x-router-provider"] in {"oai", "claude"}
    assert raw.headers["x-router-attempts"] == "1"
    assert raw.headers["x-request-id"]


@pytest.mark.parametrize("route", ["chat-oai", "chat-claude"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_streamed(gw: Gateway, route: str, include_usage: bool) -> None:
    with client(gw) as c:
        stream = c.chat.completions.create(
            model=route,
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": include_usage},
        )
        chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop"
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    if include_usage:
        assert len(usage) == 1
        assert usage[0].completion_tokens == 5
    else:
        assert usage == []


def test_request_id_is_kept(gw: Gateway) -> None:
    with client(gw) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="chat-oai",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "abc-123"},
        )
    assert raw.headers["x-request-id"] == "abc-123"


def test_embeddings(gw: Gateway) -> None:
    with client(gw) as c:
        answer = c.embeddings.create(model="embed", input=["one", "two"])
    assert len(answer.data) == 2
    assert len(answer.data[0].embedding) > 0


def test_models_lists_routes(gw: Gateway) -> None:
    with client(gw) as c:
        ids = {m.id for m in c.models.list()}
    assert ids == {"chat-oai", "chat-claude", "embed"}


def test_embeddings_on_a_chat_only_route_is_refused(gw: Gateway) -> None:
    with client(gw) as c, pytest.raises(openai.BadRequestError) as err:
        c.embeddings.create(model="chat-claude", input="x")
    assert "serves embeddings" in err.value.message
