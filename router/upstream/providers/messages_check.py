"""Validation of an inbound Anthropic Messages body: what Anthropic itself would refuse.

The body is checked by hand rather than with pydantic: the blocks are a wide union that
grows with each API version (documents, search results, server tool results...), and only
the shapes we read or translate need checking; the rest passes through to anthropic-kind
providers untouched. A mistake is a ``BadRequest`` whose ``param`` is the path Anthropic's
own errors use (``messages.2.content.0.text``).

Bounds (each far beyond a real conversation; they keep a hostile body's cost linear and
small before anything is routed):

- ``MAX_MESSAGES`` messages (10,000);
- ``MAX_BLOCKS`` content blocks in one message, or in one ``tool_result`` (1,000: a turn
  answering many parallel tool calls, each result a block, stays well inside);
- ``MAX_SYSTEM_BLOCKS`` text blocks in ``system`` (1,000);
- ``MAX_TOOLS`` tools (1,000);
- ``max_tokens`` at most ``MAX_OUTPUT_TOKENS`` (the chat endpoint's bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.errors import BadRequest

MAX_OUTPUT_TOKENS = 1_000_000
"""As the chat endpoint's (``router.api.schemas``, a layer above: not imported)."""
MAX_MESSAGES = 10_000
MAX_BLOCKS = 1_000
MAX_SYSTEM_BLOCKS = 1_000
MAX_TOOLS = 1_000
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """What the dispatcher needs to know of a checked Messages body."""

    model: str
    stream: bool
    max_tokens: int
    server_tools: tuple[str, ...]
    """The ``type`` of each server tool (``web_search_20250305``, ...): only anthropic-kind
    targets can serve a request that has any."""


def check_messages(data: Any) -> MessagesRequest:
    """The summary of a valid ``POST /v1/messages`` body; ``BadRequest`` otherwise."""
    body = _object(data)
    model = _check_common(body)
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = 0  # reported as out of range below
    if not 1 <= max_tokens <= MAX_OUTPUT_TOKENS:
        raise _bad("max_tokens", f"must be an integer from 1 to {MAX_OUTPUT_TOKENS}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    return MessagesRequest(model, stream is True, max_tokens, _server_tools(body))


def check_count_tokens(data: Any) -> str:
    """The model of a valid ``POST /v1/messages/count_tokens`` body (no ``max_tokens``)."""
    return _check_common(_object(data))


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _check_common(body: dict[str, Any]) -> str:
    """Check what both endpoints share; return the model."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must be a non-empty string")
    _check_messages(body.get("messages"))
    _check_system(body.get("system"))
    _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"))
    _check_sampling(body)
    return model


def _bad(param: str, message: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(where, "must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{where}.role", "must be 'user' or 'assistant'")
        _check_content(message.get("content"), f"{where}.content")


def _check_content(content: Any, where: str, in_result: bool = False) -> None:
    """A message's content, or (``in_result``) a ``tool_result``'s, which holds no tool
    blocks: so this recurses once at most, however deep a hostile body nests them."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content blocks")
    if len(content) > MAX_BLOCKS:
        raise _bad(where, f"at most {MAX_BLOCKS} content blocks")
    for j, block in enumerate(content):
        _check_block(block, f"{where}.{j}", in_result)


def _check_block(block: Any, where: str, in_result: bool) -> None:
    """A block's ``type``, and the fields of the types we read; other types pass as they are."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise _bad(where, "must be an object with a string 'type'")
    kind = block["type"]
    if in_result and kind in ("tool_use", "tool_result"):
        raise _bad(f"{where}.type", f"a tool_result cannot hold a {kind} block")
    if kind == "text":
        _need_str(block, "text", where)
    elif kind == "image":
        _check_image(block.get("source"), f"{where}.source")
    elif kind == "tool_use":
        _need_str(block, "id", where)
        _need_str(block, "name", where)
        if not isinstance(block.get("input"), dict):
            raise _bad(f"{where}.input", "must be an object")
    elif kind == "tool_result":
        _need_str(block, "tool_use_id", where)
        content = block.get("content")
        if content is not None:
            _check_content(content, f"{where}.content", in_result=True)


def _need_str(obj: dict[str, Any], name: str, where: str) -> None:
    if not isinstance(obj.get(name), str):
        raise _bad(f"{where}.{name}", "must be a string")


def _check_image(source: Any, where: str) -> None:
    if not isinstance(source, dict):
        raise _bad(where, "must be an object")
    kind = source.get("type")
    if kind == "base64":
        _need_str(source, "media_type", where)
        _need_str(source, "data", where)
    elif kind == "url":
        _need_str(source, "url", where)
    elif not isinstance(kind, str):
        raise _bad(f"{where}.type", "must be a string")


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _bad("system", "must be a string or a list of text blocks")
    if len(system) > MAX_SYSTEM_BLOCKS:
        raise _bad("system", f"at most {MAX_SYSTEM_BLOCKS} blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"system.{i}", "must be a text block")
        _need_str(block, "text", f"system.{i}")


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools")
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object")
        _need_str(tool, "name", where)
        if is_custom_tool(tool) and not isinstance(tool.get("input_schema"), dict):
            raise _bad(f"{where}.input_schema", "must be an object")


def is_custom_tool(tool: dict[str, Any]) -> bool:
    """A client-defined tool (the model calls it, the client runs it), not a server tool."""
    return tool.get("type") in (None, "custom")


def _server_tools(body: dict[str, Any]) -> tuple[str, ...]:
    tools = body.get("tools") or []
    return tuple(str(tool.get("type")) for tool in tools if not is_custom_tool(tool))


def _check_tool_choice(choice: Any) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
        raise _bad("tool_choice", "must be an object of type auto, any, tool or none")
    if choice["type"] == "tool":
        _need_str(choice, "name", "tool_choice")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("tool_choice.disable_parallel_tool_use", "must be a boolean")


def _check_sampling(body: dict[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise _bad(name, "must be a number from 0 to 1")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("top_k", "must be a non-negative integer")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise _bad("stop_sequences", "must be a list of strings")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not isinstance(metadata.get("user_id"), str | None)
    ):
        raise _bad("metadata", "must be an object whose user_id is a string")
