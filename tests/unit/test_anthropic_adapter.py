"""The Anthropic adapter: OpenAI chat bodies in, Messages API out, and back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from router.config import Provider, SecretRef
from router.errors import BadRequest, UpstreamProtocolError
from router.upstream.providers import anthropic
from router.upstream.providers._common import MAX_MESSAGE
from router.upstream.providers.anthropic import AnthropicAdapter
from router.upstream.providers.base import RateLimitInfo, Usage

NOW = 1_700_000_000.0
ADAPTER = AnthropicAdapter()
USER = {"role": "user", "content": "hi"}


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``created`` and header deadlines depend on the clock; pin it (for this module only)."""
    monkeypatch.setattr(anthropic, "time", SimpleNamespace(time=lambda: NOW))


def provider(base_url: str = "https://api.anthropic.com", key: str | None = None) -> Provider:
    ref = None
    if key is not None:
        ref = SecretRef(env="PROVIDER_KEY")
        ref._value = SecretStr(key)
    return Provider(name="p", kind="anthropic", base_url=base_url, api_key=ref)


def translate(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(ADAPTER.chat_request(provider(), "claude-x", body).body)
    return out


# --- request ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("https://api.anthropic.com/", "https://api.anthropic.com/v1/messages"),
        ("http://127.0.0.1:9102", "http://127.0.0.1:9102/v1/messages"),
        ("https://gw.example/anthropic/", "https://gw.example/anthropic/v1/messages"),
    ],
)
def test_url(base_url: str, url: str) -> None:
    assert ADAPTER.chat_request(provider(base_url), "m", {"messages": [USER]}).url == url


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, {"content-type": "application/json", "anthropic-version": "2023-06-01"}),
        (
            "sk-ant",
            {
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
                "x-api-key": "sk-ant",
            },
        ),
    ],
)
def test_headers_carry_the_key_only_when_set(key: str | None, expected: dict[str, str]) -> None:
    assert ADAPTER.chat_request(provider(key=key), "m", {"messages": [USER]}).headers == expected


def test_headers_use_the_configured_version() -> None:
    p = provider().model_copy(update={"anthropic_version": "2099-01-01"})
    assert ADAPTER.chat_request(p, "m", {"messages": [USER]}).headers["anthropic-version"] == (
        "2099-01-01"
    )


BASE = {"model": "claude-x", "max_tokens": 4096}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"model": "alias", "messages": [USER]},
            {**BASE, "messages": [USER]},
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                    USER,
                ]
            },
            {**BASE, "system": "Be brief.\n\nBe kind.", "messages": [USER]},
        ),
        (
            {"messages": [USER], "max_tokens": 10, "max_completion_tokens": 20},
            {**BASE, "max_tokens": 20, "messages": [USER]},
        ),
        (
            {"messages": [USER], "max_tokens": 10},
            {**BASE, "max_tokens": 10, "messages": [USER]},
        ),
        (
            {
                "messages": [USER],
                "temperature": 0.2,
                "top_p": 0.9,
                "stream": True,
                "stop": "END",
                "user": "u-1",
                "seed": 7,
                "presence_penalty": 0.5,
                "stream_options": {"include_usage": True},
            },
            {
                **BASE,
                "messages": [USER],
                "temperature": 0.2,
                "top_p": 0.9,
                "stream": True,
                "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"},
            },
        ),
        (
            {"messages": [USER], "stop": ["a", "b"], "n": 1, "logprobs": False},
            {**BASE, "messages": [USER], "stop_sequences": ["a", "b"]},
        ),
        (
            {"messages": [USER], "response_format": {"type": "text"}, "stop": None},
            {**BASE, "messages": [USER]},
        ),
    ],
)
def test_request_parameters(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert translate(body) == expected


IMAGE_DATA = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "c"},
            ],
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": IMAGE_DATA, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://img.example/x.jpg"}},
                    ],
                }
            ],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "iVBORw0KGgo=",
                            },
                        },
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://img.example/x.jpg"},
                        },
                    ],
                }
            ],
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "t"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
            ],
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        ),
    ],
)
def test_messages_translation(messages: list[Any], expected: list[Any]) -> None:
    assert translate({"messages": messages})["messages"] == expected


