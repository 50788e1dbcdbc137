"""The OpenAI Responses API as the mock serves it: request checks, the response, its events.

Shapes follow the official SDK's types (``openai.types.responses``): a ``response`` object
(id ``resp_``) whose output is one ``message`` (id ``msg_``, one ``output_text`` part) or one
``function_call`` (id ``fc_``, call_id ``call_``); streamed as ``event:``/``data:`` SSE frames,
each with its ``type`` and an increasing ``sequence_number``. A follow-up naming a
``previous_response_id`` carries that response's whole context as input tokens, as the real
API bills it, so chained requests cost more and a gateway's budgets can be checked on them.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loadtest.mock_calls import (
    Call,
    Completion,
    Frame,
    bad_request,
    content_cost,
    positive_int,
    sse_event,
    tokens_of,
)
from loadtest.mock_tools import responses_tool

RESPONSES_KEPT = 10_000
"""How many stored responses a mock keeps (the latest); older ones answer 404."""
ROLES = ("assistant", "developer", "system", "user")
PART_TYPES = frozenset(
    {"input_text", "input_image", "input_file", "input_audio", "output_text", "refusal"}
)
JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string"}


def json_type(value: Any) -> str:
    """How the real API names a JSON value's type in its error messages."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return JSON_TYPES.get(type(value), "null")


def missing(param: str) -> Exception:
    """400 for a required parameter that is absent."""
    return bad_request(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def invalid_type(param: str, expected: str, value: Any) -> Exception:
    """400 for a parameter of the wrong JSON type."""
    message = (
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead."
    )
    return bad_request(message, param, "invalid_type")


def check_message(param: str, item: dict[str, Any]) -> None:
    """A message item: a known role and content as a string or a list of typed parts."""
    role = item.get("role")
    if role is None:
        raise missing(f"{param}.role")
    if role not in ROLES:
        supported = ", ".join(f"'{r}'" for r in ROLES)
        message = f"Invalid value: '{role}'. Supported values are: {supported}."
        raise bad_request(message, f"{param}.role", "invalid_value")
    content = item.get("content")
    if content is None:
        raise missing(f"{param}.content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_type(f"{param}.content", "one of a string or array", content)
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            message = f"Invalid value: '{kind}'. Supported values are: {sorted(PART_TYPES)}."
            raise bad_request(message, f"{param}.content[{index}].type", "invalid_value")


def check_item(index: int, item: Any) -> None:
    """One input item: a message, a function_call or a function_call_output (others pass)."""
    param = f"input[{index}]"
    if not isinstance(item, dict):
        raise invalid_type(param, "an object", item)
    kind = item.get("type", "message")
    if kind == "message":
        check_message(param, item)
        return
    needed = {
        "function_call": ("call_id", "name", "arguments"),
        "function_call_output": ("call_id",),
    }
    for key in needed.get(kind, ()):
        if not isinstance(item.get(key), str):
            raise missing(f"{param}.{key}")
    if kind == "function_call_output" and not isinstance(item.get("output"), str | list):
        raise missing(f"{param}.output")


def input_items(body: dict[str, Any]) -> list[Any]:
    """The request's input as a list of checked items (a string is one user message)."""
    raw = body.get("input")
    if raw is None:
        raise missing("input")
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise invalid_type("input", "one of a string or array of input items", raw)
    if not raw:
        message = "Invalid 'input': empty array. Expected an array with minimum length 1."
        raise bad_request(message, "input", "empty_array")
    for index, item in enumerate(raw):
        check_item(index, item)
    return raw


def input_tokens(items: list[Any], instructions: Any, tools: Any) -> int:
    """Estimated input tokens: instructions, message text, function calls and outputs, tools."""
    chars, blocks = content_cost(instructions)
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            item_chars, item_blocks = content_cost(item.get("content"))
        elif kind == "function_call":
            item_chars, item_blocks = len(item["name"]) + len(item["arguments"]), 1
        elif kind == "function_call_output":
            item_chars, item_blocks = content_cost(item.get("output"))
            item_blocks += 1
        else:
            item_chars, item_blocks = 0, 1
        chars += item_chars
        blocks += item_blocks
    return tokens_of(chars, blocks + (len(tools) if isinstance(tools, list) else 0))


def echo_tool(tool: Any) -> Any:
    """A tool as the response repeats it: function tools with ``strict`` (default true)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }


def echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request parameters a response object repeats, with the API's defaults."""
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise invalid_type("previous_response_id", "a string", previous)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_type("metadata", "an object", metadata)
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise invalid_type("store", "a boolean", store)
    tools = body.get("tools")
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": metadata or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": previous,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "store": store is not False,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [echo_tool(t) for t in tools] if isinstance(tools, list) else [],
        "top_p": body.get("top_p", 1.0),
        "user": body.get("user"),
    }


def parse_responses(body: dict[str, Any]) -> Call:
    """Validate a POST /v1/responses request (400s shaped and worded like the real API's)."""
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str) or not model:
        raise invalid_type("model", "a non-empty string", model)
    items = input_items(body)
    return Call(
        kind="responses",
        model=model,
        prompt_tokens=input_tokens(items, body.get("instructions"), body.get("tools")),
        stream=body.get("stream") is True,
        max_tokens=positive_int(body, ("max_output_tokens",)),
        tool=responses_tool(body, items),
        echo=echo(body),
    )


