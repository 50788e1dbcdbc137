"""A Messages API body as an OpenAI chat-completions body, for openai-kind targets.

The body was checked by ``messages_check`` first; what cannot be translated is a
``BadRequest`` naming it. Choices, field by field:

- ``system`` (a string, or text blocks joined with blank lines; ``cache_control`` dropped)
  -> one leading ``system`` message;
- ``user``/``assistant`` messages keep their order (OpenAI needs no alternation);
- user content: ``text`` blocks -> text parts (a plain string when the turn is one text
  block), ``image`` blocks -> ``image_url`` parts (base64 as a ``data:`` URL, ``url`` as is;
  other sources, e.g. the Files API's ``file``, are refused);
- user ``tool_result`` blocks -> ``tool`` messages placed before the turn's other content
  (OpenAI wants them right after the assistant's call): their text blocks joined with blank
  lines, ``is_error`` -> prefixed ``Error: ``; images in a result (Claude Code reads image
  files this way) cannot be in a ``tool`` message, so they follow in a user message;
- assistant content: ``text`` blocks joined with blank lines -> ``content``; ``tool_use`` ->
  ``tool_calls`` (``arguments``: the JSON of ``input``); ``thinking`` and
  ``redacted_thinking`` are dropped (an OpenAI model cannot read Anthropic's signed thoughts);
- any other block type (documents, search results, server tool blocks) -> ``BadRequest``;
- ``tools``: custom tools -> functions (``input_schema`` -> ``parameters``); a server tool
  (``web_search_...``, ``bash_...``) -> ``BadRequest`` naming its type;
- ``tool_choice``: auto -> ``auto``, any -> ``required``, tool -> the named function,
  none -> ``none``; ``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``; both
  only when there are tools (OpenAI refuses them without);
- ``max_tokens`` -> ``max_tokens`` (the budget given; ``max_completion_tokens`` is
  OpenAI's newer name, but not every compatible server reads it);
- ``stop_sequences`` -> ``stop``, at most ``MAX_STOP`` (OpenAI's limit: 4);
- ``temperature``, ``top_p`` kept (Anthropic's 0..1 is inside OpenAI's 0..2); ``top_k``,
  ``thinking``, ``service_tier`` and every other Anthropic-only field dropped;
- ``metadata.user_id`` -> ``user``: kept when at most ``MAX_USER`` (64) characters, OpenAI's
  bound, else its SHA-256 in hex (64 characters: still one id per user, never cut into
  another's);
- ``stream`` -> ``stream`` with ``stream_options.include_usage`` (accounting needs usage).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from router.config import Provider
from router.errors import BadRequest
from router.upstream.providers.base import UpstreamRequest
from router.upstream.providers.messages_check import is_custom_tool
from router.upstream.providers.openai import OpenAIAdapter

MAX_STOP = 4
MAX_USER = 64
DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})

_ADAPTER = OpenAIAdapter()


def to_chat_request(
    provider: Provider, model: str, body: dict[str, Any], max_tokens: int
) -> UpstreamRequest:
    """The ``/chat/completions`` request for a checked Messages body; ``BadRequest`` if it
    uses what an OpenAI-compatible provider cannot do."""
    return _ADAPTER.chat_request(provider, model, to_chat_body(body, max_tokens))


def to_chat_body(body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The chat-completions body (without ``model``) for a checked Messages body."""
    messages = _system(body.get("system"))
    for i, message in enumerate(body["messages"]):
        where = f"messages.{i}"
        if message["role"] == "user":
            messages.extend(_user(message["content"], where))
        else:
            messages.append(_assistant(message["content"], where))
    out: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    _stop(body.get("stop_sequences"), out)
    _user_id(body.get("metadata"), out)
    _tools(body, out)
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _bad(param: str, message: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", param)


def _system(system: Any) -> list[dict[str, Any]]:
    if isinstance(system, list):
        system = "\n\n".join(block["text"] for block in system)
    return [{"role": "system", "content": system}] if system else []


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """The ``tool`` messages of a user turn's results, then its own content (if any)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "tool_result":
            out.append(_tool_result(block, f"{where}.content.{j}", result_images))
        elif kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image(block["source"], f"{where}.content.{j}"))
        else:
            raise _unsupported(kind, f"{where}.content.{j}")
    parts = result_images + parts
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _unsupported(kind: str, where: str) -> BadRequest:
    return _bad(where, f"content blocks of type {kind!r} cannot be sent to this model's provider")


def _image(source: dict[str, Any], where: str) -> dict[str, Any]:
    if source["type"] == "base64":
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source["type"] == "url":
        url = source["url"]
    else:
        raise _bad(f"{where}.source", f"image source {source['type']!r} is not supported here")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], where: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``tool`` message; the result's images are added to ``images``."""
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, inner in enumerate(content):
            if inner["type"] == "text":
                texts.append(inner["text"])
            elif inner["type"] == "image":
                images.append(_image(inner["source"], f"{where}.content.{k}"))
            else:
                raise _unsupported(inner["type"], f"{where}.content.{k}")
        text = "\n\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _assistant(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block))
        elif kind not in DROPPED_BLOCKS:
            raise _unsupported(kind, f"{where}.content.{j}")
    out: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""  # a turn of thinking only: OpenAI needs content or tool calls
    return out


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = orjson.dumps(block["input"]).decode()
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"tool_use input cannot be serialized: {exc}") from None
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


def _stop(stops: Any, out: dict[str, Any]) -> None:
    if not stops:
        return
    if len(stops) > MAX_STOP:
        raise _bad("stop_sequences", f"at most {MAX_STOP} for this model's provider")
    out["stop"] = stops


def _user_id(metadata: Any, out: dict[str, Any]) -> None:
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not user:
        return
    out["user"] = user if len(user) <= MAX_USER else hashlib.sha256(user.encode()).hexdigest()


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not tools:
        return
    out["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is None:
        return
    kinds: dict[str, Any] = {"auto": "auto", "any": "required", "none": "none"}
    if choice["type"] == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        out["tool_choice"] = kinds[choice["type"]]
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def _tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if not is_custom_tool(tool):
        raise _bad(where, f"server tool {tool['type']!r} cannot be used with this model's provider")
    fn: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}
