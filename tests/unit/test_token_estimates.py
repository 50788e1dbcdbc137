"""router/tokens.py: the token estimates that TPM reservations are made from.

The rule: ``ceil(chars / 4)`` + 4 per message + 3 priming; structured content counts by the
length of its JSON. Embeddings: ``ceil(chars / 4) + 1`` per string, one per array token.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from router.config import TpmAccounting
from router.tokens import (
    PER_MESSAGE,
    PRIMING,
    embedding_tokens,
    max_output,
    prompt_tokens,
    reservation,
)

IMAGE = {"type": "image_url", "image_url": {"url": "https://x.example/cat.png"}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CALLS = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


def json_len(value: Any) -> int:
    return len(orjson.dumps(value))


def ceil4(chars: int) -> int:
    return -(-chars // 4)


def test_constants_are_the_documented_ones() -> None:
    assert (PER_MESSAGE, PRIMING) == (4, 3)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({}, 3, id="no-messages"),
        pytest.param({"messages": []}, 3, id="empty-messages"),
        pytest.param({"messages": None}, 3, id="null-messages"),
        pytest.param({"messages": [{"role": "user", "content": ""}]}, 0 + 4 + 3, id="empty-str"),
        pytest.param({"messages": [{"role": "user", "content": "a"}]}, 1 + 4 + 3, id="1-char"),
        pytest.param({"messages": [{"role": "user", "content": "abcd"}]}, 1 + 4 + 3, id="4-chars"),
        pytest.param({"messages": [{"role": "user", "content": "abcde"}]}, 2 + 4 + 3, id="5-chars"),
        pytest.param(
            {"messages": [{"role": "user", "content": "é" * 8}]}, 2 + 4 + 3, id="chars-not-bytes"
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "abc"},
                    {"role": "user", "content": "defgh"},
                ]
            },
            ceil4(8) + 2 * 4 + 3,
            id="chars-summed-before-rounding",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": None}]}, 0 + 4 + 3, id="null-content"
        ),
        pytest.param({"messages": [{"role": "user"}]}, 0 + 4 + 3, id="no-content"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]},
            2 + 4 + 3,
            id="text-part-counts-its-text",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"}, IMAGE]}]},
            ceil4(2 + json_len(IMAGE)) + 4 + 3,
            id="other-part-counts-its-json",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "abcd"}], "tools": TOOLS},
            ceil4(4 + json_len(TOOLS)) + 4 + 3,
            id="tools",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "abcd"}], "tools": []},
            1 + 4 + 3,
            id="empty-tools",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": None, "tool_calls": CALLS}]},
            ceil4(json_len(CALLS)) + 4 + 3,
            id="tool-calls",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": {"odd": True}}]},
            ceil4(json_len({"odd": True})) + 4 + 3,
            id="structured-content",
        ),
        pytest.param({"messages": ["not a dict"]}, 0 + 4 + 3, id="non-dict-message"),
    ],
)
def test_prompt_tokens(body: dict[str, Any], expected: int) -> None:
    assert prompt_tokens(body) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("", 1, id="empty-str"),
        pytest.param("abcd", 2, id="str"),
        pytest.param("abcde", 3, id="str-rounds-up"),
        pytest.param(["abcd", "abcde", ""], 2 + 3 + 1, id="list-of-str"),
        pytest.param([101, 102, 103], 3, id="token-array"),
        pytest.param([[1, 2], [3]], 3, id="token-arrays"),
        pytest.param([[1, 2], "abcd"], 2 + 2, id="mixed"),
        pytest.param([], 0, id="empty-list"),
        pytest.param(None, 1, id="null"),
        pytest.param(42, 1, id="number"),
    ],
)
def test_embedding_tokens(value: Any, expected: int) -> None:
    assert embedding_tokens({"input": value}) == expected


def test_embedding_tokens_without_input_is_one() -> None:
    assert embedding_tokens({}) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({}, 1024, id="default"),
        pytest.param({"max_tokens": 50}, 50, id="max-tokens"),
        pytest.param({"max_completion_tokens": 70}, 70, id="max-completion-tokens"),
        pytest.param({"max_completion_tokens": 70, "max_tokens": 50}, 70, id="completion-wins"),
        pytest.param({"max_completion_tokens": 0, "max_tokens": 50}, 50, id="zero-falls-through"),
        pytest.param({"max_completion_tokens": -1, "max_tokens": 50}, 50, id="negative-ignored"),
        pytest.param({"max_completion_tokens": True, "max_tokens": 50}, 50, id="bool-ignored"),
        pytest.param({"max_tokens": True}, 1024, id="bool-true"),
        pytest.param({"max_tokens": False}, 1024, id="bool-false"),
        pytest.param({"max_tokens": -5}, 1024, id="negative"),
        pytest.param({"max_tokens": 0}, 1024, id="zero"),
        pytest.param({"max_tokens": "50"}, 1024, id="string"),
        pytest.param({"max_tokens": 50.0}, 1024, id="float"),
        pytest.param({"max_tokens": None}, 1024, id="null"),
    ],
)
def test_max_output(body: dict[str, Any], expected: int) -> None:
    assert max_output(body, 1024) == expected


@pytest.mark.parametrize(
    ("prompt", "max_out", "reserved", "actual"),
    [
        (10, 100, 100, 110),
        (500, 100, 500, 600),
        (100, 100, 100, 200),
        (0, 0, 0, 0),
        (7, 0, 7, 7),
    ],
)
def test_reservation(prompt: int, max_out: int, reserved: int, actual: int) -> None:
    assert reservation(prompt, max_out, TpmAccounting.RESERVED) == reserved
    assert reservation(prompt, max_out, TpmAccounting.ACTUAL) == actual


@pytest.mark.parametrize(("prompt", "max_out"), [(1, 1), (3, 900), (900, 3), (1234, 1234)])
def test_actual_reservation_is_never_below_reserved(prompt: int, max_out: int) -> None:
    assert reservation(prompt, max_out, TpmAccounting.ACTUAL) >= reservation(
        prompt, max_out, TpmAccounting.RESERVED
    )
