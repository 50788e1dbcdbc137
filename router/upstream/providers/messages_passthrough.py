"""Messages API requests to anthropic-kind providers: passed through, answers unchanged.

The client's body goes on as it came, ``model`` replaced by the target's (every other
field kept: ``cache_control``, ``thinking``, server tools, betas' fields). The headers are
the provider's own (its key, its default ``anthropic-version``), plus the client's
``anthropic-version`` and ``anthropic-beta`` when it sent them: the API version and the
betas change the body's meaning, so they must travel with it. The client's own
credentials (``x-api-key``, ``authorization``) never do.

Answers come back byte for byte; only usage is read (for accounting). A stream is relayed
event by event. An ``error`` event from the provider (Anthropic sends ``overloaded_error``
this way after its 200) is handled in one of two ways:

- before any byte was handed out: ``feed`` raises the provider's error (an
  ``UpstreamStatusError``, ``UpstreamRateLimited`` for ``rate_limit_error``), so the
  dispatcher can still fail over;
- after: the error event is relayed like any other, ``failed`` becomes True, what follows
  it is dropped, and the next ``feed`` or ``close`` raises that error, so the relay records
  the failure. The client already has Anthropic's own error event: the relay should not
  append a second one when ``failed`` is True (a second one would be harmless: the SDKs
  stop reading at the first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.config import Provider
from router.errors import (
    BadRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStatusError,
)
from router.upstream.providers import _common
from router.upstream.providers.anthropic import AnthropicAdapter, _prompt_tokens, _usage
from router.upstream.providers.base import Translated, UpstreamRequest, Usage

FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
MAX_HEADER_BYTES = 1024
"""The longest ``anthropic-version``/``anthropic-beta`` value forwarded; a longer one is
refused, not cut. Not 256: Claude Code sends eight or more betas in one comma-separated
``anthropic-beta`` (about 30 bytes each), and the list only grows."""
STREAM_COOLDOWN_S = 1.0
"""The cooldown of a ``rate_limit_error`` event (an event carries no Retry-After)."""
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""Anthropic's error types and the HTTP status each stands for."""

_ADAPTER = AnthropicAdapter()
# The events whose JSON is read (None: an event without an ``event:`` line, read by type).
_PARSED = frozenset({None, b"message_start", b"message_delta", b"error"})


def passthrough_request(
    provider: Provider, model: str, body: dict[str, Any], client_headers: Mapping[str, str]
) -> UpstreamRequest:
    """``POST {base_url}/v1/messages`` with the client's body, ``model`` replaced."""
    headers = {"content-type": "application/json", **_ADAPTER.headers(provider)}
    headers.update(forwarded_headers(client_headers))
    payload = _common.dump_json({**body, "model": model})
    return UpstreamRequest(_common.api_url(provider, "/v1/messages"), headers, payload)


def forwarded_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's ``anthropic-version``/``anthropic-beta``, checked; ``BadRequest`` if not
    printable ASCII of at most ``MAX_HEADER_BYTES`` (they go on to the provider verbatim)."""
    out: dict[str, str] = {}
    for name, value in client_headers.items():
        lower = name.lower()
        if lower not in FORWARDED_HEADERS:
            continue
        if not value or len(value) > MAX_HEADER_BYTES or not _printable(value):
            raise BadRequest(
                f"header {lower} must be printable ASCII of 1 to {MAX_HEADER_BYTES} bytes", lower
            )
        out[lower] = value
    return out


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def passthrough_response(payload: bytes) -> Translated:
    """The provider's message, unchanged, with its usage; ``UpstreamProtocolError`` if it
    is not a JSON message."""
    message = _common.load_json(payload)
    if not isinstance(message.get("content"), list):
        raise UpstreamProtocolError("provider answered with an unexpected shape: no content")
    return Translated(body=payload, usage=_usage(message.get("usage")))


def stream_error(obj: dict[str, Any]) -> UpstreamError:
    """The error an Anthropic ``error`` event stands for (``{"type": "error", "error": ...}``)."""
    error = obj.get("error")
    error = error if isinstance(error, dict) else {}
    kind = error.get("type")
    kind = kind if isinstance(kind, str) else "api_error"
    message = _common.clean_message(f"{kind}: {error.get('message') or ''}")
    if kind == "rate_limit_error":
        return UpstreamRateLimited(f"429 {message}", STREAM_COOLDOWN_S)
    status = ERROR_STATUS.get(kind, 500)
    return UpstreamStatusError(f"{status} {message}", status)


class PassthroughStream(_common.EventTranslator):
    """Relays Anthropic SSE events unchanged, reading what accounting needs."""

    __slots__ = ("_error", "_prompt", "_sent")

    def __init__(self, max_event_bytes: int = _common.MAX_EVENT_BYTES) -> None:
        super().__init__(max_event_bytes)
        self._sent = False  # whether any byte has been handed out
        self._error: UpstreamError | None = None
        self._prompt = 0

    @property
    def failed(self) -> bool:
        """The provider streamed an ``error`` event, and it was relayed."""
        return self._error is not None

    def feed(self, data: bytes) -> bytes:
        """Every event ``data`` completes, as received (up to an ``error`` event)."""
        if self._error is not None:
            raise self._error
        buf, ends = self._splitter.push(data)
        start = 0
        for end in ends:
            relayed_error = self._read(buf[start:end])
            start = end
            if relayed_error:
                break
        out = buf[:start] if start < len(buf) else buf
        if out:
            self._sent = True
        return out

    def close(self) -> bytes:
        """A last event that lacked its blank line, as received; raises a relayed error."""
        if self._error is not None:
            raise self._error
        tail = self._splitter.rest()
        if tail.strip():
            self._read(tail)
        return tail

    def _read(self, event: bytes) -> bool:
        """Account for one event; True if it is an ``error`` event that must end the relay."""
        name, data = _common.sse_fields(event)
        if name == b"content_block_delta":
            self.content_chunks += 1  # the hot path: no JSON parsed
        elif name == b"message_stop":
            self.finished = True
        elif data is not None and name in _PARSED:
            return self._read_json(_common.load_json(data, "invalid JSON in its stream"))
        return False

    def _read_json(self, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            usage = _usage(message.get("usage") if isinstance(message, dict) else None)
            if usage is not None:
                self.usage, self._prompt = usage, usage.prompt_tokens
        elif kind == "message_delta":
            self._delta_usage(obj.get("usage"))
        elif kind == "content_block_delta":
            self.content_chunks += 1
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self._failed(stream_error(obj))
            return True
        return False

    def _delta_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # Output tokens here are cumulative; newer API versions repeat the input tokens.
        if usage.get("input_tokens") is not None:
            self._prompt = _prompt_tokens(usage)
        self.usage = Usage(self._prompt, _common.as_int(usage.get("output_tokens")))

    def _failed(self, error: UpstreamError) -> None:
        if not self._sent:
            raise error  # nothing has reached the client: the dispatcher may fail over
        self._error = error
