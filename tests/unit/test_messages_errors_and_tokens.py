"""Errors in Anthropic's shape, read back by the official SDK; the Messages token estimate."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from router.errors import (
    AllAttemptsFailed,
    Attempt,
    BadRequest,
    Saturated,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from router.tokens import prompt_tokens
from router.upstream.providers.messages import (
    anthropic_error,
    count_tokens,
    error_event,
    failure_event,
    messages_error_response,
    prompt_estimate,
)
from router.upstream.providers.messages_chat_stream import frame
from router.upstream.providers.messages_check import MAX_BLOCKS
from router.upstream.providers.messages_from_chat import message_id


def client(status: int, content: bytes, kind: str = "application/json") -> anthropic.Anthropic:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": kind}, content=content)

    http = httpx2.Client(transport=httpx2.MockTransport(answer))
    return anthropic.Anthropic(
        api_key="k", base_url="http://router", http_client=http, max_retries=0
    )


ASK: dict[str, Any] = {
    "model": "m",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    ("status", "kind", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.APIStatusError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (502, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
        (504, "timeout_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.APIStatusError),
        (408, "invalid_request_error", anthropic.APIStatusError),
        (599, "api_error", anthropic.InternalServerError),
    ],
)
def test_errors_have_anthropics_shape(
    status: int, kind: str, sdk_error: type[anthropic.APIStatusError]
) -> None:
    body = anthropic_error(status, "no room")
    assert orjson.loads(body) == {"type": "error", "error": {"type": kind, "message": "no room"}}
    with pytest.raises(sdk_error) as info:
        client(status, body).messages.create(**ASK)
    assert info.value.status_code == status
    assert info.value.body == orjson.loads(body)


def test_router_errors_keep_their_status_and_headers() -> None:
    status, headers, body = messages_error_response(Saturated("every target is busy", 2.5))
    assert status == 429
    assert headers == {"Retry-After": "3"}
    assert orjson.loads(body)["error"] == {
        "type": "rate_limit_error",
        "message": "every target is busy",
    }
    failed = AllAttemptsFailed([Attempt("p", "timeout", "slow")], 504)
    status, headers, body = messages_error_response(failed)
    assert (status, headers["x-router-attempts"]) == (504, "1")
    assert orjson.loads(body)["error"]["type"] == "timeout_error"
    status, _, body = messages_error_response(BadRequest("messages: bad", "messages"))
    assert (status, orjson.loads(body)["error"]["message"]) == (400, "messages: bad")


def started_stream(tail: bytes) -> bytes:
    message = {
        "id": message_id("x"),
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    }
    return frame("message_start", {"type": "message_start", "message": message}) + tail


def test_an_error_event_fails_the_sdks_stream() -> None:
    event = error_event("the provider failed", "overloaded_error")
    assert event.startswith(b"event: error\ndata: ")
    sdk = client(200, started_stream(event), "text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as info, sdk.messages.stream(**ASK) as stream:
        stream.get_final_message()
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the provider failed"},
    }


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (UpstreamTimeout("no event within stream_idle_s"), "timeout_error"),
        (UpstreamProtocolError("bad bytes"), "api_error"),
        (RuntimeError("secret-ish internals"), "api_error"),
    ],
)
def test_failure_events(exc: Exception, kind: str) -> None:
    data = orjson.loads(failure_event(exc).split(b"data: ", 1)[1])
    assert data["error"]["type"] == kind
    assert data["error"]["message"].startswith("the provider failed mid-stream: ")
    assert "secret-ish" not in data["error"]["message"]


# --- token estimate ----------------------------------------------------------------------


def test_text_counts_as_the_chat_estimator_counts_it() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "s" * 40},
            {"role": "user", "content": "u" * 100},
            {"role": "assistant", "content": "a" * 60},
        ]
    }
    messages = {
        "system": "s" * 40,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "u" * 100}]},
            {"role": "assistant", "content": "a" * 60},
        ],
    }
    # the same characters; the chat body has one message more (its system message)
    assert count_tokens(messages) == prompt_tokens(chat) - 4
    assert count_tokens(messages) == 50 + 4 * 2 + 3


def test_every_block_type_counts() -> None:
    tool_input = {"city": "Paris"}
    tools = [{"name": "w", "input_schema": {"type": "object"}}]
    body = {
        "system": [{"type": "text", "text": "x" * 8}, {"type": "text", "text": "y" * 8}],
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "t" * 20, "signature": "sig"},
                    {"type": "tool_use", "id": "i", "name": "w", "input": tool_input},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "i", "content": "r" * 30},
                    {
                        "type": "tool_result",
                        "tool_use_id": "j",
                        "content": [
                            {"type": "text", "text": "q" * 10},
                            {"type": "image", "source": {"type": "base64", "data": "A" * 99999}},
                        ],
                    },
                    {"type": "document", "source": {"type": "text", "data": "d"}},
                ],
            },
        ],
        "tools": tools,
    }
    document = len(orjson.dumps(body["messages"][1]["content"][2]))  # type: ignore[index]
    chars = 16 + 20 + 1 + len(orjson.dumps(tool_input)) + 30 + 10 + document
    chars += len(orjson.dumps(tools))
    assert count_tokens(body) == (chars + 3) // 4 + 4 * 2 + 3 + 1_600
    assert prompt_estimate(body) == count_tokens(body)


def test_nested_results_count_as_json_without_recursion() -> None:
    block: dict[str, Any] = {"type": "text", "text": "x"}
    for _ in range(100):
        block = {"type": "tool_result", "tool_use_id": "t", "content": [block]}
    assert count_tokens({"messages": [{"role": "user", "content": [block]}]}) > 100


def test_a_large_body_counts_every_character() -> None:
    blocks = [{"type": "text", "text": "word " * 20}] * MAX_BLOCKS
    body = {"messages": [{"role": "user", "content": blocks}] * 50}
    assert count_tokens(body) == (100 * MAX_BLOCKS * 50 + 3) // 4 + 4 * 50 + 3


def test_an_unserializable_part_is_a_bad_request() -> None:
    deep: Any = {}
    for _ in range(300):
        deep = {"a": deep}
    body = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": deep}]}]}
    with pytest.raises(BadRequest):
        count_tokens(body)