TOOLS_BODY: dict[str, Any] = {
    "messages": [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "now"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "9"}]},
        {"role": "user", "content": "thanks"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get",
                "description": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ],
    "tool_choice": "required",
    "parallel_tool_calls": False,
}


def test_tools_translation() -> None:
    out = translate(TOOLS_BODY)
    assert out["tools"] == [
        {
            "name": "get",
            "description": "weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["messages"] == [
        USER,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "get", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "9"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
def test_tool_choice(tool_choice: Any, parallel: bool | None, expected: Any) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"messages": [USER], "tools": tools, "tool_choice": tool_choice}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected


def test_assistant_text_and_tool_calls_share_one_turn() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = translate(
        {"messages": [USER, {"role": "assistant", "content": "ok", "tool_calls": [call]}]}
    )
    assert out["messages"][1]["content"] == [
        {"type": "text", "text": "ok"},
        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
    ]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"messages": [USER], "n": 2}, "n > 1"),
        ({"messages": [USER], "logprobs": True}, "logprobs"),
        ({"messages": [USER], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [USER], "logit_bias": {"1": 5}}, "logit_bias"),
        ({"messages": [USER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [USER], "audio": {"voice": "x"}}, "audio"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"messages": [USER], "max_completion_tokens": "9"}, "max_completion_tokens"),
        ({}, "messages must be a list"),
        ({"messages": []}, "at least one user or assistant"),
        ({"messages": [{"role": "system", "content": "s"}]}, "at least one user or assistant"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ({"messages": [{"role": "function", "content": "x"}]}, "role 'function'"),
        ({"messages": [{"role": "user"}]}, "content must be a string or a list"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
            "system content must be text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "'input_audio' is not supported",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:,abc"}}],
                    }
                ]
            },
            "data URLs",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "image_url needs a url",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (
            {"messages": [{"role": "tool", "tool_call_id": "c", "content": None}]},
            "tool content must be text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}],
                    }
                ]
            },
            "arguments must be a JSON object",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
            "function name",
        ),
        (
            {"messages": [USER], "tools": [{"type": "code_interpreter"}]},
            "only function tools",
        ),
        (
            {
                "messages": [USER],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "sometimes",
            },
            "tool_choice must be",
        ),
    ],
)
def test_bad_requests(body: dict[str, Any], match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        ADAPTER.chat_request(provider(), "m", body)


def test_embeddings_are_refused() -> None:
    assert not ADAPTER.supports_embeddings
    with pytest.raises(UpstreamProtocolError, match="do not serve embeddings"):
        ADAPTER.embeddings_request(provider(), "m", {"input": "x"})
    with pytest.raises(UpstreamProtocolError, match="do not serve embeddings"):
        ADAPTER.embeddings_response(b"{}")


# --- response --------------------------------------------------------------------------


def message(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-x-2025",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 5},
    }
    return {**base, **fields}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
    ],
)
def test_response_finish_reasons(stop_reason: str | None, finish_reason: str) -> None:
    translated = ADAPTER.chat_response(orjson.dumps(message(stop_reason=stop_reason)))
    assert orjson.loads(translated.body)["choices"][0]["finish_reason"] == finish_reason


def test_response_translation() -> None:
    translated = ADAPTER.chat_response(orjson.dumps(message()))
    assert orjson.loads(translated.body) == {
        "id": "chatcmpl-msg_01",
        "object": "chat.completion",
        "created": int(NOW),
        "model": "claude-x-2025",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
    assert translated.usage == Usage(12, 5)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 3, "output_tokens": 4}, Usage(3, 4)),
        (
            {
                "input_tokens": 3,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 20,
                "output_tokens": 4,
            },
            Usage(123, 4),
        ),
        ({"input_tokens": 3, "cache_read_input_tokens": None, "output_tokens": 4}, Usage(3, 4)),
        (None, None),
    ],
)
def test_response_usage(usage: Any, expected: Usage | None) -> None:
    translated = ADAPTER.chat_response(orjson.dumps(message(usage=usage)))
    assert translated.usage == expected
    body = orjson.loads(translated.body)
    if expected is None:
        assert "usage" not in body
    else:
        assert body["usage"]["total_tokens"] == expected.total_tokens


