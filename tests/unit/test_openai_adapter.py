"""The OpenAI passthrough adapter and the helpers it shares with other adapters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from router.config import Provider, SecretRef
from router.errors import UpstreamProtocolError
from router.upstream.providers import ADAPTERS, adapter_for, openai
from router.upstream.providers._common import (
    MAX_MESSAGE,
    client_wants_usage,
    parse_duration,
    parse_retry_after,
    parse_timestamp,
)
from router.upstream.providers.anthropic import AnthropicAdapter
from router.upstream.providers.base import RateLimitInfo, Usage
from router.upstream.providers.openai import OpenAIAdapter

NOW = 1_700_000_000.0
ADAPTER = OpenAIAdapter()


def provider(base_url: str = "http://x/v1", key: str | None = None) -> Provider:
    ref = None
    if key is not None:
        ref = SecretRef(env="PROVIDER_KEY")
        ref._value = SecretStr(key)
    return Provider(name="p", kind="openai", base_url=base_url, api_key=ref)


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """All at once, one byte at a time, and cut in two at every possible offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def run(chunks: list[bytes], include_usage: bool) -> tuple[bytes, openai.OpenAIStream]:
    stream = ADAPTER.stream(include_usage)
    out = b"".join(stream.feed(chunk) for chunk in chunks) + stream.close()
    return out, stream


# --- registry --------------------------------------------------------------------------


def test_registry_maps_each_kind_to_its_adapter() -> None:
    assert set(ADAPTERS) == {"openai", "anthropic"}
    assert isinstance(adapter_for("openai"), OpenAIAdapter)
    assert isinstance(adapter_for("anthropic"), AnthropicAdapter)
    with pytest.raises(KeyError):
        adapter_for("nope")


# --- requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "chat_url", "embeddings_url"),
    [
        (
            "https://api.openai.com/v1",
            "https://api.openai.com/v1/chat/completions",
            "https://api.openai.com/v1/embeddings",
        ),
        (
            "http://127.0.0.1:9101/v1/",
            "http://127.0.0.1:9101/v1/chat/completions",
            "http://127.0.0.1:9101/v1/embeddings",
        ),
        (
            "https://r.openai.azure.com/openai/v1",
            "https://r.openai.azure.com/openai/v1/chat/completions",
            "https://r.openai.azure.com/openai/v1/embeddings",
        ),
        (
            "http://localhost:11434/v1//",
            "http://localhost:11434/v1/chat/completions",
            "http://localhost:11434/v1/embeddings",
        ),
    ],
)
def test_urls_append_the_path_to_the_base_url(
    base_url: str, chat_url: str, embeddings_url: str
) -> None:
    p = provider(base_url)
    assert ADAPTER.chat_request(p, "m", {"messages": []}).url == chat_url
    assert ADAPTER.embeddings_request(p, "m", {"input": "x"}).url == embeddings_url


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, {"content-type": "application/json"}),
        ("sk-1", {"content-type": "application/json", "authorization": "Bearer sk-1"}),
    ],
)
def test_headers_carry_the_key_only_when_set(key: str | None, expected: dict[str, str]) -> None:
    p = provider(key=key)
    assert ADAPTER.chat_request(p, "m", {"messages": []}).headers == expected
    assert ADAPTER.embeddings_request(p, "m", {"input": "x"}).headers == expected


