"""The Anthropic Messages API served inbound (``POST /v1/messages``, as Claude Code uses it).

A route's target is served one of two ways, by its provider's kind:

- anthropic-kind: passed through (``messages_passthrough``): the body as it came, the
  answer byte for byte;
- openai-kind: translated (``messages_to_chat`` out, ``messages_from_chat`` and
  ``messages_chat_stream`` back).

Both start from ``check_messages`` (``messages_check``). This module gathers the public API
and holds what both ways share: errors in Anthropic's shape, and the token estimate that
reserves TPM and answers ``POST /v1/messages/count_tokens``. All of it is pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from router.errors import RouterError, UpstreamError, UpstreamTimeout, error_response
from router.tokens import PER_MESSAGE, PRIMING
from router.upstream.providers import _common
from router.upstream.providers.messages_chat_stream import ChatToMessagesStream, frame
from router.upstream.providers.messages_check import (
    MessagesRequest,
    check_count_tokens,
    check_messages,
)
from router.upstream.providers.messages_from_chat import from_chat_response
from router.upstream.providers.messages_passthrough import (
    PassthroughStream,
    passthrough_request,
    passthrough_response,
)
from router.upstream.providers.messages_to_chat import to_chat_request

__all__ = [
    "ChatToMessagesStream",
    "MessagesRequest",
    "PassthroughStream",
    "anthropic_error",
    "check_count_tokens",
    "check_messages",
    "count_tokens",
    "error_event",
    "failure_event",
    "from_chat_response",
    "messages_error_response",
    "passthrough_request",
    "passthrough_response",
    "prompt_estimate",
    "to_chat_request",
]

# --- errors ----------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""Anthropic's error type for each status (its documented errors; ``timeout_error`` is the
SDK's name for 504). Any other 4xx is an ``invalid_request_error``, 5xx an ``api_error``."""


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status: int, message: str) -> bytes:
    """An error body in Anthropic's shape: ``{"type": "error", "error": {type, message}}``."""
    return _common.dump_json(
        {"type": "error", "error": {"type": error_type(status), "message": message}}
    )


def messages_error_response(err: RouterError) -> tuple[int, dict[str, str], bytes]:
    """``err`` as the Messages endpoints answer it: the status and headers every endpoint
    gives it (``router.errors.error_response``), Anthropic's body."""
    status, headers, _ = error_response(err)
    return status, headers, anthropic_error(status, str(err))


def error_event(message: str, kind: str = "api_error") -> bytes:
    """An ``event: error`` SSE frame: how a stream fails after its first byte."""
    return frame("error", {"type": "error", "error": {"type": kind, "message": message}})


def failure_event(exc: Exception) -> bytes:
    """The error event ending a stream whose provider failed mid-way (the relay's)."""
    kind = "timeout_error" if isinstance(exc, UpstreamTimeout) else "api_error"
    detail = str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
    return error_event(f"the provider failed mid-stream: {detail}", kind)


# --- token estimate --------------------------------------------------------------------

IMAGE_TOKENS = 1_600
"""An image's estimate: Anthropic's cost of its largest image (about 1,600 tokens for
1.15 megapixels; a larger one is scaled down). The length of its base64 text, as
``router.tokens`` counts an unknown part, would make a 1 MB screenshot 330,000 tokens."""


def count_tokens(body: dict[str, Any]) -> int:
    """Estimated input tokens of a checked Messages body, by ``router.tokens``'s rule:
    ``ceil(characters / 4)`` + 4 per message + 3, text counted by its length, tool calls,
    tool schemas and other structured blocks by their JSON's; images ``IMAGE_TOKENS`` each.
    ``BadRequest`` if a part cannot be serialized (nested too deep)."""
    chars, images = _system_chars(body.get("system")), 0
    messages = body.get("messages") or []
    for message in messages:
        c, i = _content(message.get("content") if isinstance(message, dict) else message)
        chars, images = chars + c, images + i
    if body.get("tools"):
        chars += len(_common.dump_json(body["tools"]))
    return (chars + 3) // 4 + PER_MESSAGE * len(messages) + PRIMING + IMAGE_TOKENS * images


prompt_estimate = count_tokens
"""What is reserved in the TPM window for a Messages body's prompt: the same estimate."""


def _system_chars(system: Any) -> int:
    if isinstance(system, str):
        return len(system)
    if isinstance(system, list):
        return sum(len(b.get("text") or "") for b in system if isinstance(b, dict))
    return 0


def _content(content: Any, in_result: bool = False) -> tuple[int, int]:
    """Characters and images of a message's content (or, ``in_result``, a tool result's)."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        return (0 if content is None else len(_common.dump_json(content))), 0
    chars = images = 0
    for block in content:
        c, i = _block(block, in_result)
        chars, images = chars + c, images + i
    return chars, images


def _block(block: Any, in_result: bool) -> tuple[int, int]:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return len(block.get("text") or ""), 0
    if kind == "image":
        return 0, 1
    if kind == "thinking":
        return len(block.get("thinking") or ""), 0
    if kind == "tool_use":
        return len(block.get("name") or "") + len(_common.dump_json(block.get("input"))), 0
    if kind == "tool_result" and not in_result:
        # one level only: a result nested in a result (refused by the check) counts as JSON
        return _content(block.get("content"), in_result=True)
    return len(_common.dump_json(block)), 0