@pytest.mark.parametrize(
    ("content", "reply"),
    [
        (
            [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Oslo"}},
            ],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
        ),
        (
            [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
            ],
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "now", "arguments": "{}"},
                    }
                ],
            },
        ),
        ([], {"role": "assistant", "content": ""}),
    ],
)
def test_response_tool_calls(content: list[Any], reply: dict[str, Any]) -> None:
    translated = ADAPTER.chat_response(orjson.dumps(message(content=content)))
    assert orjson.loads(translated.body)["choices"][0]["message"] == reply


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "invalid JSON"),
        (b"<html>", "invalid JSON"),
        (b"[]", "unexpected shape"),
        (b'{"type": "message"}', "unexpected shape"),
        (b'{"content": "text"}', "unexpected shape"),
    ],
)
def test_response_rejects_what_it_cannot_read(payload: bytes, match: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=match):
        ADAPTER.chat_response(payload)


# --- stream ----------------------------------------------------------------------------


def sse(kind: str, data: dict[str, Any], sep: str = "\n") -> bytes:
    return f"event: {kind}{sep}data: ".encode() + orjson.dumps(data) + (sep * 2).encode()


STREAM_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_9",
                "type": "message",
                "role": "assistant",
                "model": "claude-x-2025",
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1},
            },
        },
    ),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        },
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " wörld"},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 15},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def anthropic_stream(sep: str = "\n") -> bytes:
    return b"".join(sse(kind, data, sep) for kind, data in STREAM_EVENTS)


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """All at once, one byte at a time, and cut in two at every possible offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def run(chunks: list[bytes], include_usage: bool) -> tuple[bytes, anthropic.AnthropicStream]:
    stream = ADAPTER.stream(include_usage)
    out = b"".join(stream.feed(chunk) for chunk in chunks) + stream.close()
    return out, stream


def frames(out: bytes) -> list[Any]:
    """The OpenAI SSE frames' data, parsed (``[DONE]`` kept as the string)."""
    assert out.endswith(b"\n\n") or not out
    result: list[Any] = []
    for frame in out.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        data = frame[len(b"data: ") :]
        result.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return result


def expected_chunks(include_usage: bool) -> list[Any]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": "chatcmpl-msg_9",
            "object": "chat.completion.chunk",
            "created": int(NOW),
            "model": "claude-x-2025",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            c["usage"] = None
        return c

    out: list[Any] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": " wörld"}),
        chunk({}, "stop"),
    ]
    if include_usage:
        usage = {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}
        out.append({**chunk({}), "choices": [], "usage": usage})
    return [*out, "[DONE]"]


@pytest.mark.parametrize("sep", ["\n", "\r\n"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_translation_at_every_split(sep: str, include_usage: bool) -> None:
    wire = anthropic_stream(sep)
    reference, _ = run([wire], include_usage)
    assert frames(reference) == expected_chunks(include_usage)
    for chunks in chunkings(wire):
        out, stream = run(chunks, include_usage)
        assert out == reference
        assert stream.finished
        assert stream.usage == Usage(30, 15)
        assert stream.content_chunks == 2


def test_stream_emits_frames_as_soon_as_events_complete() -> None:
    wire = anthropic_stream()
    stream = ADAPTER.stream(False)
    first_end = wire.index(b"\n\n") + 2
    assert stream.feed(wire[: first_end - 1]) == b""
    usage_before = stream.usage
    first = frames(stream.feed(wire[first_end - 1 : first_end]))
    assert first == expected_chunks(False)[:1]
    assert usage_before is None
    assert stream.usage == Usage(30, 1)
    assert not stream.finished


def test_stream_without_message_stop_is_not_finished() -> None:
    wire = anthropic_stream()
    cut = wire.index(b"event: message_stop")
    out, stream = run([wire[:cut]], True)
    assert "[DONE]" not in frames(out)
    assert not stream.finished


def test_stream_close_reads_a_last_event_without_blank_line() -> None:
    wire = anthropic_stream().rstrip(b"\n")
    out, stream = run([wire], False)
    assert frames(out)[-1] == "[DONE]"
    assert stream.finished


def test_stream_error_event() -> None:
    wire = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Busy"}})
    out, stream = run([wire], True)
    assert frames(out) == [
        {"error": {"message": "Busy", "type": "overloaded_error", "code": "overloaded_error"}}
    ]
    assert not stream.finished


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({}, {"message": "api_error", "type": "api_error", "code": "api_error"}),
        (
            {"type": "api_error", "message": "x\n" * 400},
            {"message": ("x " * 150).strip(), "type": "api_error", "code": "api_error"},
        ),
    ],
)
def test_stream_error_event_defaults_and_cap(error: dict[str, Any], expected: Any) -> None:
    out, _ = run([sse("error", {"type": "error", "error": error})], False)
    assert frames(out) == [{"error": expected}]
    assert len(expected["message"]) <= MAX_MESSAGE


