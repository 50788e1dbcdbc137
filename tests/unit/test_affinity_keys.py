"""A request's affinity key, as each source reads it: header, body field, prompt prefix."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import Affinity
from router.replica.affinity_keys import (
    CHAT,
    MAX_VALUE_BYTES,
    MESSAGES,
    RESPONSES,
    affinity_value,
    prefix_hash,
)


def value(key: str, body: dict[str, Any], headers: dict[bytes, bytes] | None = None) -> Any:
    return affinity_value(Affinity(key=key), CHAT, headers or {}, body)


def test_a_header() -> None:
    assert value("header:x-session-id", {}, {b"x-session-id": b"s-1"}) == "s-1"
    assert value("header:x-session-id", {}, {b"x-other": b"s-1"}) is None
    assert value("header:x-session-id", {}, {b"x-session-id": b""}) is None
    long = value("header:x-session-id", {}, {b"x-session-id": b"x" * 10_000})
    assert len(long) == MAX_VALUE_BYTES


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"metadata": {"user_id": "u_1"}}, "u_1"),
        ({"metadata": {"user_id": 42}}, "42"),
        ({"metadata": {"user_id": ""}}, None),
        ({"metadata": {"user_id": True}}, None),
        ({"metadata": {"user_id": {"a": 1}}}, None),
        ({"metadata": "u_1"}, None),
        ({}, None),
    ],
)
def test_a_body_field(body: dict[str, Any], expected: str | None) -> None:
    assert value("body:metadata.user_id", body) == expected


def chat(*messages: Any, tools: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(messages)}
    if tools is not None:
        body["tools"] = tools
    return body


SYSTEM = {"role": "system", "content": "You are a coding agent."}


def test_a_chat_prefix_is_the_system_the_tools_and_the_first_messages() -> None:
    first = chat(SYSTEM, {"role": "user", "content": "task A"}, {"role": "user", "content": "1"})
    later = chat(SYSTEM, {"role": "user", "content": "task A"}, {"role": "user", "content": "2"})
    other = chat(SYSTEM, {"role": "user", "content": "task B"})
    tooled = chat(SYSTEM, {"role": "user", "content": "task A"}, tools=[{"type": "function"}])
    assert prefix_hash(CHAT, first, 1) == prefix_hash(CHAT, later, 1)
    assert prefix_hash(CHAT, first, 1) != prefix_hash(CHAT, other, 1)
    assert prefix_hash(CHAT, first, 1) != prefix_hash(CHAT, tooled, 1)
    assert prefix_hash(CHAT, first, 2) != prefix_hash(CHAT, later, 2)
    assert prefix_hash(CHAT, {"messages": []}, 1) is None
    assert prefix_hash(CHAT, {"messages": "x"}, 1) is None


def test_cache_control_marks_are_not_part_of_a_messages_prefix() -> None:
    mark = {"type": "ephemeral"}

    def body(marked: bool) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": "read the repo"}
        if marked:
            block["cache_control"] = mark
        system: list[Any] = [{"type": "text", "text": "You are Claude Code."}]
        if marked:
            system[0]["cache_control"] = mark
        return {
            "system": system,
            "tools": [
                {"name": "Read", "input_schema": {}, **({"cache_control": mark} if marked else {})}
            ],
            "messages": [{"role": "user", "content": [block]}],
        }

    assert prefix_hash(MESSAGES, body(True), 1) == prefix_hash(MESSAGES, body(False), 1)
    changed = body(False)
    changed["system"] = "something else"
    assert prefix_hash(MESSAGES, changed, 1) != prefix_hash(MESSAGES, body(False), 1)


def test_a_responses_prefix_is_the_instructions_the_tools_and_the_first_items() -> None:
    a = {"instructions": "be brief", "input": "task A"}
    b = {"instructions": "be brief", "input": [{"role": "user", "content": "task A"}, {"x": 1}]}
    assert prefix_hash(RESPONSES, a, 1) != prefix_hash(RESPONSES, b, 1)
    b2 = {"instructions": "be brief", "input": [{"role": "user", "content": "task A"}, {"x": 2}]}
    assert prefix_hash(RESPONSES, b, 1) == prefix_hash(RESPONSES, b2, 1)
    assert prefix_hash(RESPONSES, {}, 1) is None


def test_a_prefix_nested_deeper_than_json_can_be_written_is_not_pinned() -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    assert prefix_hash(CHAT, chat({"role": "user", "content": deep}), 1) is None