def test_headers_work_with_a_key_resolved_by_parse_config() -> None:
    from router.config import parse_config

    cfg = parse_config(
        {
            "client_keys": [{"env": "CLIENT"}],
            "providers": [
                {"name": "o", "kind": "openai", "base_url": "http://x/v1", "api_key": {"env": "K"}}
            ],
            "routes": [{"model": "m", "targets": [{"provider": "o", "model": "m"}]}],
        },
        {"CLIENT": "c", "K": "secret"},
    )
    request = ADAPTER.chat_request(cfg.provider("o"), "m", {"messages": []})
    assert request.headers["authorization"] == "Bearer secret"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"model": "alias", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]},
        ),
        (
            {"model": "alias", "messages": [], "stream": False, "temperature": 0.5},
            {"model": "gpt-x", "messages": [], "stream": False, "temperature": 0.5},
        ),
        (
            {"model": "alias", "messages": [], "stream": True},
            {
                "model": "gpt-x",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        (
            {"model": "alias", "stream": True, "stream_options": {"include_usage": False}},
            {"model": "gpt-x", "stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            {"model": "a", "stream": True, "stream_options": {"continuous_usage_stats": True}},
            {
                "model": "gpt-x",
                "stream": True,
                "stream_options": {"continuous_usage_stats": True, "include_usage": True},
            },
        ),
        (
            {"model": "a", "stream": True, "stream_options": None},
            {"model": "gpt-x", "stream": True, "stream_options": {"include_usage": True}},
        ),
    ],
)
def test_chat_body_replaces_model_and_forces_stream_usage(
    body: dict[str, Any], expected: dict[str, Any]
) -> None:
    before = orjson.dumps(body)
    request = ADAPTER.chat_request(provider(), "gpt-x", body)
    assert orjson.loads(request.body) == expected
    assert orjson.dumps(body) == before  # the client's dict is left alone


def test_embeddings_body_replaces_model() -> None:
    body = {"model": "alias", "input": ["a", "b"], "dimensions": 8}
    request = ADAPTER.embeddings_request(provider(), "text-emb", body)
    assert orjson.loads(request.body) == {"model": "text-emb", "input": ["a", "b"], "dimensions": 8}


@pytest.mark.parametrize(
    ("body", "wants"),
    [
        ({}, False),
        ({"stream_options": None}, False),
        ({"stream_options": {"include_usage": False}}, False),
        ({"stream_options": {"include_usage": "yes"}}, False),
        ({"stream_options": {"include_usage": True}}, True),
    ],
)
def test_client_wants_usage(body: dict[str, Any], wants: bool) -> None:
    assert client_wants_usage(body) is wants


# --- whole answers ---------------------------------------------------------------------

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}
EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}


@pytest.mark.parametrize(
    ("answer", "usage"),
    [
        (CHAT, Usage(7, 3)),
        ({**CHAT, "usage": None}, None),
        ({k: v for k, v in CHAT.items() if k != "usage"}, None),
        ({**CHAT, "usage": {"prompt_tokens": 5}}, Usage(5, 0)),
    ],
)
def test_chat_response_passes_bytes_through(answer: dict[str, Any], usage: Usage | None) -> None:
    payload = orjson.dumps(answer, option=orjson.OPT_INDENT_2)
    translated = ADAPTER.chat_response(payload)
    assert translated.body is payload
    assert translated.usage == usage


def test_embeddings_response_passes_bytes_through() -> None:
    payload = orjson.dumps(EMBEDDINGS)
    translated = ADAPTER.embeddings_response(payload)
    assert translated.body is payload
    assert translated.usage == Usage(4, 0)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "invalid JSON"),
        (b"<html>bad gateway</html>", "invalid JSON"),
        (b'{"choices": [', "invalid JSON"),
        (b"[1, 2]", "unexpected shape"),
        (b'"text"', "unexpected shape"),
        (b"{}", "unexpected shape"),
        (b'{"choices": {}}', "unexpected shape"),
        (orjson.dumps(EMBEDDINGS), "unexpected shape"),
    ],
)
def test_chat_response_rejects_what_it_cannot_read(payload: bytes, message: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=message):
        ADAPTER.chat_response(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"nope", "invalid JSON"), (orjson.dumps(CHAT), "unexpected shape"), (b"{}", "shape")],
)
def test_embeddings_response_rejects_what_it_cannot_read(payload: bytes, message: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=message):
        ADAPTER.embeddings_response(payload)


# --- streams ---------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = True) -> bytes:
    obj: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = None
    return b"data: " + orjson.dumps(obj)