def usage(call: Call, comp: Completion) -> dict[str, Any]:
    """The response's ``usage`` (no cache, no reasoning in a mock)."""
    output = comp.output_tokens
    return {
        "input_tokens": call.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": call.prompt_tokens + output,
    }


def text_part(text: str) -> dict[str, Any]:
    """An ``output_text`` content part."""
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def output_item(call: Call, comp: Completion, status: str) -> dict[str, Any]:
    """The one output item: a function_call, or an assistant message with the text."""
    if comp.tool is not None:
        return {
            "id": f"fc_{call.rid}",
            "type": "function_call",
            "status": "completed",
            "arguments": comp.tool.arguments,
            "call_id": f"call_{comp.tool.hex}",
            "name": comp.tool.name,
        }
    return {
        "id": f"msg_{call.rid}",
        "type": "message",
        "status": status,
        "content": [text_part(comp.text)],
        "role": "assistant",
    }


def response_body(call: Call, comp: Completion | None) -> dict[str, Any]:
    """The ``response`` object; ``comp=None`` gives the in-progress one the stream opens with."""
    status = "in_progress"
    if comp is not None:
        status = "incomplete" if comp.reason == "max_tokens" else "completed"
    return {
        "id": f"resp_{call.rid}",
        "object": "response",
        "created_at": call.created,
        "status": status,
        "background": False,
        "completed_at": None if comp is None else int(time.time()),
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": call.model,
        "output": [] if comp is None else [output_item(call, comp, status)],
        "usage": None if comp is None else usage(call, comp),
        "max_tool_calls": None,
        "safety_identifier": None,
        "service_tier": "default",
        "top_logprobs": 0,
        "truncation": "disabled",
        **call.echo,
    }


def pending(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as ``response.output_item.added`` announces it: empty, in progress."""
    if item["type"] == "function_call":
        return {**item, "status": "in_progress", "arguments": ""}
    return {**item, "status": "in_progress", "content": []}


def response_frames(call: Call, comp: Completion, final: dict[str, Any]) -> Iterator[Frame]:
    """The stream's events, ending with ``response.completed`` (or ``.incomplete``)."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse_event(kind, {"type": kind, "sequence_number": next(numbers), **fields})

    shell = response_body(call, None)
    yield event("response.created", response=shell), 0
    yield event("response.in_progress", response=shell), 0
    item = final["output"][0]
    at = {"item_id": item["id"], "output_index": 0}
    yield event("response.output_item.added", output_index=0, item=pending(item)), 0
    if comp.tool is not None:
        for piece, tokens in comp.tool.paced_pieces():
            yield event("response.function_call_arguments.delta", **at, delta=piece), tokens
        arguments = comp.tool.arguments
        yield event("response.function_call_arguments.done", **at, arguments=arguments), 0
    else:
        part = {**at, "content_index": 0}
        yield event("response.content_part.added", **part, part=text_part("")), 0
        for token in comp.tokens:
            yield event("response.output_text.delta", **part, delta=token, logprobs=[]), 1
        yield event("response.output_text.done", **part, text=comp.text, logprobs=[]), 0
        yield event("response.content_part.done", **part, part=item["content"][0]), 0
    yield event("response.output_item.done", output_index=0, item=item), 0
    yield event(f"response.{final['status']}", response=final), 0


@dataclass(frozen=True)
class Stored:
    """A stored response and the input tokens a follow-up naming it inherits."""

    body: dict[str, Any]
    context_tokens: int


class ResponseStore:
    """The responses kept for GET, DELETE and previous_response_id: the latest ``limit``."""

    def __init__(self, limit: int = RESPONSES_KEPT) -> None:
        self.limit = limit
        self.items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, body: dict[str, Any]) -> None:
        """Keep a finished response, dropping the oldest beyond the bound."""
        self.items[body["id"]] = Stored(body, body["usage"]["total_tokens"])
        if len(self.items) > self.limit:
            self.items.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        """The stored response ``rid``, if kept and not deleted."""
        return self.items.get(rid)

    def delete(self, rid: str) -> bool:
        """Forget ``rid``; False when it was not stored."""
        return self.items.pop(rid, None) is not None
