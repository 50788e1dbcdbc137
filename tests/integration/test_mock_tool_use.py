"""Tool use and full request shapes on the mock, through the official openai and anthropic SDKs."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.integration.inproc import Mock, Start

SCHEMA = {
    "type": "object",
    "properties": {"unit": {"type": "string"}, "city": {"type": "string"}},
    "required": ["city"],
}
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {}}},
        },
    },
]
CLAUDE_TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather of a city", "input_schema": SCHEMA},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {}}}},
]
HELLO: list[Any] = [{"role": "user", "content": "hello world!"}]  # 12 chars -> 3 tokens


def oai(mock: Mock) -> openai.AsyncOpenAI:
    """The official OpenAI client pointed at the mock, without retries hiding failures."""
    return openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="sk-test", max_retries=0)


def claude(mock: Mock) -> anthropic.AsyncAnthropic:
    """The official Anthropic client pointed at the mock (its key goes in x-api-key)."""
    return anthropic.AsyncAnthropic(base_url=mock.url, api_key="ak-test", max_retries=0)


async def stats(http: httpx.AsyncClient, mock: Mock) -> dict[str, Any]:
    """GET /stats."""
    return (await http.get(f"{mock.url}/stats")).json()


async def test_chat_tool_call_and_answer(start_mock: Start) -> None:
    mock = await start_mock(completion_tokens=2)
    async with oai(mock) as client:
        first = await client.chat.completions.create(
            model="gpt-x", messages=HELLO, tools=CHAT_TOOLS
        )
        choice = first.choices[0]
        assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
        assert choice.message.tool_calls is not None
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"mock"}')
        assert first.usage is not None
        assert first.usage.completion_tokens >= 1

        named = await client.chat.completions.create(
            model="gpt-x",
            messages=HELLO,
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        tool_calls = named.choices[0].message.tool_calls
        assert tool_calls is not None
        assert json.loads(tool_calls[0].function.arguments) == {"tz": "mock"}  # none required

        follow = await client.chat.completions.create(
            model="gpt-x",
            messages=[
                *HELLO,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
            ],
            tools=CHAT_TOOLS,
        )
        assert follow.choices[0].message.content == "tok0 tok1 "
        assert follow.choices[0].finish_reason == "stop"

        none = await client.chat.completions.create(
            model="gpt-x", messages=HELLO, tools=CHAT_TOOLS, tool_choice="none"
        )
        assert none.choices[0].message.tool_calls is None

        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="gpt-x",
                messages=HELLO,
                tools=CHAT_TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        assert err.value.param == "tool_choice"


async def test_chat_tool_call_streamed(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    body = {"model": "gpt-x", "messages": HELLO, "tools": CHAT_TOOLS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    text = (await http.post(f"{mock.url}/v1/chat/completions", json=body)).text
    payloads = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    opening = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert opening["index"] == 0
    assert opening["id"].startswith("call_")
    assert (opening["type"], opening["function"]) == (
        "function",
        {"name": "get_weather", "arguments": ""},
    )
    pieces = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-2]]
    assert 2 <= len(pieces) <= 3
    assert all(set(p) == {"index", "function"} for p in pieces)
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"city":"mock"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] >= 1

    async with (
        oai(mock) as client,
        client.chat.completions.stream(model="gpt-x", messages=HELLO, tools=CHAT_TOOLS) as stream,
    ):
        final = await stream.get_final_completion()
    tool_calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert tool_calls is not None
    assert (tool_calls[0].function.name, tool_calls[0].function.arguments) == (
        "get_weather",
        '{"city":"mock"}',
    )


async def test_chat_rich_shapes_are_counted(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(completion_tokens=1)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcd"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "ab", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "abcd"},
    ]
    body = {"model": "m", "messages": messages, "tools": CHAT_TOOLS}
    answer = (await http.post(f"{mock.url}/v1/chat/completions", json=body)).json()
    # 4 + (2 + 2) + 4 = 12 characters -> 3 tokens; an image, a tool call, two tools: 4 x 8
    assert answer["usage"]["prompt_tokens"] == 3 + 4 * 8
    assert answer["choices"][0]["message"]["content"] == "tok0 "  # the tool answered


async def test_anthropic_plain_with_sdk(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", api_key="ak-test", completion_tokens=3)
    async with claude(mock) as client:
        msg = await client.messages.create(model="claude-x", max_tokens=100, messages=HELLO)
    assert msg.id.startswith("msg_")
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "tok0 tok1 tok2 "
    assert (msg.stop_reason, msg.usage.input_tokens, msg.usage.output_tokens) == ("end_turn", 3, 3)
    assert (msg.usage.cache_creation_input_tokens, msg.usage.cache_read_input_tokens) == (0, 0)
    s = await stats(http, mock)
    # the SDK sends its own API version (a date) and, from 2.x, the key as a bearer token
    assert set(s["last_headers"]) == {"anthropic-version"}
    assert s["last_key_header"] in ("x-api-key", "authorization")
    assert "ak-test" not in str(s)
    assert s["paths"] == {"/v1/messages": 1}


async def test_anthropic_tool_round_trip(start_mock: Start) -> None:
    mock = await start_mock(api="anthropic", completion_tokens=2)
    async with claude(mock) as client:
        first = await client.messages.create(
            model="claude-x", max_tokens=100, messages=HELLO, tools=CLAUDE_TOOLS
        )
        assert first.stop_reason == "tool_use"
        assert len(first.content) == 1
        assert first.content[0].type == "tool_use"
        use = first.content[0]
        assert use.id.startswith("toolu_")
        assert (use.name, use.input) == ("get_weather", {"city": "mock"})

        follow = await client.messages.create(
            model="claude-x",
            max_tokens=100,
            tools=CLAUDE_TOOLS,
            messages=[
                *HELLO,
                {"role": "assistant", "content": [use.model_dump()]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": use.id,
                            "content": [{"type": "text", "text": "sunny"}],
                        }
                    ],
                },
            ],
        )
        assert (follow.stop_reason, follow.content[0].type) == ("end_turn", "text")

        chosen = await client.messages.create(
            model="claude-x",
            max_tokens=100,
            messages=HELLO,
            tools=CLAUDE_TOOLS,
            tool_choice={"type": "tool", "name": "get_time"},
        )
        assert chosen.content[0].type == "tool_use"
        assert chosen.content[0].name == "get_time"
        none = await client.messages.create(
            model="claude-x",
            max_tokens=100,
            messages=HELLO,
            tools=CLAUDE_TOOLS,
            tool_choice={"type": "none"},
        )
        assert none.content[0].type == "text"


async def test_anthropic_streams(start_mock: Start) -> None:
    mock = await start_mock(api="anthropic", completion_tokens=3, chunk_interval_ms=1)
    async with claude(mock) as client:
        async with client.messages.stream(
            model="claude-x", max_tokens=100, messages=HELLO
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "tok0 tok1 tok2 "
        assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", 3)

        async with client.messages.stream(
            model="claude-x", max_tokens=100, messages=HELLO, tools=CLAUDE_TOOLS
        ) as stream:
            kinds = [event.type async for event in stream]
            used = await stream.get_final_message()
    assert used.stop_reason == "tool_use"
    assert used.content[0].type == "tool_use"
    assert used.content[0].input == {"city": "mock"}
    assert used.usage.output_tokens >= 1
    assert "input_json" in kinds  # the SDK's event for each input_json_delta


async def test_claude_code_shaped_request(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", api_key="ak-test", completion_tokens=2)
    system = [
        {"type": "text", "text": "You are Claude Code."},  # 20 characters
        {"type": "text", "text": "abcd", "cache_control": {"type": "ephemeral"}},
    ]
    tools = [{**CLAUDE_TOOLS[0], "cache_control": {"type": "ephemeral"}}, CLAUDE_TOOLS[1]]
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcd", "cache_control": {"type": "ephemeral"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                },
            ],
        }
    ]
    beta = "claude-code-20250219,interleaved-thinking-2025-05-14"
    async with (
        claude(mock) as client,
        client.messages.stream(
            model="claude-x",
            max_tokens=1000,
            system=system,  # type: ignore[arg-type]
            tools=tools,
            messages=messages,
            metadata={"user_id": "user_abc_account_def_session_ghi"},
            stop_sequences=["never"],
            thinking={"type": "disabled"},
            extra_headers={"anthropic-beta": beta},
        ) as stream,
    ):
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    # 20 + 4 + 4 = 28 characters -> 7 tokens; an image and two tools: 3 x 8
    assert final.usage.input_tokens == 7 + 3 * 8
    s = await stats(http, mock)
    assert s["last_headers"]["anthropic-beta"] == beta
    assert s["last_headers"]["anthropic-version"]
    assert s["paths"] == {"/v1/messages": 1}
    assert (s["received"], s["ok"], s["last_max_tokens"]) == (1, 1, 1000)


async def test_anthropic_bad_system_and_tool_choice(
    start_mock: Start, http: httpx.AsyncClient
) -> None:
    mock = await start_mock(api="anthropic")
    headers = {"anthropic-version": "2023-06-01"}
    url = f"{mock.url}/v1/messages"
    base = {"model": "c", "max_tokens": 5, "messages": HELLO}
    bad_system = await http.post(url, json={**base, "system": 3}, headers=headers)
    assert bad_system.status_code == 400
    assert bad_system.json()["error"]["type"] == "invalid_request_error"
    unknown = {**base, "tools": CLAUDE_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}
    assert (await http.post(url, json=unknown, headers=headers)).status_code == 400


async def test_anthropic_key_in_either_header(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", api_key="ak-test")
    url = f"{mock.url}/v1/messages"
    body = {"model": "c", "max_tokens": 5, "messages": HELLO}
    version = {"anthropic-version": "2023-06-01"}
    codes = [
        (await http.post(url, json=body, headers={**version, **auth})).status_code
        for auth in (
            {"x-api-key": "ak-test"},
            {"Authorization": "Bearer ak-test"},
            {"Authorization": "Bearer wrong"},
            {},
        )
    ]
    assert codes == [200, 200, 401, 401]
    assert (await stats(http, mock))["last_key_header"] is None
