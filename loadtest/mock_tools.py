"""The mock's tool-use rule, one reading per API, so tool calls are deterministic.

A request offering tools gets ONE call to the tool its ``tool_choice`` names, or else to the
first tool, unless the choice is "none" or the conversation ends with a tool's result (then
the model has what it asked for and answers in text). The arguments hold one key per required
property of the tool's JSON schema (the first property when none is required), each "mock":
enough for a client to parse and route on, without pretending to understand the schema.
"""

from __future__ import annotations

from typing import Any

import orjson

from loadtest.mock_calls import ToolCall, bad_request

TOOL_VALUE = "mock"


def schema_arguments(schema: Any) -> str:
    """The mock arguments (JSON text) for a tool whose parameters are ``schema``."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or not props:
        return "{}"
    required = schema.get("required") if isinstance(schema, dict) else None
    names = [name for name in props if isinstance(required, list) and name in required]
    return orjson.dumps(dict.fromkeys(names or [next(iter(props))], TOOL_VALUE)).decode()


def pick(schemas: dict[str, Any], named: str | None, param: str) -> ToolCall | None:
    """The call to ``named`` (or the first tool); a 400 when no tool has that name."""
    if named is None:
        if not schemas:
            return None
        named = next(iter(schemas))
    elif named not in schemas:
        raise bad_request(
            f"Invalid value for '{param}': no tool named '{named}' in 'tools'.", param
        )
    return ToolCall(named, schema_arguments(schemas[named]))


def tool_list(body: dict[str, Any]) -> list[Any]:
    """The request's ``tools`` array (400 when it is not one)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        raise bad_request("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    return tools


def chat_tool(body: dict[str, Any], messages: list[Any]) -> ToolCall | None:
    """Chat completions: tools [{"type": "function", "function": {"name", "parameters"}}]."""
    if not body.get("tools"):
        return None
    schemas: dict[str, Any] = {}
    for tool in tool_list(body):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            schemas.setdefault(function["name"], function.get("parameters"))
    choice = body.get("tool_choice", "auto")
    last = messages[-1]
    if choice == "none" or (isinstance(last, dict) and last.get("role") == "tool"):
        return None
    named = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
    return pick(schemas, named, "tool_choice")


def answered_tool(message: Any) -> bool:
    """True when an Anthropic message carries a ``tool_result`` block."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def messages_tool(body: dict[str, Any], messages: list[Any]) -> ToolCall | None:
    """Anthropic Messages: tools [{"name", "input_schema"}]; server tools (typed) are skipped."""
    if not body.get("tools"):
        return None
    schemas: dict[str, Any] = {}
    for tool in tool_list(body):
        client_tool = isinstance(tool, dict) and isinstance(tool.get("name"), str)
        if client_tool and tool.get("type") in (None, "custom"):
            schemas.setdefault(tool["name"], tool.get("input_schema"))
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else "auto"
    if kind == "none" or answered_tool(messages[-1]):
        return None
    named = choice.get("name") if isinstance(choice, dict) and kind == "tool" else None
    return pick(schemas, named if isinstance(named, str) else None, "tool_choice.name")


def responses_tool(body: dict[str, Any], items: list[Any]) -> ToolCall | None:
    """Responses API: tools [{"type": "function", "name", "parameters"}]."""
    if not body.get("tools"):
        return None
    schemas: dict[str, Any] = {}
    for index, tool in enumerate(tool_list(body)):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        if not isinstance(tool.get("name"), str):
            raise bad_request(
                f"Missing required parameter: 'tools[{index}].name'.",
                f"tools[{index}].name",
                "missing_required_parameter",
            )
        schemas.setdefault(tool["name"], tool.get("parameters"))
    choice = body.get("tool_choice", "auto")
    last = items[-1] if items else None
    if choice == "none" or (isinstance(last, dict) and last.get("type") == "function_call_output"):
        return None
    named = (
        choice.get("name")
        if isinstance(choice, dict) and choice.get("type") == "function"
        else None
    )
    return pick(schemas, named if isinstance(named, str) else None, "tool_choice")
