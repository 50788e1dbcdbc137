"""A Messages body is checked as Anthropic would: each mistake a 400 naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from router.errors import BadRequest
from router.upstream.providers.messages import check_count_tokens, check_messages
from router.upstream.providers.messages_check import (
    MAX_BLOCKS,
    MAX_MESSAGES,
    MAX_SYSTEM_BLOCKS,
    MAX_TOOLS,
    MessagesRequest,
)

USER = {"role": "user", "content": "hi"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 100, "messages": [USER], **fields}


def test_a_minimal_body_is_summarised() -> None:
    assert check_messages(body()) == MessagesRequest("claude-x", False, 100, ())


def test_stream_and_server_tools_are_summarised() -> None:
    tools = [
        {"name": "get", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "put", "input_schema": {}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
    ]
    req = check_messages(body(stream=True, tools=tools))
    assert req.stream is True
    assert req.server_tools == ("web_search_20250305",)


def test_a_rich_claude_code_like_body_passes() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"p": "a"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [
                        {"type": "text", "text": "file"},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    ],
                    "is_error": False,
                },
                {"type": "document", "source": {"type": "text", "data": "d"}},
            ],
        },
    ]
    system = [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
    req = check_messages(
        body(
            messages=messages,
            system=system,
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
            thinking={"type": "enabled", "budget_tokens": 1024},
            metadata={"user_id": "u"},
            stop_sequences=["END"],
            temperature=1,
            top_p=0.5,
            top_k=5,
        )
    )
    assert req.model == "claude-x"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"max_tokens": 1, "messages": [USER]}, "model"),
        (body(model=""), "model"),
        (body(model=7), "model"),
        ({"model": "m", "messages": [USER]}, "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(max_tokens=1.5), "max_tokens"),
        (body(max_tokens=1_000_001), "max_tokens"),
        (body(messages=[]), "messages"),
        (body(messages="hi"), "messages"),
        (body(messages=None), "messages"),
        (body(messages=["hi"]), "messages.0"),
        (body(messages=[USER, {"role": "system", "content": "x"}]), "messages.1.role"),
        (body(messages=[{"content": "x"}]), "messages.0.role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (body(messages=[{"role": "user"}]), "messages.0.content"),
        (body(messages=[{"role": "user", "content": ["x"]}]), "messages.0.content.0"),
        (body(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages.0.content.0"),
        (
            body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages.0.content.0.text",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image", "source": "x"}]}]),
            "messages.0.content.0.source",
        ),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}],
                    }
                ]
            ),
            "messages.0.content.0.source.media_type",
        ),
        (
            body(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "n", "input": []}],
                    }
                ]
            ),
            "messages.0.content.0.input",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]),
            "messages.0.content.0.tool_use_id",
        ),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": 3}],
                    }
                ]
            ),
            "messages.0.content.0.content",
        ),
        (body(system=5), "system"),
        (body(system=[{"type": "image"}]), "system.0"),
        (body(system=[{"type": "text"}]), "system.0.text"),
        (body(tools={}), "tools"),
        (body(tools=["x"]), "tools.0"),
        (body(tools=[{"input_schema": {}}]), "tools.0.name"),
        (body(tools=[{"name": "x"}]), "tools.0.input_schema"),
        (body(tools=[{"type": "web_search_20250305"}]), "tools.0.name"),
        (body(tool_choice="auto"), "tool_choice"),
        (body(tool_choice={"type": "required"}), "tool_choice"),
        (body(tool_choice={"type": "tool"}), "tool_choice.name"),
        (
            body(tool_choice={"type": "auto", "disable_parallel_tool_use": "yes"}),
            "tool_choice.disable_parallel_tool_use",
        ),
        (body(temperature=2), "temperature"),
        (body(temperature="hot"), "temperature"),
        (body(top_p=-0.1), "top_p"),
        (body(top_k=-1), "top_k"),
        (body(top_k=1.5), "top_k"),
        (body(stop_sequences="END"), "stop_sequences"),
        (body(stop_sequences=[1]), "stop_sequences"),
        (body(metadata="u"), "metadata"),
        (body(metadata={"user_id": 5}), "metadata"),
        (body(stream="yes"), "stream"),
    ],
)
def test_what_anthropic_refuses_is_a_bad_request_naming_the_field(data: Any, param: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_messages(data)
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ")


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        check_messages([body()])


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (body(messages=[USER] * (MAX_MESSAGES + 1)), "messages"),
        (
            body(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}] * 1001}]),
            "messages.0.content",
        ),
        (body(system=[{"type": "text", "text": "x"}] * (MAX_SYSTEM_BLOCKS + 1)), "system"),
        (body(tools=[{"name": "x", "input_schema": {}}] * (MAX_TOOLS + 1)), "tools"),
    ],
)
def test_bounds(data: Any, param: str) -> None:
    assert MAX_BLOCKS == 1000
    with pytest.raises(BadRequest, match="at most") as info:
        check_messages(data)
    assert info.value.param == param


def test_the_bounds_themselves_pass() -> None:
    blocks = [{"type": "text", "text": "x"}] * MAX_BLOCKS
    check_messages(body(messages=[{"role": "user", "content": blocks}] * 3))
    check_messages(body(messages=[USER] * MAX_MESSAGES))


@pytest.mark.parametrize("inner", ["tool_result", "tool_use"])
def test_a_tool_result_holds_no_tool_blocks(inner: str) -> None:
    nested = {"type": inner, "tool_use_id": "t", "id": "t", "name": "n", "input": {}}
    message = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "t", "content": [nested]}],
    }
    with pytest.raises(BadRequest) as info:
        check_messages(body(messages=[message]))
    assert info.value.param == "messages.0.content.0.content.0.type"


def test_deeply_nested_tool_results_are_refused_without_recursion() -> None:
    """However deep a body nests results, the check looks one level in (no RecursionError)."""
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": "t", "content": "x"}
    for _ in range(400):
        block = {"type": "tool_result", "tool_use_id": "t", "content": [block]}
    with pytest.raises(BadRequest):
        check_messages(body(messages=[{"role": "user", "content": [block]}]))


def test_count_tokens_bodies_need_no_max_tokens() -> None:
    assert check_count_tokens({"model": "m", "messages": [USER]}) == "m"
    with pytest.raises(BadRequest) as info:
        check_count_tokens({"model": "m", "messages": []})
    assert info.value.param == "messages"
