"""OpenAI-compatible providers (OpenAI, Azure-style gateways, vLLM, Ollama, ...): passthrough.

The client's body is sent as is, with ``model`` replaced; answers come back byte for byte.
The one change: a streamed request always asks upstream for the final usage chunk
(``stream_options.include_usage``), because accounting needs it; the translator drops
that chunk again when the client did not ask for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from router.config import Provider
from router.errors import UpstreamProtocolError
from router.upstream.providers import _common
from router.upstream.providers.base import RateLimitInfo, Translated, UpstreamRequest

_USAGE = b'"usage"'
# Both compact (OpenAI) and spaced (Python json.dumps, e.g. some vLLM versions) null usage.
_NULL_USAGE = b'"usage":null'
_NULL_USAGE_SPACED = b'"usage": null'
_CONTENT = b'"content":'
_QUOTE = ord('"')
_SPACE = ord(" ")
_DONE = b"data: [DONE]"
_DONE_COMPACT = b"data:[DONE]"


class OpenAIAdapter:
    """Talks to any server that speaks OpenAI's chat-completions and embeddings API."""

    kind: ClassVar[str] = "openai"
    supports_embeddings: ClassVar[bool] = True
    probe_path: ClassVar[str] = "/models"
    default_max_tokens: ClassVar[int] = 1024
    """Reserved only: a body without a budget is passed on without one."""

    def headers(self, provider: Provider) -> dict[str, str]:
        """``Authorization: Bearer`` with the provider's key, when it has one."""
        key = _common.api_key(provider)
        return {} if key is None else {"authorization": f"Bearer {key}"}

    def chat_request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int | None = None
    ) -> UpstreamRequest:
        """The client's body for ``/chat/completions``, forcing usage on streams (a missing
        budget stays missing: the provider's own default applies)."""
        out = {**body, "model": model}
        if out.get("stream") is True:
            opts = out.get("stream_options")
            out["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        return self._request(provider, "/chat/completions", out)

    def embeddings_request(
        self, provider: Provider, model: str, body: dict[str, Any]
    ) -> UpstreamRequest:
        """The client's body for ``/embeddings``."""
        return self._request(provider, "/embeddings", {**body, "model": model})

    def chat_response(self, payload: bytes) -> Translated:
        """The answer unchanged, once checked to be a chat completion."""
        return _checked(payload, "choices")

    def embeddings_response(self, payload: bytes) -> Translated:
        """The answer unchanged, once checked to be an embeddings list."""
        return _checked(payload, "data")

    def stream(
        self, include_usage: bool, max_event_bytes: int = _common.MAX_EVENT_BYTES
    ) -> OpenAIStream:
        """A passthrough translator; ``include_usage`` is what the client asked for."""
        return OpenAIStream(include_usage, max_event_bytes)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitInfo:
        """OpenAI's ``retry-after(-ms)`` and ``x-ratelimit-*`` headers."""
        retry_ms = _common.parse_int(headers.get("retry-after-ms"))
        return RateLimitInfo(
            # The millisecond header is the more precise one when both are sent.
            retry_after_s=(
                retry_ms / 1000
                if retry_ms is not None
                else _common.parse_retry_after(headers.get("retry-after"), time.time())
            ),
            remaining_requests=_common.parse_int(headers.get("x-ratelimit-remaining-requests")),
            remaining_tokens=_common.parse_int(headers.get("x-ratelimit-remaining-tokens")),
            reset_requests_s=_common.parse_duration(headers.get("x-ratelimit-reset-requests")),
            reset_tokens_s=_common.parse_duration(headers.get("x-ratelimit-reset-tokens")),
        )

    def error_message(self, payload: bytes) -> str:
        """``error.message`` of an OpenAI error body, else the body's text; capped."""
        return _common.error_message(payload)

    def _request(self, provider: Provider, path: str, body: dict[str, Any]) -> UpstreamRequest:
        headers = {"content-type": "application/json", **self.headers(provider)}
        return UpstreamRequest(_common.api_url(provider, path), headers, _common.dump_json(body))


def _checked(payload: bytes, field: str) -> Translated:
    obj = _common.load_json(payload)
    if not isinstance(obj.get(field), list):
        raise UpstreamProtocolError(f"provider answered with an unexpected shape: no {field} list")
    return Translated(body=payload, usage=_common.openai_usage(obj))


class OpenAIStream(_common.EventTranslator):
    """Forwards OpenAI SSE events verbatim, reading only what accounting needs."""

    __slots__ = ("_include_usage",)

    def __init__(self, include_usage: bool, max_event_bytes: int = _common.MAX_EVENT_BYTES) -> None:
        super().__init__(max_event_bytes)
        self._include_usage = include_usage

    def feed(self, data: bytes) -> bytes:
        """Every event completed by ``data``, in order, minus an unwanted usage chunk."""
        buf, ends = self._splitter.push(data)
        if not ends:
            return b""
        dropped: list[tuple[int, int]] = []
        start = 0
        for end in ends:
            if not self._keep(buf, start, end):
                dropped.append((start, end))
            start = end
        last = ends[-1]
        if not dropped:
            # Usually the whole chunk: hand the same bytes object on, uncopied.
            return buf if last == len(buf) else buf[:last]
        return _without(buf, last, dropped)

    def close(self) -> bytes:
        """Whatever incomplete bytes remain, forwarded as they are."""
        tail = self._splitter.rest()
        if tail.strip():
            self._keep(tail, 0, len(tail))  # still count it, e.g. a [DONE] without blank line
        return tail

    def _keep(self, buf: bytes, start: int, end: int) -> bool:
        """Account for the event ``buf[start:end]``; False if it must not reach the client."""
        if _has_content(buf, start, end):
            self.content_chunks += 1
        elif buf.startswith(_DONE, start, end) or buf.startswith(_DONE_COMPACT, start, end):
            self.finished = True
            return True
        # Byte checks first: with usage forced on, nearly every chunk says "usage":null.
        if (
            buf.find(_USAGE, start, end) < 0
            or buf.find(_NULL_USAGE, start, end) >= 0
            or buf.find(_NULL_USAGE_SPACED, start, end) >= 0
        ):
            return True
        return self._read_usage(buf[start:end])

    def _read_usage(self, event: bytes) -> bool:
        """Record an event's usage; False if it is the usage chunk the client did not ask for."""
        _, data = _common.sse_fields(event)
        try:
            obj = _common.load_json(data or b"")
        except UpstreamProtocolError:
            return True  # not ours to judge: the client gets it as the provider sent it
        usage = _common.openai_usage(obj)
        if usage is None:
            return True
        self.usage = usage
        return self._include_usage or obj.get("choices") != []


def _has_content(buf: bytes, start: int, end: int) -> bool:
    """Whether the event's first ``"content":`` is a non-empty string (a cheap byte check)."""
    i = buf.find(_CONTENT, start, end)
    if i < 0:
        return False
    i += len(_CONTENT)
    if i < end and buf[i] == _SPACE:
        i += 1
    return i + 1 < end and buf[i] == _QUOTE and buf[i + 1] != _QUOTE


def _without(buf: bytes, last: int, dropped: list[tuple[int, int]]) -> bytes:
    """``buf[:last]`` without the ``dropped`` ranges (sorted, disjoint)."""
    pieces: list[bytes] = []
    start = 0
    for drop_start, drop_end in dropped:
        pieces.append(buf[start:drop_start])
        start = drop_end
    pieces.append(buf[start:last])
    return b"".join(pieces)
