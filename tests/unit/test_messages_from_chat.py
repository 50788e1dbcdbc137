"""OpenAI chat answers (whole and streamed) turned into Messages API answers, read back
with the official anthropic SDK: what Claude Code would see."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from router.errors import UpstreamProtocolError
from router.upstream.providers.base import Usage
from router.upstream.providers.messages import ChatToMessagesStream, from_chat_response
from router.upstream.providers.messages_from_chat import RAW_ARGUMENTS


def sdk_client(content: bytes, stream: bool) -> anthropic.Anthropic:
    """An SDK client whose every request is answered with ``content``."""
    kind = "text/event-stream" if stream else "application/json"

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": kind}, content=content)

    http = httpx2.Client(transport=httpx2.MockTransport(answer))
    return anthropic.Anthropic(api_key="k", base_url="http://router", http_client=http)


ASK: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


def sdk_message(payload: bytes) -> anthropic.types.Message:
    return sdk_client(payload, stream=False).messages.create(**ASK)


def sdk_stream_message(payload: bytes) -> anthropic.types.Message:
    with sdk_client(payload, stream=True).messages.stream(**ASK) as stream:
        return stream.get_final_message()


def completion(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-x",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35},
        **extra,
    }
    return orjson.dumps(obj)


# --- whole answers -----------------------------------------------------------------------


def test_a_text_answer() -> None:
    answer = from_chat_response(completion({"role": "assistant", "content": "hello"}), "claude-x")
    assert answer.usage == Usage(30, 5)
    assert orjson.loads(answer.body) == {
        "id": "msg_abc123",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 30,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    message = sdk_message(answer.body)
    assert message.content[0].type == "text"
    assert message.content[0].text == "hello"


def test_tool_calls_become_tool_use_blocks() -> None:
    reply = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
        ],
    }
    body = from_chat_response(completion(reply, "tool_calls"), "claude-x").body
    message = sdk_message(body)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    first, second = message.content[1], message.content[2]
    assert isinstance(first, anthropic.types.ToolUseBlock)
    assert (first.id, first.name, first.input) == ("call_1", "weather", {"city": "Paris"})
    assert isinstance(second, anthropic.types.ToolUseBlock)
    assert second.input == {}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ("   ", {}),
        (None, {}),
        ('{"a": 1', {RAW_ARGUMENTS: '{"a": 1'}),
        ("[1, 2]", {RAW_ARGUMENTS: "[1, 2]"}),
        ('"text"', {RAW_ARGUMENTS: '"text"'}),
    ],
)
def test_arguments_that_are_not_an_object_are_wrapped(arguments: Any, expected: Any) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    reply = {"role": "assistant", "content": None, "tool_calls": [call]}
    body = orjson.loads(from_chat_response(completion(reply, "tool_calls"), "m").body)
    assert body["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": expected}]


@pytest.mark.parametrize(
    ("finish", "tools", "stop_reason"),
    [
        ("stop", False, "end_turn"),
        ("length", False, "max_tokens"),
        ("tool_calls", True, "tool_use"),
        ("function_call", True, "tool_use"),
        ("content_filter", False, "refusal"),
        ("stop", True, "tool_use"),  # servers that say stop after calling tools
        (None, False, "end_turn"),
        ("something_new", False, "end_turn"),
        ("length", True, "max_tokens"),
    ],
)
def test_stop_reasons(finish: str | None, tools: bool, stop_reason: str) -> None:
    reply: dict[str, Any] = {"role": "assistant", "content": "x"}
    if tools:
        reply["tool_calls"] = [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]
    body = orjson.loads(from_chat_response(completion(reply, finish), "m").body)
    assert body["stop_reason"] == stop_reason


def test_cached_prompt_tokens_are_cache_reads() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 800},
    }
    answer = from_chat_response(completion({"content": "x"}, usage=usage), "m")
    assert answer.usage == Usage(1000, 5)
    assert orjson.loads(answer.body)["usage"] == {
        "input_tokens": 200,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 800,
    }


def test_no_usage_reported() -> None:
    payload = orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi"}}]})
    answer = from_chat_response(payload, "m")
    assert answer.usage is None
    assert orjson.loads(answer.body)["usage"]["input_tokens"] == 0


@pytest.mark.parametrize("chat_id", [None, "", 5, "chatcmpl-has space", "x" * 200])
def test_an_unusable_id_is_replaced(chat_id: Any) -> None:
    payload = orjson.dumps({"id": chat_id, "choices": [{"message": {"content": "hi"}}]})
    message_id = orjson.loads(from_chat_response(payload, "m").body)["id"]
    assert message_id.startswith("msg_")
    assert len(message_id) == 36


def test_text_parts_refusals_and_empty_answers() -> None:
    parts = {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert orjson.loads(from_chat_response(completion(parts), "m").body)["content"] == [
        {"type": "text", "text": "ab"}
    ]
    refusal = {"content": None, "refusal": "I can't."}
    body = orjson.loads(from_chat_response(completion(refusal, "content_filter"), "m").body)
    assert body["content"] == [{"type": "text", "text": "I can't."}]
    assert body["stop_reason"] == "refusal"
    assert orjson.loads(from_chat_response(completion({"content": ""}), "m").body)["content"] == []


@pytest.mark.parametrize(
    "payload",
    [
        b"nope",
        b"[]",
        b'{"choices": []}',
        b'{"choices": [{"message": "x"}]}',
        b'{"error": {"message": "bad"}}',
        orjson.dumps({"choices": [{"message": {"tool_calls": [{"function": {}}]}}]}),
    ],
)
def test_unreadable_answers_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        from_chat_response(payload, "m")


# --- streams -----------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    obj = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "choices": choices, **extra}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
DONE = b"data: [DONE]\n\n"


def text_stream() -> bytes:
    return b"".join(
        [
            chunk({"role": "assistant", "content": ""}, usage=None),
            chunk({"content": "Hel"}, usage=None),
            b": keep-alive\n\n",
            chunk({"content": "lo \u00e9\u00e9"}, usage=None),
            chunk({}, "stop", usage=None),
            chunk(usage=USAGE),
            DONE,
        ]
    )


def tool_stream() -> bytes:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    return b"".join(
        [
            chunk({"role": "assistant", "content": None}),
            chunk({"content": "Let me check."}),
            chunk(call(0, id="call_a", type="function", function={"name": "w", "arguments": ""})),
            chunk(call(0, function={"arguments": '{"city":'})),
            chunk(call(0, function={"arguments": ' "Paris"}'})),
            chunk(call(1, id="call_b", type="function", function={"name": "t", "arguments": "{}"})),
            chunk({}, "tool_calls"),
            chunk(usage={**USAGE, "prompt_tokens_details": {"cached_tokens": 2}}),
            DONE,
        ]
    )


def translate(data: bytes, size: int) -> tuple[ChatToMessagesStream, bytes]:
    stream = ChatToMessagesStream("claude-x", max_event_bytes=4096)
    out = [stream.feed(data[i : i + size]) for i in range(0, len(data), size)]
    return stream, b"".join(out) + stream.close()


def sizes(data: bytes) -> list[int]:
    return [1, 2, 3, 5, 17, 64, len(data)]


@pytest.mark.parametrize("data", [text_stream(), tool_stream()], ids=["text", "tools"])
def test_a_stream_split_at_every_byte_translates_the_same(data: bytes) -> None:
    whole = translate(data, len(data))[1]
    for cut in range(1, len(data)):
        stream = ChatToMessagesStream("claude-x")
        out = stream.feed(data[:cut]) + stream.feed(data[cut:]) + stream.close()
        assert out == whole, cut  # deterministic: the chunks carry every id
        assert stream.finished


@pytest.mark.parametrize("size", sizes(text_stream()))
def test_a_text_stream_at_any_chunking(size: int) -> None:
    stream, out = translate(text_stream(), size)
    assert out == translate(text_stream(), 10_000)[1]
    assert stream.finished
    assert stream.usage == Usage(12, 4)
    assert stream.content_chunks == 2
    assert stream.events == 7
    message = sdk_stream_message(out)
    assert message.id == "msg_s1"
    assert message.model == "claude-x"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello \u00e9\u00e9"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 12
    assert message.usage.output_tokens == 4


def test_the_event_sequence_of_a_text_stream() -> None:
    out = translate(text_stream(), 10_000)[1]
    kinds = [line[7:] for line in out.split(b"\n") if line.startswith(b"event: ")]
    assert kinds == [
        b"message_start",
        b"content_block_start",
        b"content_block_delta",
        b"content_block_delta",
        b"content_block_stop",
        b"message_delta",
        b"message_stop",
    ]


@pytest.mark.parametrize("size", sizes(tool_stream()))
def test_a_tool_stream_at_any_chunking(size: int) -> None:
    stream, out = translate(tool_stream(), size)
    assert stream.finished
    assert stream.usage == Usage(12, 4)
    message = sdk_stream_message(out)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    text, first, second = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "Let me check."
    assert isinstance(first, anthropic.types.ToolUseBlock)
    assert (first.id, first.name, first.input) == ("call_a", "w", {"city": "Paris"})
    assert isinstance(second, anthropic.types.ToolUseBlock)
    assert (second.id, second.name, second.input) == ("call_b", "t", {})
    assert message.usage.input_tokens == 10
    assert message.usage.cache_read_input_tokens == 2


def test_usage_in_the_finishing_chunk_ends_the_stream_there() -> None:
    stream = ChatToMessagesStream("m")
    stream.feed(chunk({"content": "x"}))
    out = stream.feed(chunk({}, "length", usage=USAGE))
    assert stream.finished
    assert out.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert stream.feed(DONE) == b""  # nothing after the end
    data = chunk({"content": "x"}) + chunk({}, "length", usage=USAGE)
    assert sdk_stream_message(translate(data, 9)[1]).stop_reason == "max_tokens"


def test_without_a_usage_chunk_done_ends_the_stream() -> None:
    data = chunk({"content": "x"}) + chunk({}, "stop") + DONE
    stream, out = translate(data, 7)
    assert stream.finished
    assert stream.usage is None
    message = sdk_stream_message(out)
    assert message.content[0].type == "text"
    assert message.usage.output_tokens == 0


def test_a_stream_cut_short_is_not_finished() -> None:
    stream, out = translate(chunk({"content": "x"}) + chunk({}, "stop"), 5)
    assert not stream.finished
    assert b"message_stop" not in out


def test_done_alone_is_an_empty_message() -> None:
    stream, out = translate(DONE, 3)
    assert stream.finished
    assert sdk_stream_message(out).content == []


def test_a_last_event_without_its_blank_line() -> None:
    stream, out = translate(text_stream()[:-2], 11)
    assert stream.finished
    assert sdk_stream_message(out).content[0].type == "text"


def test_an_error_object_mid_stream_is_a_protocol_error() -> None:
    stream = ChatToMessagesStream("m")
    stream.feed(chunk({"content": "x"}))
    with pytest.raises(UpstreamProtocolError, match="overloaded"):
        stream.feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')


def test_interleaved_tool_calls_are_a_protocol_error() -> None:
    stream = ChatToMessagesStream("m")
    fn = {"name": "f", "arguments": ""}
    stream.feed(chunk({"tool_calls": [{"index": 0, "id": "a", "function": fn}]}))
    stream.feed(chunk({"tool_calls": [{"index": 1, "id": "b", "function": fn}]}))
    with pytest.raises(UpstreamProtocolError, match="interleaved"):
        stream.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))


def test_a_tool_call_without_a_name_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError, match="without a name"):
        ChatToMessagesStream("m").feed(chunk({"tool_calls": [{"index": 0, "id": "a"}]}))


@pytest.mark.parametrize("data", [b"data: {nope\n\n", b"data: [1]\n\n"])
def test_invalid_json_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChatToMessagesStream("m").feed(data)


def test_an_event_over_the_bound_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError, match="over 64 bytes"):
        ChatToMessagesStream("m", max_event_bytes=64).feed(b"data: " + b"x" * 100)


def test_the_first_chunk_already_yields_bytes() -> None:
    """The dispatcher hands a stream over at its first output: message_start comes at once."""
    out = ChatToMessagesStream("m").feed(chunk({"role": "assistant", "content": ""}))
    assert out.startswith(b"event: message_start\n")
