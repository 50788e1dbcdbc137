"""Provider values read by the adapters stay cheap and typed, however hostile: rate-limit
header values, JSON nested deeper than can be written back, event types of the wrong type."""

from __future__ import annotations

import time

import orjson
import pytest

from router.errors import UpstreamProtocolError
from router.upstream.providers._common import (
    MAX_VALUE,
    parse_duration,
    parse_int,
    parse_retry_after,
    parse_timestamp,
)
from router.upstream.providers.anthropic import AnthropicAdapter, AnthropicStream
from router.upstream.providers.openai import OpenAIAdapter

HOSTILE = ["1s" * 32000, "1" * 65000, "1." * 32000, "Mon, " + "1 " * 32000]


@pytest.mark.parametrize("value", HOSTILE, ids=["durations", "digits", "dots", "date"])
def test_an_overlong_rate_limit_value_is_not_read(value: str) -> None:
    # before: "1s" * 32000 parsed as a 32000 s duration, in 57 ms of the event loop
    assert parse_duration(value) is None
    assert parse_int(value) is None
    assert parse_retry_after(value, time.time()) is None
    assert parse_timestamp(value, time.time()) is None
    headers = {"x-ratelimit-reset-requests": value, "x-ratelimit-remaining-tokens": value}
    assert OpenAIAdapter().rate_limits(headers).reset_requests_s is None


def test_real_rate_limit_values_are_still_read() -> None:
    assert parse_duration("1h2m3.5s") == 3723.5
    assert parse_int("9" * 20) == int(float("9" * 20))
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0) is not None
    assert parse_timestamp("2024-01-01T00:00:00.123456+00:00", 0) is not None
    assert all(len(v) <= MAX_VALUE for v in ("Wed, 21 Oct 2015 07:28:00 GMT", "9" * 20))


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


def test_an_anthropic_answer_nested_too_deep_to_pass_on_is_a_bad_response() -> None:
    # orjson reads 1024 levels but writes 254: before, this was a TypeError (a 500)
    message = (b'{"id":"m","model":"x","content":[{"type":"tool_use","id":"t","name":"f",'
               b'"input":' + nested(300) + b"}]}")  # fmt: skip
    assert orjson.loads(message)
    with pytest.raises(UpstreamProtocolError, match="nested too deep"):
        AnthropicAdapter().chat_response(message)


def test_an_anthropic_stream_nested_too_deep_is_a_bad_response() -> None:
    tr = AnthropicStream(False)
    start = b'data: {"type":"message_start","message":{"id":"m","model":' + nested(300) + b"}}"
    with pytest.raises(UpstreamProtocolError, match="nested too deep"):
        tr.feed(start + b"\n\n")


def test_an_anthropic_event_type_that_is_not_text_is_ignored() -> None:
    # before: a list here could not be hashed (TypeError, a 500)
    tr = AnthropicStream(False)
    assert tr.feed(b'data: {"type": [1]}\n\n') == b""
    assert tr.feed(b'event: ping\ndata: {"type": {"a": 1}}\n\n') == b""
