"""Anthropic's Messages API behind OpenAI's chat-completions shape.

Request translation (OpenAI chat body -> ``POST {base_url}/v1/messages``):

- ``system`` and ``developer`` messages are joined with blank lines into ``system``;
- ``user``/``assistant`` messages keep their order; consecutive messages of one role are
  merged, as Anthropic requires the roles to alternate;
- content parts: ``text`` -> text block, ``image_url`` -> image block (``data:`` URLs as
  base64, other URLs by reference); any other part type is a ``BadRequest``;
- tools: ``tools`` -> ``tools`` (``parameters`` -> ``input_schema``), ``tool_choice``
  (``auto``/``none``/``required``/named) and ``parallel_tool_calls: false`` -> ``tool_choice``,
  assistant ``tool_calls`` -> ``tool_use`` blocks, ``tool`` messages -> ``tool_result``
  blocks in a user turn;
- ``max_completion_tokens``/``max_tokens`` (default 4096), ``temperature``, ``top_p``,
  ``stop`` -> ``stop_sequences``, ``stream``, ``user`` -> ``metadata.user_id``.

Rejected with ``BadRequest`` because Anthropic cannot honour them: ``n`` > 1, ``logprobs``,
``top_logprobs``, ``logit_bias``, ``audio``, a ``response_format`` other than text, the
legacy ``function`` role. Other OpenAI-only knobs (penalties, ``seed``, ...) are ignored.

Answers come back as ``chat.completion`` objects or ``chat.completion.chunk`` SSE frames;
thinking blocks are not forwarded. An Anthropic stream that ends without ``message_stop``
gets no ``[DONE]``: ``finished`` stays False and the caller decides.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import orjson

from router.config import Provider
from router.errors import BadRequest, UpstreamProtocolError
from router.upstream.providers import _common
from router.upstream.providers.base import RateLimitInfo, Translated, UpstreamRequest, Usage

DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_NO_EMBEDDINGS = "anthropic providers do not serve embeddings"
# orjson reads JSON nested up to 1024 deep but writes only up to 254: a value passed on (a
# tool's input, even the model's name) nested deeper cannot be written back out.
_TOO_DEEP = "provider answered with JSON nested too deep to pass on"

_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("n", lambda v: v is not None and v != 1, "n > 1 (several choices)"),
    ("logprobs", bool, "logprobs"),
    ("top_logprobs", lambda v: v is not None, "top_logprobs"),
    ("logit_bias", bool, "logit_bias"),
    ("audio", lambda v: v is not None, "audio output"),
    (
        "response_format",
        lambda v: isinstance(v, dict) and v.get("type") not in (None, "text"),
        "response_format other than text",
    ),
)


class AnthropicAdapter:
    """Translates OpenAI chat requests to Anthropic's Messages API and back."""

    kind: ClassVar[str] = "anthropic"
    supports_embeddings: ClassVar[bool] = False
    probe_path: ClassVar[str] = "/v1/models"
    default_max_tokens: ClassVar[int] = DEFAULT_MAX_TOKENS
    """Anthropic requires a budget: a body without one is sent with this (or the route's)."""

    def headers(self, provider: Provider) -> dict[str, str]:
        """``anthropic-version``, and ``x-api-key`` when the provider has a key."""
        headers = {"anthropic-version": provider.anthropic_version}
        key = _common.api_key(provider)
        if key is not None:
            headers["x-api-key"] = key
        return headers

    def chat_request(
        self, provider: Provider, model: str, body: dict[str, Any], max_tokens: int | None = None
    ) -> UpstreamRequest:
        """A ``/v1/messages`` request equivalent to the OpenAI chat ``body``."""
        headers = {"content-type": "application/json", **self.headers(provider)}
        request = translate_request(model, body, max_tokens or DEFAULT_MAX_TOKENS)
        payload = _common.dump_json(request)
        return UpstreamRequest(_common.api_url(provider, "/v1/messages"), headers, payload)

    def embeddings_request(
        self, provider: Provider, model: str, body: dict[str, Any]
    ) -> UpstreamRequest:
        """Never: Anthropic has no embeddings endpoint."""
        raise UpstreamProtocolError(_NO_EMBEDDINGS)

    def chat_response(self, payload: bytes) -> Translated:
        """An Anthropic message as an OpenAI ``chat.completion``."""
        message = _common.load_json(payload)
        if not isinstance(message.get("content"), list):
            raise UpstreamProtocolError("provider answered with an unexpected shape: no content")
        usage = _usage(message.get("usage"))
        try:
            body = orjson.dumps(translate_message(message, usage, int(time.time())))
        except orjson.JSONEncodeError:
            raise UpstreamProtocolError(_TOO_DEEP) from None
        return Translated(body=body, usage=usage)

    def embeddings_response(self, payload: bytes) -> Translated:
        """Never: Anthropic has no embeddings endpoint."""
        raise UpstreamProtocolError(_NO_EMBEDDINGS)

    def stream(
        self, include_usage: bool, max_event_bytes: int = _common.MAX_EVENT_BYTES
    ) -> AnthropicStream:
        """A translator from Anthropic's SSE events to OpenAI chunks."""
        return AnthropicStream(include_usage, max_event_bytes)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitInfo:
        """Anthropic's ``retry-after`` and ``anthropic-ratelimit-*`` headers."""
        now = time.time()
        prefix = "anthropic-ratelimit-"
        tokens = [f"{prefix}{k}tokens-remaining" for k in ("", "input-", "output-")]
        return RateLimitInfo(
            retry_after_s=_common.parse_retry_after(headers.get("retry-after"), now),
            remaining_requests=_common.parse_int(headers.get(f"{prefix}requests-remaining")),
            # The tightest of the token budgets is the one that will refuse us first.
            remaining_tokens=_min(_common.parse_int(headers.get(name)) for name in tokens),
            reset_requests_s=_common.parse_timestamp(headers.get(f"{prefix}requests-reset"), now),
            reset_tokens_s=_common.parse_timestamp(headers.get(f"{prefix}tokens-reset"), now),
        )

    def error_message(self, payload: bytes) -> str:
        """``error.message`` of an Anthropic error body, else the body's text; capped."""
        return _common.error_message(payload)