USAGE_CHUNK = b"data: " + orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
)
EVENTS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": 'lo "x"'}),
    chunk({}, "stop"),
    USAGE_CHUNK,
    b"data: [DONE]",
]


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_forwards_events_verbatim_at_every_split(sep: bytes, include_usage: bool) -> None:
    wire = b"".join(e + sep for e in EVENTS)
    expected = b"".join(e + sep for e in EVENTS if include_usage or e != USAGE_CHUNK)
    for chunks in chunkings(wire):
        out, stream = run(chunks, include_usage)
        assert out == expected
        assert stream.usage == Usage(9, 2)
        assert stream.content_chunks == 2
        assert stream.finished


def test_stream_forwards_each_event_as_soon_as_it_is_complete() -> None:
    stream = ADAPTER.stream(False)
    first, second = EVENTS[1] + b"\n\n", EVENTS[2] + b"\n\n"
    assert stream.feed(first + second[:10]) == first
    assert stream.feed(second[10:-1]) == b""
    assert stream.feed(second[-1:]) == second


def test_stream_hands_whole_chunks_on_without_copying() -> None:
    data = b"".join(e + b"\n\n" for e in EVENTS[:4])
    assert ADAPTER.stream(True).feed(data) is data


@pytest.mark.parametrize(
    ("event", "content"),
    [
        (chunk({"content": "x"}), True),
        (chunk({"content": ""}), False),
        (chunk({"content": None}), False),
        (chunk({"role": "assistant"}), False),
        (chunk({"reasoning_content": "think"}), False),
        (chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}), False),
        (b'data: {"choices": [{"delta": {"content": "spaced"}}]}', True),
        (b'data: {"choices": [{"delta": {"content": ""}}]}', False),
        (b'data: {"choices":[{"delta":{"content":"\\"content\\":\\""}}]}', True),
    ],
)
def test_stream_counts_content_chunks(event: bytes, content: bool) -> None:
    _, stream = run([event + b"\n\n"], False)
    assert stream.content_chunks == int(content)
    assert not stream.finished


@pytest.mark.parametrize(
    ("usage_chunk", "include_usage", "kept", "usage"),
    [
        (USAGE_CHUNK, True, True, Usage(9, 2)),
        (USAGE_CHUNK, False, False, Usage(9, 2)),
        # Python's json.dumps spacing (vLLM and friends)
        (
            b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4}}',
            False,
            False,
            Usage(1, 4),
        ),
        (b'data: {"choices": [], "usage": null}', False, True, None),
        # continuous usage on a content chunk: read, never dropped
        (
            b'data: {"choices":[{"delta":{"content":"a"}}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":1}}',
            False,
            True,
            Usage(3, 1),
        ),
        (b'data: {"usage": "weird", "choices": []}', False, True, None),
        (b'data: not json "usage"', False, True, None),
    ],
)
def test_stream_reads_usage_and_drops_the_unwanted_usage_chunk(
    usage_chunk: bytes, include_usage: bool, kept: bool, usage: Usage | None
) -> None:
    wire = usage_chunk + b"\n\n" + b"data: [DONE]\n\n"
    out, stream = run([wire], include_usage)
    assert out == (wire if kept else b"data: [DONE]\n\n")
    assert stream.usage == usage


@pytest.mark.parametrize(
    "wire",
    [
        b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
        b": keep-alive comment\n\n",
        b"\n\n",
        b"event: ping\ndata: {}\n\n",
    ],
)
def test_stream_forwards_errors_and_other_events(wire: bytes) -> None:
    for chunks in chunkings(wire):
        out, stream = run(chunks, False)
        assert out == wire
        assert not stream.finished


