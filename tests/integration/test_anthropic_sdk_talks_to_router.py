"""The official anthropic SDK talks to a replica's Messages API (``POST /v1/messages``): whole
and streamed answers, a tool_use round trip, a request shaped like Claude Code's, errors in
Anthropic's shape, count_tokens. Each against an anthropic-kind target (passed through) and an
openai-kind target (translated both ways); the SDK's own parsing must succeed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

TOKENS = 5
TEXT = "".join(f"tok{i} " for i in range(TOKENS))
"""What the mocks answer (``--completion-tokens 5``)."""
ROUTES = ["via-anthropic", "via-openai"]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def gw(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    mocks = [
        Mock("oai", "--completion-tokens", str(TOKENS), "--chunk-interval-ms", "2"),
        Mock("claude", "--completion-tokens", str(TOKENS), api="anthropic"),
    ]
    routes = [
        {"model": "via-anthropic", "targets": [{"provider": "claude", "model": "claude-sonnet"}]},
        {"model": "via-openai", "targets": [{"provider": "oai", "model": "gpt-4o-mini"}]},
    ]
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes)


def client(gw: Gateway, key: str = CLIENT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.urls[0], api_key=key, max_retries=0)


@pytest.mark.parametrize("route", ROUTES)
def test_create(gw: Gateway, route: str) -> None:
    with client(gw) as c:
        raw = c.messages.with_raw_response.create(
            model=route,
            max_tokens=100,
            system="be brief",
            messages=[{"role": "user", "content": "hi"}],
        )
    message = raw.parse()
    assert message.type == "message"
    assert message.role == "assistant"
    # passed through, the answer names the provider's model; translated, the one asked for
    assert message.model == ("claude-sonnet" if route == "via-anthropic" else route)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == TOKENS
    assert message.usage.input_tokens > 0
    provider = "claude" if route == "via-anthropic" else "oai"
    assert raw.headers["x-router-provider"] == provider


@pytest.mark.parametrize("route", ROUTES)
def test_stream(gw: Gateway, route: str) -> None:
    with (
        client(gw) as c,
        c.messages.stream(
            model=route, max_tokens=100, messages=[{"role": "user", "content": "count"}]
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.content[0].text == TEXT  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == TOKENS


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("route", ROUTES)
def test_tool_use_round_trip(gw: Gateway, route: str, streamed: bool) -> None:
    ask: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    with client(gw) as c:
        first = _create(c, streamed, model=route, max_tokens=200, tools=[WEATHER], messages=ask)
        assert first.stop_reason == "tool_use"
        uses = [b for b in first.content if b.type == "tool_use"]
        assert len(uses) == 1
        assert uses[0].name == "get_weather"
        assert uses[0].input == {"city": "mock"}
        assert uses[0].id
        result = {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny, 21 C"}
        follow = [
            *ask,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [result]},
        ]
        second = _create(c, streamed, model=route, max_tokens=200, tools=[WEATHER], messages=follow)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == TEXT  # type: ignore[union-attr]


def _create(c: anthropic.Anthropic, streamed: bool, **kw: Any) -> Any:
    if not streamed:
        return c.messages.create(**kw)
    with c.messages.stream(**kw) as stream:
        return stream.get_final_message()


BETA = "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"


@pytest.mark.parametrize("route", ROUTES)
def test_a_request_shaped_like_claude_codes(gw: Gateway, route: str) -> None:
    """System blocks with cache_control, tools, metadata.user_id, anthropic-beta, a stream."""
    system: Any = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": "Tools: ...", "cache_control": {"type": "ephemeral"}},
    ]
    tools: Any = [
        {**WEATHER, "name": "Read"},
        {**WEATHER, "name": "Bash", "cache_control": {"type": "ephemeral"}},
    ]
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}},
            ],
        }
    ]
    user_id = "user_" + "ab" * 32 + "_account__session_0c3d8c2e-6a7b-4f3e-9d1e-2b5f8a9c7d6e"
    with (
        client(gw) as c,
        c.messages.stream(
            model=route,
            max_tokens=32000,
            system=system,
            tools=tools,
            messages=messages,
            metadata={"user_id": user_id},
            extra_headers={"anthropic-beta": BETA},
        ) as stream,
    ):
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content if b.type == "tool_use"] == ["tool_use"]
    if route == "via-anthropic":  # passed through: the beta header reached the provider
        assert gw.mocks["claude"].stats()["last_headers"]["anthropic-beta"] == BETA


def test_errors_come_in_anthropics_shape(gw: Gateway) -> None:
    with client(gw) as c:
        with pytest.raises(anthropic.NotFoundError) as nf:
            c.messages.create(
                model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert nf.value.body["type"] == "error"  # type: ignore[index]
        assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with client(gw, key="wrong-key-0123456789") as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.create(
            model="via-openai", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    # no max_tokens: the SDK would not send it, so raw
    r = httpx.post(
        f"{gw.urls[0]}/v1/messages",
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "via-openai", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_count_tokens(gw: Gateway, route: str) -> None:
    with client(gw) as c:
        counted = c.messages.count_tokens(
            model=route,
            system="be brief",
            tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "x" * 400}],
        )
        with pytest.raises(anthropic.NotFoundError):
            c.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])
    assert counted.input_tokens > 100
