"""Messages requests to anthropic-kind providers: the body and the answer pass unchanged."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from router.config import Provider, SecretRef
from router.errors import (
    BadRequest,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStatusError,
)
from router.upstream.providers.base import Usage
from router.upstream.providers.messages import (
    PassthroughStream,
    passthrough_request,
    passthrough_response,
)


def provider(key: str | None = "sk-provider", version: str = "2023-06-01") -> Provider:
    ref = None
    if key is not None:
        ref = SecretRef(env="PROVIDER_KEY")
        ref._value = SecretStr(key)
    return Provider(
        name="p",
        kind="anthropic",
        base_url="https://api.anthropic.com/",
        api_key=ref,
        anthropic_version=version,
    )


BODY: dict[str, Any] = {
    "model": "claude-client-name",
    "max_tokens": 100,
    "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    "some_future_field": [1, 2],
}


def test_the_body_goes_as_it_came_with_the_target_model() -> None:
    req = passthrough_request(provider(), "claude-target", BODY, {})
    assert req.url == "https://api.anthropic.com/v1/messages"
    sent = orjson.loads(req.body)
    assert sent == {**BODY, "model": "claude-target"}
    assert list(sent) == list(BODY)  # field order kept too


def test_headers_are_the_providers_own() -> None:
    req = passthrough_request(provider(), "m", BODY, {})
    assert req.headers == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-provider",
    }
    assert "x-api-key" not in passthrough_request(provider(key=None), "m", BODY, {}).headers


def test_version_and_betas_of_the_client_are_forwarded_never_its_credentials() -> None:
    client = {
        "Anthropic-Version": "2024-01-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-api-key": "sk-client",
        "authorization": "Bearer sk-client",
        "user-agent": "claude-cli",
    }
    headers = passthrough_request(provider(), "m", BODY, client).headers
    assert headers["anthropic-version"] == "2024-01-01"
    assert headers["anthropic-beta"] == "claude-code-20250219,interleaved-thinking-2025-05-14"
    assert headers["x-api-key"] == "sk-provider"
    assert "authorization" not in headers
    assert "user-agent" not in headers
    assert "sk-client" not in str(headers)


@pytest.mark.parametrize(
    "value", ["", "a\nb", "caf\u00e9", "x\x00", "b" * 1025, "tab\there"], ids=repr
)
def test_insane_forwarded_headers_are_refused(value: str) -> None:
    with pytest.raises(BadRequest) as info:
        passthrough_request(provider(), "m", BODY, {"anthropic-beta": value})
    assert info.value.param == "anthropic-beta"


def test_a_long_list_of_betas_is_forwarded() -> None:
    betas = ",".join(f"some-beta-feature-{i}-2025-01-01" for i in range(30))
    assert len(betas) <= 1024
    headers = passthrough_request(provider(), "m", BODY, {"anthropic-beta": betas}).headers
    assert headers["anthropic-beta"] == betas


def test_an_unserializable_body_is_a_bad_request() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(BadRequest):
        passthrough_request(provider(), "m", {**BODY, "x": deep}, {})


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-target",
    "content": [{"type": "text", "text": "hello"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 100,
        "output_tokens": 7,
    },
}


def test_the_answer_is_unchanged_and_its_usage_read() -> None:
    payload = orjson.dumps(MESSAGE, option=orjson.OPT_INDENT_2)
    answer = passthrough_response(payload)
    assert answer.body is payload
    assert answer.usage == Usage(115, 7)


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"type": "message"}'])
def test_an_unreadable_answer_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        passthrough_response(payload)


# --- stream ----------------------------------------------------------------------------


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


START = event(
    "message_start",
    {
        "type": "message_start",
        "message": {
            **MESSAGE,
            "content": [],
            "stop_reason": None,
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 100,
                "output_tokens": 1,
            },
        },
    },
)
STREAM = b"".join(
    [
        START,
        event("ping", {"type": "ping"}),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "a"},
            },
        ),
        event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "b"},
            },
        ),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 12},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
)


def relay(stream: PassthroughStream, data: bytes, size: int) -> bytes:
    out = [stream.feed(data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(out) + stream.close()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, len(STREAM)])
def test_the_stream_is_relayed_unchanged_at_any_chunking(size: int) -> None:
    stream = PassthroughStream(max_event_bytes=4096)
    assert relay(stream, STREAM, size) == STREAM
    assert stream.finished
    assert stream.usage == Usage(115, 12)
    assert stream.content_chunks == 2
    assert stream.events == 8
    assert not stream.failed


def test_a_partial_event_is_held_until_complete() -> None:
    stream = PassthroughStream()
    assert stream.feed(START[:-1]) == b""
    assert stream.feed(START[-1:]) == START
    assert stream.usage == Usage(115, 1)


def test_newer_api_versions_repeating_input_tokens_in_message_delta() -> None:
    stream = PassthroughStream()
    delta = event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 3, "output_tokens": 4},
        },
    )
    stream.feed(START + delta)
    assert stream.usage == Usage(23, 4)


def test_events_without_an_event_line_are_read_by_type() -> None:
    stream = PassthroughStream()
    data = b"".join(
        b"data: " + line.split(b"data: ", 1)[1] for line in STREAM.split(b"event: ")[1:]
    )
    assert relay(stream, data, 50) == data
    assert stream.finished
    assert stream.usage == Usage(115, 12)
    assert stream.content_chunks == 2


def test_a_last_event_without_its_blank_line_still_ends_the_stream() -> None:
    stream = PassthroughStream()
    assert relay(stream, STREAM[:-2], 100) == STREAM[:-2]
    assert stream.finished


def test_an_event_over_the_bound_is_a_protocol_error() -> None:
    stream = PassthroughStream(max_event_bytes=100)
    with pytest.raises(UpstreamProtocolError, match="over 100 bytes"):
        stream.feed(b"event: content_block_delta\ndata: " + b"x" * 200)


def test_invalid_json_in_a_usage_event_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        PassthroughStream().feed(b"event: message_start\ndata: {nope\n\n")


def error_event(kind: str) -> bytes:
    return event("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})


def test_an_error_before_any_byte_went_out_is_raised_for_failover() -> None:
    stream = PassthroughStream()
    with pytest.raises(UpstreamStatusError) as info:
        stream.feed(START + error_event("overloaded_error"))
    assert info.value.upstream_status == 529
    assert "overloaded_error: Overloaded" in str(info.value)


def test_a_rate_limit_error_event_is_a_rate_limit() -> None:
    with pytest.raises(UpstreamRateLimited):
        PassthroughStream().feed(error_event("rate_limit_error"))


def test_an_error_after_the_first_byte_is_relayed_then_raised() -> None:
    stream = PassthroughStream()
    assert stream.feed(START) == START
    after = event("ping", {"type": "ping"})
    out = stream.feed(error_event("api_error") + after)
    assert out == error_event("api_error")  # what followed the error is dropped
    assert stream.failed
    assert not stream.finished
    with pytest.raises(UpstreamStatusError) as info:
        stream.close()
    assert info.value.upstream_status == 500
    with pytest.raises(UpstreamStatusError):
        stream.feed(after)