def _min(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


# --- request ---------------------------------------------------------------------------


def translate_request(
    model: str, body: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat body; raises ``BadRequest``.
    ``default_max_tokens`` is sent when the body names no budget (the one reserved for it)."""
    for name, unsupported, what in _UNSUPPORTED:
        if unsupported(body.get(name)):
            raise BadRequest(f"anthropic providers do not support {what}", name)
    system, messages = _messages(body.get("messages"))
    budget = _max_tokens(body) or default_max_tokens
    out: dict[str, Any] = {"model": model, "max_tokens": budget, "messages": messages}
    if system:
        out["system"] = system
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("user") is not None:
        out["metadata"] = {"user_id": body["user"]}
    _tools(body, out)
    return out


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(f"{name} must be a positive integer", name)
        return value
    return None


def _messages(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """The joined system text and the alternating user/assistant turns."""
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list", "messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        if message.get("role") in ("system", "developer"):
            system.append(_system_text(message.get("content"), i))
            continue
        role, content = _turn(message, i)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _blocks(turns[-1]["content"]) + _blocks(content)
        else:
            turns.append({"role": role, "content": content})
    if not turns:
        raise BadRequest("messages must hold at least one user or assistant message", "messages")
    return "\n\n".join(system), turns


def _system_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        return "\n\n".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}]: system content must be text", "messages")


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _turn(message: dict[str, Any], i: int) -> tuple[str, str | list[dict[str, Any]]]:
    """The Anthropic role and content of one non-system OpenAI message."""
    role = message.get("role")
    if role == "user":
        return "user", _content(message.get("content"), i)
    if role == "assistant":
        return "assistant", _assistant_content(message, i)
    if role == "tool":
        return "user", [_tool_result(message, i)]
    raise BadRequest(f"messages[{i}]: role {role!r} is not supported here", "messages")


def _content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return [_part(part, i) for part in content]
    raise BadRequest(f"messages[{i}].content must be a string or a list of parts", "messages")


def _part(part: Any, i: int) -> dict[str, Any]:
    if _is_text_part(part):
        return {"type": "text", "text": part["text"]}
    if isinstance(part, dict) and part.get("type") == "image_url":
        return _image(part.get("image_url"), i)
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise BadRequest(f"messages[{i}]: content part {kind!r} is not supported here", "messages")


def _image(spec: Any, i: int) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise BadRequest(f"messages[{i}]: image_url needs a url", "messages")
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, comma, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding != "base64" or not media_type:
        raise BadRequest(f"messages[{i}]: data URLs must be data:<type>;base64,...", "messages")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_content(message: dict[str, Any], i: int) -> str | list[dict[str, Any]]:
    content = message.get("content")
    calls = message.get("tool_calls")
    if not calls:
        return _content(content, i)
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls must be a list", "messages")
    blocks = _blocks(_content(content, i)) if content else []
    return blocks + [_tool_use(call, i) for call in calls]


def _tool_use(call: Any, i: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls: each needs a function name", "messages")
    try:
        arguments = orjson.loads(fn.get("arguments") or "{}")
    except (orjson.JSONDecodeError, TypeError):
        arguments = None
    if not isinstance(arguments, dict):
        raise BadRequest(f"messages[{i}].tool_calls: arguments must be a JSON object", "messages")
    return {"type": "tool_use", "id": call.get("id"), "name": fn["name"], "input": arguments}


def _tool_result(message: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise BadRequest(f"messages[{i}]: a tool message needs tool_call_id", "messages")
    content = message.get("content")
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        content = [{"type": "text", "text": p["text"]} for p in content]
    elif not isinstance(content, str):
        raise BadRequest(f"messages[{i}]: tool content must be text", "messages")
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not tools:
        return  # a tool_choice without tools means nothing to Anthropic (it would refuse it)
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", "tools")
    out["tools"] = [_tool(tool) for tool in tools]
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False:
        choice = {"type": "auto", **(choice or {}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _tool(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest("only function tools with a name are supported here", "tools")
    out: dict[str, Any] = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    named = {"auto": "auto", "none": "none", "required": "any"}
    if isinstance(choice, str) and choice in named:
        return {"type": named[choice]}
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise BadRequest("tool_choice must be auto, none, required or a named function", "tool_choice")


# --- response --------------------------------------------------------------------------


def _prompt_tokens(usage: dict[str, Any]) -> int:
    """Input tokens; cached ones still count as prompt tokens (and against TPM)."""
    return sum(
        _common.as_int(usage.get(name))
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def _usage(usage: Any) -> Usage | None:
    """An Anthropic ``usage`` object in our terms."""
    if not isinstance(usage, dict):
        return None
    return Usage(_prompt_tokens(usage), _common.as_int(usage.get("output_tokens")))


def _usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def translate_message(message: dict[str, Any], usage: Usage | None, created: int) -> dict[str, Any]:
    """An Anthropic message (``content`` is a list) as an OpenAI ``chat.completion``."""
    blocks = [b for b in message["content"] if isinstance(b, dict)]
    texts = [
        b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)
    ]
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        reply["tool_calls"] = calls
        if not texts:
            reply["content"] = None  # as OpenAI answers a pure tool call
    out: dict[str, Any] = {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": _finish_reason(message.get("stop_reason")) or "stop",
            }
        ],
    }
    if usage is not None:
        out["usage"] = _usage_json(usage)
    return out


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": _arguments(block.get("input"))},
    }


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


# --- stream ----------------------------------------------------------------------------


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


_DONE_FRAME = b"data: [DONE]\n\n"


class AnthropicStream(_common.EventTranslator):
    """Translates Anthropic's SSE events into OpenAI ``chat.completion.chunk`` frames."""

    def __init__(self, include_usage: bool, max_event_bytes: int = _common.MAX_EVENT_BYTES) -> None:
        self._include_usage = include_usage
        super().__init__(max_event_bytes)
        # Replaced by the message id at message_start; a fallback keeps frames well-formed.
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._model: Any = None
        self._created = int(time.time())
        self._tool_calls = 0
        self._prompt_tokens = 0

    def _event(self, event: bytes) -> bytes:
        name, data = _common.sse_fields(event)
        if data is None:
            return b""  # a comment or keep-alive
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("provider streamed invalid JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError("provider streamed an unexpected shape")
        kind = obj.get("type")
        if not isinstance(kind, str) or not kind:  # a list here would not even hash
            kind = (name or b"").decode(errors="replace")
        handler = _HANDLERS.get(kind)
        if handler is None:
            return b""
        try:
            return handler(self, obj)
        except orjson.JSONEncodeError:
            raise UpstreamProtocolError(_TOO_DEEP) from None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self._include_usage:
            chunk["usage"] = None  # as OpenAI does: only the final chunk carries usage
        return _frame(chunk)

    def _on_message_start(self, obj: dict[str, Any]) -> bytes:
        message = obj.get("message")
        message = message if isinstance(message, dict) else {}
        if message.get("id"):
            self._id = f"chatcmpl-{message['id']}"
        self._model = message.get("model")
        self.usage = _usage(message.get("usage"))
        if self.usage is not None:
            self._prompt_tokens = self.usage.prompt_tokens
        return self._chunk({"role": "assistant", "content": ""})

    def _on_block_start(self, obj: dict[str, Any]) -> bytes:
        block = obj.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "text" and block.get("text"):
            return self._text(block["text"])
        if block.get("type") != "tool_use":
            return b""
        call = {
            "index": self._tool_calls,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        self._tool_calls += 1
        return self._chunk({"tool_calls": [call]})

    def _on_block_delta(self, obj: dict[str, Any]) -> bytes:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return b""
        if delta.get("type") == "text_delta" and delta.get("text"):
            return self._text(delta["text"])
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            call = {"index": self._tool_calls - 1, "function": {"arguments": delta["partial_json"]}}
            return self._chunk({"tool_calls": [call]})
        return b""  # thinking and signature deltas are not forwarded

    def _text(self, text: str) -> bytes:
        self.content_chunks += 1
        return self._chunk({"content": text})

    def _on_message_delta(self, obj: dict[str, Any]) -> bytes:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # Output tokens here are cumulative. Newer API versions repeat the input tokens;
            # older ones send only output, so the prompt count from message_start stands.
            if usage.get("input_tokens") is not None:
                self._prompt_tokens = _prompt_tokens(usage)
            self.usage = Usage(self._prompt_tokens, _common.as_int(usage.get("output_tokens")))
        delta = obj.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        return self._chunk({}, _finish_reason(stop_reason) or "stop")

    def _on_message_stop(self, obj: dict[str, Any]) -> bytes:
        self.finished = True
        if not self._include_usage:
            return _DONE_FRAME
        usage = self.usage or Usage(0, 0)
        final = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": _usage_json(usage),
        }
        return _frame(final) + _DONE_FRAME

    def _on_error(self, obj: dict[str, Any]) -> bytes:
        error = obj.get("error")
        error = error if isinstance(error, dict) else {}
        kind = _text_or(error.get("type"), "api_error")
        message = _common.clean_message(_text_or(error.get("message"), kind))
        return _frame({"error": {"message": message, "type": kind, "code": kind}})


def _text_or(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


_Handler = Callable[[AnthropicStream, dict[str, Any]], bytes]
_HANDLERS: dict[str, _Handler] = {
    "message_start": AnthropicStream._on_message_start,
    "content_block_start": AnthropicStream._on_block_start,
    "content_block_delta": AnthropicStream._on_block_delta,
    "message_delta": AnthropicStream._on_message_delta,
    "message_stop": AnthropicStream._on_message_stop,
    "error": AnthropicStream._on_error,
}
"""Anthropic event types we act on; others (ping, content_block_stop) produce nothing."""
