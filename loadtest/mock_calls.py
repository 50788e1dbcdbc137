"""What every API of the mock provider shares: a validated request, its planned answer, errors.

A request of any API (chat completions, messages, embeddings, responses) is parsed once into
a ``Call``; ``plan_completion`` then decides the answer (tokens of text, or one tool call) the
same way for all of them, so their answers agree on content and differ only in wire shape.
The token estimate counts what a real tokenizer would see: text by its characters, and an
image, file, tool definition, tool call or tool result as a small fixed cost plus its text.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

EMBED_DIM = 8
MODEL_ID = "mock-model"
BLOCK_TOKENS = 8
"""Tokens an image, file, tool definition, tool call or tool result costs besides its text."""
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

Frame = tuple[bytes, int]
"""One SSE frame of a stream and the completion tokens it carries (0: no pacing gap)."""


def new_hex() -> str:
    """A random 24-digit hex id body (the APIs' ids are random, not derived from content)."""
    return uuid.uuid4().hex[:24]


def estimate_tokens(chars: int) -> int:
    """The mock's tokenizer: one token per four characters, rounded up."""
    return math.ceil(chars / 4)


@dataclass(frozen=True)
class ToolCall:
    """The one tool call an answer makes: which tool, and its arguments as JSON text."""

    name: str
    arguments: str
    hex: str = field(default_factory=new_hex)

    @property
    def tokens(self) -> int:
        """Completion tokens the call costs (at least one per streamed piece)."""
        return max(len(self.pieces()), estimate_tokens(len(self.name) + len(self.arguments)))

    def pieces(self) -> list[str]:
        """The arguments cut into the 2-3 fragments a stream sends (one when shorter)."""
        text = self.arguments
        count = min(3, max(1, len(text) // 2))
        size = math.ceil(len(text) / count)
        return [text[i : i + size] for i in range(0, len(text), size)]

    def paced_pieces(self) -> list[tuple[str, int]]:
        """The pieces with the tokens each carries, adding up to ``tokens``."""
        pieces = self.pieces()
        share, extra = divmod(self.tokens, len(pieces))
        counts = [share] * len(pieces)
        counts[-1] += extra
        return list(zip(pieces, counts, strict=True))

    def input(self) -> dict[str, Any]:
        """The arguments as an object (Anthropic's ``input``)."""
        value: dict[str, Any] = orjson.loads(self.arguments)
        return value


@dataclass
class Call:
    """One validated API request."""

    kind: str
    model: str
    prompt_tokens: int
    stream: bool = False
    max_tokens: int | None = None
    stops: frozenset[str] = frozenset()
    include_usage: bool = False
    inputs: list[Any] = field(default_factory=list)
    dimensions: int = EMBED_DIM
    base64: bool = False
    tool: ToolCall | None = None
    echo: dict[str, Any] = field(default_factory=dict)
    """Responses API: the request parameters the response object repeats."""
    rid: str = field(default_factory=new_hex)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Completion:
    """The tokens an answer consists of and why it stopped (Anthropic vocabulary)."""

    tokens: list[str]
    reason: str
    stop_sequence: str | None = None
    tool: ToolCall | None = None

    @property
    def text(self) -> str:
        """The whole answer text."""
        return "".join(self.tokens)

    @property
    def output_tokens(self) -> int:
        """Completion tokens of the answer: its text's, or its tool call's."""
        return self.tool.tokens if self.tool is not None else len(self.tokens)


def plan_completion(natural: int, call: Call) -> Completion:
    """Decide the answer: the tool call, or ``natural`` tokens capped by max_tokens and stops."""
    if call.tool is not None:
        return Completion([], "tool_use", tool=call.tool)
    limit = natural if call.max_tokens is None else min(natural, call.max_tokens)
    tokens: list[str] = []
    for i in range(limit):
        word = f"tok{i}"
        if word in call.stops:
            return Completion(tokens, "stop_sequence", word)
        tokens.append(f"{word} ")
    return Completion(tokens, "max_tokens" if limit < natural else "end_turn")


class ApiError(Exception):
    """An error answer rendered in the API's shape, tagged with its /stats counter."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        counter: str = "errors",
        openai_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.counter = counter
        self.openai_type = openai_type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, api: str) -> dict[str, Any]:
        """The JSON error body as the given API shapes it."""
        if api == "anthropic":
            default = "api_error" if self.status >= 500 else "invalid_request_error"
            etype = ANTHROPIC_ERROR_TYPES.get(self.status, default)
            return {"type": "error", "error": {"type": etype, "message": self.message}}
        etype = self.openai_type or (
            "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {
                "message": self.message,
                "type": etype,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(
        400, message, param=param, code=code or ("invalid_request_error" if param else None)
    )


def content_cost(content: Any) -> tuple[int, int]:
    """(text characters, non-text blocks) of a content: a string or a list of parts/blocks."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        return 0, 0
    chars = blocks = 0
    for part in content:
        if isinstance(part, dict):
            part_chars, part_blocks = part_cost(part)
            chars += part_chars
            blocks += part_blocks
    return chars, blocks


def part_cost(part: dict[str, Any]) -> tuple[int, int]:
    """(text characters, non-text blocks) of one content part of any of the APIs."""
    text = part.get("text")
    if isinstance(text, str):  # text, input_text, output_text
        return len(text), 0
    kind = part.get("type")
    if kind == "tool_use":
        return len(str(part.get("name", ""))) + len(orjson.dumps(part.get("input"))), 1
    if kind == "tool_result":
        chars, blocks = content_cost(part.get("content"))
        return chars, blocks + 1
    if kind in ("thinking", "redacted_thinking"):
        return len(str(part.get("thinking") or part.get("data") or "")), 0
    return 0, 1  # image, image_url, input_image, input_file, document, ...


def tool_calls_cost(calls: Any) -> tuple[int, int]:
    """(characters, blocks) of an OpenAI assistant message's ``tool_calls``."""
    if not isinstance(calls, list):
        return 0, 0
    chars = 0
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            chars += len(str(function.get("name", ""))) + len(str(function.get("arguments", "")))
    return chars, len(calls)


def tokens_of(chars: int, blocks: int) -> int:
    """Tokens of ``chars`` characters of text and ``blocks`` non-text blocks."""
    return estimate_tokens(chars) + BLOCK_TOKENS * blocks


def messages_tokens(messages: list[Any], system: Any = None, tools: Any = None) -> int:
    """Estimated prompt tokens of a chat/messages request (system prompt and tools included)."""
    chars, blocks = content_cost(system)
    for message in messages:
        if not isinstance(message, dict):
            continue
        message_chars, message_blocks = content_cost(message.get("content"))
        chars += message_chars
        blocks += message_blocks
        if "tool_calls" in message:
            call_chars, call_blocks = tool_calls_cost(message["tool_calls"])
            chars += call_chars
            blocks += call_blocks
    if isinstance(tools, list):
        blocks += len(tools)
    return tokens_of(chars, blocks)


def last_text(body: dict[str, Any]) -> str:
    """The first 40 characters of the last message's (or input item's) text ("" if none)."""
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")
        if isinstance(messages, str):
            return messages[:40]
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, list):
        content = next((b.get("text") for b in content if isinstance(b, dict)), "")
    return content[:40] if isinstance(content, str) else ""


def positive_int(body: dict[str, Any], keys: Iterable[str], required: bool = False) -> int | None:
    """The first of ``keys`` present in ``body`` as a positive integer."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"'{key}' must be a positive integer", param=key)
        return value
    if required:
        raise bad_request("max_tokens: Field required", param="max_tokens")
    return None


def requested_model(body: dict[str, Any]) -> str:
    """The model the client asked for (echoed back), or the mock's own."""
    model = body.get("model")
    return model if isinstance(model, str) and model else MODEL_ID


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """An ``event:`` + ``data:`` SSE frame (Anthropic's and the Responses API's framing)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
