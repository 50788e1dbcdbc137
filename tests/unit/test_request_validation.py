"""router/api/schemas.py: the fields we route on are checked, everything else passes through."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from router.api.schemas import (
    MAX_MESSAGES,
    MAX_OUTPUT_TOKENS,
    ChatBody,
    EmbeddingsBody,
    check,
    parse_json,
)
from router.errors import BadRequest

USER = {"role": "user", "content": "hi"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def embed(**fields: Any) -> dict[str, Any]:
    return {"model": "e", "input": "hello", **fields}


# --- parse_json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"model": "m"}', {"model": "m"}),
        (b"{}", {}),
        (b' \n{"a": [1, {"b": null}]}\n', {"a": [1, {"b": None}]}),
        ('{"text": "héllo ☃"}'.encode(), {"text": "héllo ☃"}),
    ],
)
def test_parse_json_accepts_an_object(raw: bytes, expected: dict[str, Any]) -> None:
    assert parse_json(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"[1, 2]", "the body must be a JSON object", id="array"),
        pytest.param(b'"text"', "the body must be a JSON object", id="string"),
        pytest.param(b"42", "the body must be a JSON object", id="number"),
        pytest.param(b"null", "the body must be a JSON object", id="null"),
        pytest.param(b"true", "the body must be a JSON object", id="bool"),
        pytest.param(b"", "the body is not valid JSON: ", id="empty"),
        pytest.param(b"{", "the body is not valid JSON: ", id="truncated"),
        pytest.param(b"{'a': 1}", "the body is not valid JSON: ", id="single-quotes"),
        pytest.param(b'{"a": 1,}', "the body is not valid JSON: ", id="trailing-comma"),
        pytest.param(b"\xff\xfe", "the body is not valid JSON: ", id="invalid-utf8"),
        pytest.param(b'{"a": "\xff"}', "the body is not valid JSON: ", id="invalid-utf8-in-str"),
        pytest.param(b'{"a": "\xc3"}', "the body is not valid JSON: ", id="truncated-utf8"),
    ],
)
def test_parse_json_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_json(raw)
    assert str(exc.value).startswith(message)
    assert exc.value.param is None
    assert exc.value.status == 400


# --- chat bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(chat(), id="minimal"),
        pytest.param(chat(foo=1, logit_bias={"42": 5}, top_k=40), id="unknown-extras"),
        pytest.param(
            {"model": "m", "messages": [{**USER, "name": "bob", "cache_control": {"a": 1}}]},
            id="unknown-message-fields",
        ),
        pytest.param(
            chat(messages=[{"role": r, "content": "x"} for r in ("system", "developer", "user")]),
            id="roles-1",
        ),
        pytest.param(
            chat(
                messages=[
                    {"role": "assistant", "content": None, "tool_calls": []},
                    {"role": "tool", "content": "42", "tool_call_id": "c1"},
                    {"role": "function", "content": "x", "name": "f"},
                ]
            ),
            id="roles-2",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
            id="content-parts",
        ),
        pytest.param(chat(messages=[{"role": "assistant"}]), id="no-content"),
        pytest.param(chat(max_tokens=1, max_completion_tokens=MAX_OUTPUT_TOKENS), id="bounds"),
        pytest.param(chat(max_tokens=None), id="null-max-tokens"),
        pytest.param(chat(stream=True, stream_options={"include_usage": True}), id="stream"),
        pytest.param(chat(stream_options={"include_usage": False, "x": 1}), id="stream-extra"),
        pytest.param(chat(n=128, temperature=2, top_p=0), id="sampling-bounds"),
        pytest.param(chat(temperature=0.7, top_p=0.9), id="sampling-floats"),
    ],
)
def test_valid_chat_body_passes_with_extras_kept(body: dict[str, Any]) -> None:
    parsed = check(ChatBody, body)
    assert parsed.model == body["model"]
    dumped = parsed.model_dump(exclude_unset=True)
    for name, value in body.items():
        if name != "messages":
            assert dumped[name] == value
    for sent, kept in zip(body["messages"], dumped["messages"], strict=True):
        assert kept == sent


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"messages": [USER]}, "model", id="missing-model"),
        pytest.param(chat(model=""), "model", id="empty-model"),
        pytest.param(chat(model=5), "model", id="model-not-str"),
        pytest.param({"model": "m"}, "messages", id="missing-messages"),
        pytest.param(chat(messages=[]), "messages", id="no-messages"),
        pytest.param(chat(messages="hi"), "messages", id="messages-not-list"),
        pytest.param(chat(messages={"role": "user"}), "messages", id="messages-object"),
        pytest.param(chat(messages=["hi"]), "messages[0]", id="message-not-object"),
        pytest.param(
            chat(messages=[USER, {"role": "robot", "content": "x"}]),
            "messages[1].role",
            id="bad-role",
        ),
        pytest.param(chat(messages=[{"content": "x"}]), "messages[0].role", id="missing-role"),
        pytest.param(
            chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role", id="role-int"
        ),
        pytest.param(chat(max_tokens=0), "max_tokens", id="max-tokens-zero"),
        pytest.param(chat(max_tokens=-1), "max_tokens", id="max-tokens-negative"),
        pytest.param(chat(max_tokens=MAX_OUTPUT_TOKENS + 1), "max_tokens", id="max-tokens-huge"),
        pytest.param(chat(max_tokens="5"), "max_tokens", id="max-tokens-str"),
        pytest.param(chat(max_tokens=True), "max_tokens", id="max-tokens-bool"),
        pytest.param(chat(max_tokens=5.0), "max_tokens", id="max-tokens-float"),
        pytest.param(
            chat(max_completion_tokens=0), "max_completion_tokens", id="max-completion-zero"
        ),
        pytest.param(
            chat(max_completion_tokens=False), "max_completion_tokens", id="max-completion-bool"
        ),
        pytest.param(chat(stream="yes"), "stream", id="stream-str"),
        pytest.param(chat(stream=1), "stream", id="stream-int"),
        pytest.param(chat(stream_options="usage"), "stream_options", id="stream-options-str"),
        pytest.param(
            chat(stream_options={"include_usage": "true"}),
            "stream_options.include_usage",
            id="include-usage-str",
        ),
        pytest.param(chat(n=0), "n", id="n-zero"),
        pytest.param(chat(n=129), "n", id="n-too-many"),
        pytest.param(chat(temperature=2.5), "temperature", id="temperature-high"),
        pytest.param(chat(temperature="hot"), "temperature", id="temperature-str"),
        pytest.param(chat(top_p=-0.1), "top_p", id="top-p-negative"),
    ],
)
def test_invalid_chat_body_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        check(ChatBody, body)
    assert exc.value.param == param
    assert exc.value.status == 400
    assert str(exc.value).startswith(f"invalid value for '{param}': ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (chat(max_tokens=0), "Input should be greater than or equal to 1"),
        (chat(max_tokens=MAX_OUTPUT_TOKENS + 1), "Input should be less than or equal to 1000000"),
        (chat(max_tokens=True), "Input should be a valid integer"),
        ({"model": "m"}, "Field required"),
    ],
)
def test_invalid_value_message_carries_the_reason(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check(ChatBody, body)


def test_only_the_first_problem_is_reported() -> None:
    with pytest.raises(BadRequest) as exc:
        check(ChatBody, {"model": "", "messages": [], "max_tokens": 0})
    assert exc.value.param == "model"


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        pytest.param(
            ChatBody,
            chat(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            id="content-int",
        ),
        pytest.param(
            ChatBody,
            chat(messages=[{"role": "user", "content": [1]}]),
            "messages[0].content",
            id="content-list-of-non-objects",
        ),
        pytest.param(EmbeddingsBody, embed(input=5), "input", id="input-number"),
    ],
)
def test_union_field_errors_name_the_field_itself(
    model: type[ChatBody] | type[EmbeddingsBody], body: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as exc:
        check(model, body)
    assert exc.value.param == param


@pytest.mark.parametrize("content", [5, [1], True])
def test_bad_content_is_a_400(content: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        check(ChatBody, chat(messages=[{"role": "user", "content": content}]))
    assert exc.value.param is not None
    assert exc.value.param.startswith("messages[0].content")


# --- embeddings bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(embed(), id="str"),
        pytest.param(embed(input=["a", "b"]), id="list-of-str"),
        pytest.param(embed(input=[101, 102]), id="tokens"),
        pytest.param(embed(input=[[1, 2], [3]]), id="token-lists"),
        pytest.param(embed(dimensions=256, encoding_format="float", user="u"), id="extras"),
    ],
)
def test_valid_embeddings_body_passes_with_extras_kept(body: dict[str, Any]) -> None:
    parsed = check(EmbeddingsBody, body)
    assert parsed.model_dump(exclude_unset=True) == body


@pytest.mark.parametrize(
    ("body", "param_prefix"),
    [
        pytest.param({"input": "x"}, "model", id="missing-model"),
        pytest.param(embed(model=""), "model", id="empty-model"),
        pytest.param({"model": "e"}, "input", id="missing-input"),
        pytest.param(embed(input=None), "input", id="null-input"),
        pytest.param(embed(input=5), "input", id="number"),
        pytest.param(embed(input=["a", 1]), "input", id="mixed-list"),
        pytest.param(embed(input={"text": "a"}), "input", id="object"),
    ],
)
def test_invalid_embeddings_body_is_a_400(body: dict[str, Any], param_prefix: str) -> None:
    with pytest.raises(BadRequest) as exc:
        check(EmbeddingsBody, body)
    assert exc.value.param is not None
    assert exc.value.param.startswith(param_prefix)
    assert str(exc.value).startswith(f"invalid value for '{exc.value.param}': ")


# --- list lengths: refused before their items are validated --------------------------


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatBody, {"model": "m", "messages": [USER] * (MAX_MESSAGES + 1)}, "messages"),
        (ChatBody, chat(messages=[{"role": "user", "content": [{}] * 10_001}]), "messages"),
        (EmbeddingsBody, embed(input=["a"] * 2049), "input"),
        (EmbeddingsBody, embed(input=list(range(65_537))), "input"),
        (EmbeddingsBody, embed(input=[[1]] * 2049), "input"),
        (EmbeddingsBody, embed(input=[list(range(65_537))]), "input"),
    ],
)
def test_over_long_lists_are_a_400(model: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check(model, body)
    assert caught.value.status == 400
    assert str(caught.value.param).startswith(param)


def test_a_huge_token_list_is_refused_cheaply() -> None:
    """2,000,000 token ids cost pydantic 536 MiB before the length bound: an error object per
    element and per union arm. Now the list's length is checked before its items."""
    body = embed(input=list(range(2_000_000)))
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest):
            check(EmbeddingsBody, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_lists_at_their_bounds_pass() -> None:
    check(ChatBody, {"model": "m", "messages": [USER] * MAX_MESSAGES})
    check(EmbeddingsBody, embed(input=["a"] * 2048))
    check(EmbeddingsBody, embed(input=[list(range(65_536))]))
