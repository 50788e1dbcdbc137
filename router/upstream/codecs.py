"""One inbound API on one provider kind: what the dispatcher needs to send a request there and
give the client the answer in the API it spoke.

    inbound API          openai-kind target                 anthropic-kind target
    chat completions     passed through (OpenAIAdapter)     translated (AnthropicAdapter)
    embeddings           passed through                     not served
    Anthropic Messages   translated (providers.messages)    passed through (providers.messages)
    OpenAI Responses     passed through (providers.responses)  not served

A codec is pure translation, as the adapters are; ``codec_for`` picks one, ``serves`` says
whether a target can take an API at all (the dispatcher skips those that cannot).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from router.config import Provider, Target
from router.upstream.providers import adapter_for, messages, responses
from router.upstream.providers.base import StreamTranslator, Translated, UpstreamRequest


@dataclass(frozen=True, slots=True)
class Inbound:
    """What a codec may need of the client's request besides its body."""

    model: str
    """The model the client asked for (a translated answer names it, not the target's)."""
    headers: Mapping[str, str]
    """The client's headers a codec may forward (lower-case names; e.g. anthropic-beta)."""
    same_kind_only: bool = False
    """Only targets of the API's own kind can serve it (a Messages request with server
    tools, which have no chat translation)."""


class Codec(Protocol):
    """One inbound API on one provider kind."""

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        """The upstream request (``model``: the target's; ``max_tokens``: the completion
        budget to send where the body names none and the provider needs one)."""
        ...

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        """A 200 answer in the inbound API's shape, with its usage."""
        ...

    def stream(self, body: dict[str, Any], max_event_bytes: int, inb: Inbound) -> StreamTranslator:
        """A fresh translator of one streamed answer into the inbound API's events."""
        ...

    def error_event(self, message: str, code: str, tr: StreamTranslator) -> bytes:
        """The event that ends a stream (read by ``tr`` so far) which failed after its first
        byte."""
        ...


class ChatCodec:
    """Chat completions: the provider kind's adapter, as before codecs."""

    def __init__(self, kind: str) -> None:
        self.adapter = adapter_for(kind)

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        return self.adapter.chat_request(provider, model, body, max_tokens)

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        return self.adapter.chat_response(payload)

    def stream(self, body: dict[str, Any], max_event_bytes: int, inb: Inbound) -> StreamTranslator:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self.adapter.stream(include_usage, max_event_bytes)

    def error_event(self, message: str, code: str, tr: StreamTranslator) -> bytes:
        error = {"message": message, "type": "server_error", "code": code}
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


class EmbeddingsCodec(ChatCodec):
    """Embeddings: never streamed."""

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        return self.adapter.embeddings_request(provider, model, body)

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        return self.adapter.embeddings_response(payload)


class ResponsesCodec:
    """The OpenAI Responses API on openai-kind targets: passed through (``responses``)."""

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        return responses.request(provider, model, body)

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        answer, response_id = responses.response(payload)
        return replace(answer, response_id=response_id)

    def stream(self, body: dict[str, Any], max_event_bytes: int, inb: Inbound) -> StreamTranslator:
        return responses.ResponsesStream(max_event_bytes)

    def error_event(self, message: str, code: str, tr: StreamTranslator) -> bytes:
        return responses.error_event(message, code, getattr(tr, "next_sequence", 0))


class MessagesPassthrough:
    """The Anthropic Messages API on anthropic-kind targets: passed through (``messages``)."""

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        return messages.passthrough_request(provider, model, body, inb.headers)

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        return messages.passthrough_response(payload)

    def stream(self, body: dict[str, Any], max_event_bytes: int, inb: Inbound) -> StreamTranslator:
        return messages.PassthroughStream(max_event_bytes)

    def error_event(self, message: str, code: str, tr: StreamTranslator) -> bytes:
        return messages.error_event(message, "timeout_error" if code == "timeout" else "api_error")


class MessagesToChat(MessagesPassthrough):
    """The Anthropic Messages API on openai-kind targets: translated to and from chat."""

    def request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int, inb: Inbound
    ) -> UpstreamRequest:
        return messages.to_chat_request(provider, model, body, max_tokens)

    def response(self, payload: bytes, inb: Inbound) -> Translated:
        return messages.from_chat_response(payload, inb.model)

    def stream(self, body: dict[str, Any], max_event_bytes: int, inb: Inbound) -> StreamTranslator:
        return messages.ChatToMessagesStream(inb.model, max_event_bytes)


CHAT, EMBEDDINGS, MESSAGES, RESPONSES = "chat", "embeddings", "messages", "responses"

_CODECS: dict[tuple[str, str], Codec] = {
    (CHAT, "openai"): ChatCodec("openai"),
    (CHAT, "anthropic"): ChatCodec("anthropic"),
    (EMBEDDINGS, "openai"): EmbeddingsCodec("openai"),
    (EMBEDDINGS, "anthropic"): EmbeddingsCodec("anthropic"),
    (MESSAGES, "anthropic"): MessagesPassthrough(),
    (MESSAGES, "openai"): MessagesToChat(),
    (RESPONSES, "openai"): ResponsesCodec(),
}


NATIVE = {CHAT: "openai", EMBEDDINGS: "openai", MESSAGES: "anthropic", RESPONSES: "openai"}
"""The provider kind whose own API each inbound API is."""


def codec_for(api: str, kind: str) -> Codec:
    """The codec of inbound ``api`` on provider ``kind``; ``KeyError`` if it has none."""
    return _CODECS[(api, str(kind))]


def serves(api: str, provider: Provider, target: Target, inb: Inbound | None = None) -> bool:
    """Whether ``target`` (on ``provider``) can serve a request of inbound ``api``."""
    kind = str(provider.kind)
    if inb is not None and inb.same_kind_only and kind != NATIVE.get(api):
        return False
    if api == EMBEDDINGS:
        return adapter_for(kind).supports_embeddings
    if api == RESPONSES:
        return kind == "openai" and target.responses
    return (api, kind) in _CODECS