TOOL_STREAM = [
    sse("message_start", {"type": "message_start", "message": {"id": "m", "model": "c"}}),
    sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
    ),
    sse(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hm"},
        },
    ),
    sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}},
        },
    ),
    sse(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
    ),
    sse(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"city":'},
        },
    ),
    sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
    ),
    sse("message_stop", {"type": "message_stop"}),
]

TOOL_DELTAS: list[tuple[dict[str, Any], str | None]] = [
    ({"role": "assistant", "content": ""}, None),
    (
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": ""},
                }
            ]
        },
        None,
    ),
    ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}, None),
    ({}, "tool_calls"),
]


def test_stream_tool_use() -> None:
    out, stream = run([b"".join(TOOL_STREAM)], False)
    deltas = [
        (f["choices"][0]["delta"], f["choices"][0]["finish_reason"]) for f in frames(out)[:-1]
    ]
    assert deltas == TOOL_DELTAS
    assert stream.usage == Usage(0, 9)
    assert stream.content_chunks == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"event: ping\ndata: {\n\n",
        b"event: message_start\ndata: [1]\n\n",
    ],
)
def test_stream_rejects_unreadable_events(wire: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ADAPTER.stream(False).feed(wire)


def test_stream_ignores_comments_and_unknown_events() -> None:
    wire = b': hi\n\nevent: future\ndata: {"type": "future"}\n\n'
    out, stream = run([wire], True)
    assert out == b""
    assert not stream.finished


# --- rate limits and errors ------------------------------------------------------------


def rfc3339(offset_s: float) -> str:
    return datetime.fromtimestamp(NOW + offset_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, RateLimitInfo()),
        ({"retry-after": "7"}, RateLimitInfo(retry_after_s=7.0)),
        ({"retry-after": "soon"}, RateLimitInfo()),
        (
            {
                "anthropic-ratelimit-requests-remaining": "49",
                "anthropic-ratelimit-requests-reset": rfc3339(12),
                "anthropic-ratelimit-tokens-remaining": "9000",
                "anthropic-ratelimit-tokens-reset": rfc3339(3),
            },
            RateLimitInfo(
                remaining_requests=49,
                remaining_tokens=9000,
                reset_requests_s=12.0,
                reset_tokens_s=3.0,
            ),
        ),
        (
            {
                "anthropic-ratelimit-tokens-remaining": "9000",
                "anthropic-ratelimit-input-tokens-remaining": "4000",
                "anthropic-ratelimit-output-tokens-remaining": "6000",
            },
            RateLimitInfo(remaining_tokens=4000),
        ),
        (
            {"anthropic-ratelimit-output-tokens-remaining": "100"},
            RateLimitInfo(remaining_tokens=100),
        ),
        (
            {
                "anthropic-ratelimit-requests-reset": rfc3339(-60),
                "anthropic-ratelimit-tokens-reset": "not a time",
                "anthropic-ratelimit-requests-remaining": "lots",
            },
            RateLimitInfo(reset_requests_s=0.0),
        ),
    ],
)
def test_rate_limit_headers(headers: dict[str, str], expected: RateLimitInfo) -> None:
    assert ADAPTER.rate_limits(headers) == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            b'{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}',
            "Slow down",
        ),
        (
            b'{"type":"error","error":{"type":"api_error"}}',
            '{"type":"error","error":{"type":"api_error"}}',
        ),
        (b"Service Unavailable\n", "Service Unavailable"),
    ],
)
def test_error_message(payload: bytes, message: str) -> None:
    assert ADAPTER.error_message(payload) == message


def test_error_message_is_capped() -> None:
    payload = orjson.dumps({"type": "error", "error": {"type": "x", "message": "z" * 9_000}})
    assert ADAPTER.error_message(payload) == "z" * MAX_MESSAGE
