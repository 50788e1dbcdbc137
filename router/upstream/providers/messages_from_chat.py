"""OpenAI chat answers as Messages API answers: a ``chat.completion`` as a ``message``.

The message:

- ``id``: ``msg_`` and the chat id without its ``chatcmpl-`` prefix (a new uuid when the
  provider gave none usable); ``model``: the name the client asked for;
- ``content``: one ``text`` block when there is text (or a refusal), then a ``tool_use``
  block per tool call (its id kept; ``input``: the parsed ``arguments``). Arguments that are
  not a JSON object (a model's slip, or cut short at ``max_tokens``) are wrapped as
  ``{"_raw_arguments": "<text>"}`` rather than failing the answer: the client's tool
  validation then tells the model, which can retry; failing over would blame the provider
  for its model's output. Empty arguments are ``{}``. Reasoning text some servers add
  (``reasoning_content``) is dropped: it has no signature to be a thinking block;
- ``stop_reason``: stop -> end_turn, length -> max_tokens, tool_calls/function_call ->
  tool_use (also for a plain stop when tools were called: some servers say stop),
  content_filter -> refusal; ``stop_sequence`` is null (OpenAI does not say which);
- ``usage``: ``input_tokens`` the prompt tokens not read from cache, ``cache_read_input_tokens``
  the cached ones (OpenAI counts them inside ``prompt_tokens``; Anthropic apart),
  ``cache_creation_input_tokens`` 0, ``output_tokens``.

The stream is translated by ``messages_chat_stream`` with the same rules.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from router.errors import UpstreamProtocolError
from router.upstream.providers import _common
from router.upstream.providers.base import Translated, Usage

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
RAW_ARGUMENTS = "_raw_arguments"

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TOO_DEEP = "provider answered with JSON nested too deep to pass on"


def message_id(chat_id: Any) -> str:
    """``msg_`` and the provider's id (``chatcmpl-`` dropped) when it is a plain token."""
    if isinstance(chat_id, str):
        tail = chat_id.removeprefix("chatcmpl-")
        if _ID.fullmatch(tail):
            return f"msg_{tail}"
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(finish_reason: Any, called_tools: bool) -> str:
    """The Anthropic ``stop_reason`` of an OpenAI ``finish_reason``."""
    reason = STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else None
    if called_tools and reason in (None, "end_turn"):
        return "tool_use"
    return reason or "end_turn"


def usage_json(obj: dict[str, Any]) -> tuple[Usage | None, dict[str, int]]:
    """Our usage and the Anthropic ``usage`` object for an OpenAI object's ``usage``."""
    usage = _common.openai_usage(obj)
    if usage is None:
        return None, _anthropic_usage(0, 0, 0)
    details = obj["usage"].get("prompt_tokens_details")
    cached = _common.as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached, usage.prompt_tokens)
    return usage, _anthropic_usage(usage.prompt_tokens - cached, usage.completion_tokens, cached)


def _anthropic_usage(fresh: int, output: int, cached: int) -> dict[str, int]:
    return {
        "input_tokens": fresh,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's ``arguments`` as a ``tool_use`` block's ``input`` (see the docstring)."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {RAW_ARGUMENTS: arguments}


def from_chat_response(payload: bytes, model: str) -> Translated:
    """An OpenAI ``chat.completion`` as an Anthropic ``message`` named ``model``."""
    obj = _common.load_json(payload)
    choice, reply = _first_choice(obj)
    calls = [_tool_use(call) for call in _calls(reply)]
    usage, usage_obj = usage_json(obj)
    message = {
        "id": message_id(obj.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _text_block(reply) + calls,
        "stop_reason": stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": usage_obj,
    }
    try:
        return Translated(body=orjson.dumps(message), usage=usage)
    except orjson.JSONEncodeError:
        raise UpstreamProtocolError(_TOO_DEEP) from None


def _first_choice(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first choice and its message; ``UpstreamProtocolError`` if there is none."""
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    reply = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(reply, dict):
        raise UpstreamProtocolError("provider answered with an unexpected shape: no message")
    return choice, reply


def _text_block(reply: dict[str, Any]) -> list[dict[str, Any]]:
    text = reply.get("content")
    if isinstance(text, list):  # some servers answer with text parts
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if not text and isinstance(reply.get("refusal"), str):
        text = reply["refusal"]
    return [{"type": "text", "text": text}] if isinstance(text, str) and text else []


def _calls(reply: dict[str, Any]) -> list[dict[str, Any]]:
    calls = reply.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise UpstreamProtocolError("provider answered with a tool call without a name")
    call_id = call.get("id")
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) and call_id else f"toolu_{uuid.uuid4().hex}",
        "name": name,
        "input": tool_input(fn.get("arguments")),
    }