@pytest.mark.parametrize(
    ("wire", "tail", "finished"),
    [
        (b"", b"", False),
        (b"data: [DONE]\n\n", b"", True),
        (chunk({"content": "a"}) + b"\n\ndata: [DO", b"data: [DO", False),
        (b"data: [DONE]\n", b"data: [DONE]\n", True),
        (b"data:[DONE]", b"data:[DONE]", True),
    ],
)
def test_stream_close_returns_the_incomplete_tail(wire: bytes, tail: bytes, finished: bool) -> None:
    stream = ADAPTER.stream(False)
    stream.feed(wire)
    assert stream.close() == tail
    assert stream.finished is finished


# --- rate limits -----------------------------------------------------------------------


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai, "time", SimpleNamespace(time=lambda: NOW))


def http_date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset_s, UTC), usegmt=True)


@pytest.mark.usefixtures("frozen_time")
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, RateLimitInfo()),
        ({"retry-after": "2"}, RateLimitInfo(retry_after_s=2.0)),
        ({"retry-after": "1.5"}, RateLimitInfo(retry_after_s=1.5)),
        ({"retry-after": "-3"}, RateLimitInfo(retry_after_s=0.0)),
        ({"retry-after": http_date(30)}, RateLimitInfo(retry_after_s=30.0)),
        ({"retry-after": http_date(-30)}, RateLimitInfo(retry_after_s=0.0)),
        ({"retry-after": "soon"}, RateLimitInfo()),
        ({"retry-after-ms": "250"}, RateLimitInfo(retry_after_s=0.25)),
        ({"retry-after": "3", "retry-after-ms": "2500"}, RateLimitInfo(retry_after_s=2.5)),
        (
            {
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            RateLimitInfo(
                remaining_requests=59,
                remaining_tokens=149984,
                reset_requests_s=1.0,
                reset_tokens_s=360.0,
            ),
        ),
        (
            {"x-ratelimit-remaining-requests": "many", "x-ratelimit-reset-tokens": "later"},
            RateLimitInfo(),
        ),
    ],
)
def test_rate_limit_headers(headers: dict[str, str], expected: RateLimitInfo) -> None:
    assert ADAPTER.rate_limits(headers) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("2h3m4.5s", 7384.5),
        ("0s", 0.0),
        ("1m30.25s", 90.25),
        ("500us", 0.0005),
        ("3", 3.0),
        (" 7s ", 7.0),
        ("", None),
        ("s", None),
        ("1x", None),
        ("-1s", None),
        ("-2", None),
        ("inf", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_duration(value: str | None, seconds: float | None) -> None:
    assert parse_duration(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("12", 12.0),
        (http_date(60), 60.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (datetime.fromtimestamp(NOW + 5, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), 5.0),
        (datetime.fromtimestamp(NOW + 5, UTC).isoformat(), 5.0),
        (datetime.fromtimestamp(NOW - 5, UTC).isoformat(), 0.0),
        ("yesterday", None),
        (None, None),
    ],
)
def test_parse_timestamp(value: str | None, seconds: float | None) -> None:
    assert parse_timestamp(value, NOW) == seconds


# --- error messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            b'{"error": {"message": "Rate limit reached", "type": "requests", "code": null}}',
            "Rate limit reached",
        ),
        (b'{"error": "model not loaded"}', "model not loaded"),
        (b'{"message": "bad input"}', "bad input"),
        (b'{"detail": "x"}', '{"detail": "x"}'),
        (b"upstream\r\n\tfailed\x00 badly\n", "upstream failed badly"),
        (b"\xff\xfebroken utf-8", "broken utf-8"),
        (b"", ""),
    ],
)
def test_error_message(payload: bytes, message: str) -> None:
    assert ADAPTER.error_message(payload) == message


@pytest.mark.parametrize(
    "payload",
    [
        b"x" * 10_000,
        orjson.dumps({"error": {"message": "y" * 5_000}}),
        ("é" * 1_000).encode(),
        b"\n".join([b"line"] * 1_000),
    ],
)
def test_error_message_is_capped(payload: bytes) -> None:
    message = ADAPTER.error_message(payload)
    assert 0 < len(message) <= MAX_MESSAGE
    assert "\n" not in message
