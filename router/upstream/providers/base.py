"""The one small interface every provider kind implements (one module per kind).

An adapter is pure translation: it builds the upstream request from the client's
OpenAI-shaped body, and turns the provider's answer (whole or streamed) back into
OpenAI's shape. It never does I/O: ``router.upstream.client`` sends,
``router.replica.dispatch`` decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from router.config import Provider


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """An HTTP request ready to send to a provider."""

    url: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage reported by the provider."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What the provider's headers say about its own limits; ``None`` where absent."""

    retry_after_s: float | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class Translated:
    """A whole (non-streamed) answer in OpenAI's shape, with the usage it reported."""

    body: bytes
    usage: Usage | None
    response_id: str | None = None
    """A Responses API answer's id (pinned to the provider that made it)."""


class StreamTranslator(Protocol):
    """Turns the provider's streamed bytes into OpenAI SSE frames, incrementally."""

    usage: Usage | None
    """The usage the stream reported, once it has (``None`` until then)."""
    content_chunks: int
    """How many frames carried generated content (a fallback token count)."""
    finished: bool
    """True once the provider signalled the end of the stream."""

    @property
    def events(self) -> int:
        """Complete SSE events read so far, keep-alives included (the stream's pulse)."""
        ...

    def feed(self, data: bytes) -> bytes:
        """Consume raw upstream bytes; return the OpenAI SSE bytes to send now (maybe b"")."""
        ...

    def close(self) -> bytes:
        """The stream ended; return any final frames (e.g. ``data: [DONE]``)."""
        ...


class Adapter(Protocol):
    """A provider kind: how to talk to it and how to read its answers."""

    kind: ClassVar[str]
    supports_embeddings: ClassVar[bool]
    probe_path: ClassVar[str]
    """What healthd probes by default, relative to ``base_url``: the cheapest authenticated
    call of the kind (its model list: no tokens spent)."""
    default_max_tokens: ClassVar[int]
    """The completion budget of a request that names none (a route may set its own): what
    is reserved in the TPM window, and what is sent where the kind needs one."""

    def headers(self, provider: Provider) -> dict[str, str]:
        """What every request to ``provider`` carries (its key, its API version): requests
        and healthd's probes alike."""
        ...

    def chat_request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int | None = None
    ) -> UpstreamRequest:
        """The upstream request for an OpenAI chat-completions body (``model`` replaced);
        ``max_tokens``: the budget to send when the body names none and the kind needs one
        (default ``default_max_tokens``)."""
        ...

    def embeddings_request(
        self, provider: Provider, model: str, body: dict[str, Any]
    ) -> UpstreamRequest:
        """The upstream request for an OpenAI embeddings body."""
        ...

    def chat_response(self, payload: bytes) -> Translated:
        """A 200 chat answer in OpenAI's shape; raises ``UpstreamProtocolError`` if unreadable."""
        ...

    def embeddings_response(self, payload: bytes) -> Translated:
        """A 200 embeddings answer in OpenAI's shape."""
        ...

    def stream(self, include_usage: bool, max_event_bytes: int) -> StreamTranslator:
        """A fresh translator for one streamed answer; a longer event is a protocol error."""
        ...

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitInfo:
        """Read the provider's rate-limit headers (lower-case names)."""
        ...

    def error_message(self, payload: bytes) -> str:
        """A short, secret-free message from an error body (at most 300 characters)."""
        ...
