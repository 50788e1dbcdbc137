"""Messages bodies translated to OpenAI chat bodies for openai-kind targets."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from router.config import Provider, SecretRef
from router.errors import BadRequest
from router.upstream.providers.messages import check_messages, to_chat_request


def provider() -> Provider:
    ref = SecretRef(env="PROVIDER_KEY")
    ref._value = SecretStr("sk-openai")
    return Provider(name="o", kind="openai", base_url="https://api.openai.com/v1", api_key=ref)


def translate(**fields: Any) -> dict[str, Any]:
    body = {
        "model": "claude-x",
        "max_tokens": 321,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }
    req = check_messages(body)
    out: dict[str, Any] = orjson.loads(
        to_chat_request(provider(), "gpt-x", body, req.max_tokens).body
    )
    return out


def test_the_request_goes_to_chat_completions_with_the_providers_key() -> None:
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    req = to_chat_request(provider(), "gpt-x", body, 5)
    assert req.url == "https://api.openai.com/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-openai"
    assert orjson.loads(req.body) == {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    }


@pytest.mark.parametrize(
    ("system", "text"),
    [
        ("be brief", "be brief"),
        (
            [
                {"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "two"},
            ],
            "one\n\ntwo",
        ),
    ],
)
def test_system_becomes_a_leading_system_message(system: Any, text: str) -> None:
    messages = translate(system=system)["messages"]
    assert messages[0] == {"role": "system", "content": text}
    assert messages[1] == {"role": "user", "content": "hi"}


def test_empty_system_is_dropped() -> None:
    assert translate(system=[])["messages"] == [{"role": "user", "content": "hi"}]


def test_text_and_image_blocks_become_parts() -> None:
    content = [
        {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}},
    ]
    messages = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}},
            ],
        }
    ]


def test_one_text_block_is_a_plain_string() -> None:
    content = [{"type": "text", "text": "only"}]
    messages = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert messages == [{"role": "user", "content": "only"}]


def test_a_tool_use_round_trip() -> None:
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "they want weather", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "text", "text": "Both cities."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "P"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and hurry"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "city"}],
                    "is_error": True,
                },
            ],
        },
    ]
    out = translate(messages=messages)["messages"]
    assert out == [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.\n\nBoth cities.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"P"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no\n\ncity"},
        {"role": "user", "content": "and hurry"},
    ]


def test_an_assistant_turn_of_tool_calls_only_has_null_content() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
    ]
    out = translate(messages=messages)["messages"]
    assert out[1]["content"] is None
    assert out[2] == {"role": "tool", "tool_call_id": "t", "content": ""}
    assert len(out) == 3  # a turn of results only adds no user message


def test_an_assistant_turn_of_thinking_only_has_empty_content() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "zz"}]},
    ]
    assert translate(messages=messages)["messages"][1] == {"role": "assistant", "content": ""}


def test_images_in_a_tool_result_follow_in_a_user_message() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [
            {"type": "text", "text": "the screenshot"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "B"}},
        ],
    }
    content = [result, {"type": "text", "text": "what is it?"}]
    out = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert out == [
        {"role": "tool", "tool_call_id": "t", "content": "the screenshot"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,B"}},
                {"type": "text", "text": "what is it?"},
            ],
        },
    ]


def test_tools_and_tool_choice() -> None:
    tools = [
        {
            "name": "weather",
            "description": "the weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "custom", "name": "noop", "input_schema": {"type": "object"}},
    ]
    out = translate(tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": tools[0]["input_schema"],
                "description": "the weather",
            },
        },
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}},
    ]
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choices(choice: dict[str, Any], expected: Any) -> None:
    out = translate(tools=[{"name": "f", "input_schema": {}}], tool_choice=choice)
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


def test_tool_choice_without_tools_is_dropped() -> None:
    out = translate(tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert "tool_choice" not in out
    assert "parallel_tool_calls" not in out


def test_a_server_tool_is_refused_by_type() -> None:
    tools = [
        {"name": "f", "input_schema": {}},
        {"type": "web_search_20250305", "name": "web_search"},
    ]
    with pytest.raises(BadRequest, match="web_search_20250305") as info:
        translate(tools=tools)
    assert info.value.param == "tools.1"


def test_sampling_stop_user_and_stream() -> None:
    out = translate(
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        stop_sequences=["A", "B"],
        metadata={"user_id": "alice"},
        thinking={"type": "enabled", "budget_tokens": 2048},
        stream=True,
        service_tier="auto",
    )
    assert out == {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 321,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["A", "B"],
        "user": "alice",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_a_long_user_id_is_hashed_to_openais_bound() -> None:
    user = "user_" + "a" * 64 + "_account__session_0f0f0f0f-0000-0000-0000-000000000000"
    out = translate(metadata={"user_id": user})
    assert out["user"] == hashlib.sha256(user.encode()).hexdigest()
    assert len(out["user"]) == 64


def test_more_than_four_stop_sequences_are_refused() -> None:
    with pytest.raises(BadRequest) as info:
        translate(stop_sequences=["a", "b", "c", "d", "e"])
    assert info.value.param == "stop_sequences"
    assert "stop" not in translate(stop_sequences=[])


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {"role": "user", "content": [{"type": "document", "source": {}}]},
            "messages.0.content.0",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
            },
            "messages.0.content.0.source",
        ),
        (
            {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]},
            "messages.0.content.0",
        ),
        (
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "search_result", "source": "s"}],
                    }
                ],
            },
            "messages.0.content.0.content.0",
        ),
        (
            {
                "role": "assistant",
                "content": [{"type": "image", "source": {"type": "url", "url": "u"}}],
            },
            "messages.0.content.0",
        ),
    ],
)
def test_blocks_an_openai_provider_cannot_take_are_refused(
    message: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as info:
        translate(messages=[message])
    assert info.value.param == param
