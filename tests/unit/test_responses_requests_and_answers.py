"""router/upstream/providers/responses.py, request side: the body's checks, the upstream
requests, the whole answer, the estimates, the error event."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
from pydantic import SecretStr

from router.config import Provider, SecretRef
from router.errors import BadRequest, UpstreamProtocolError, to_openai_error
from router.tokens import PER_MESSAGE, PRIMING, prompt_tokens
from router.upstream.providers import responses
from router.upstream.providers.base import Usage
from router.upstream.providers.responses import (
    MAX_ID_CHARS,
    MAX_INPUT_ITEMS,
    MAX_OUTPUT_TOKENS,
    ResponsesRequest,
    check_responses,
    response_id_ok,
)


def provider(base_url: str = "http://up:8000/v1", key: str | None = "sk-up") -> Provider:
    ref = None
    if key is not None:
        ref = SecretRef(env="PROVIDER_KEY")
        ref._value = SecretStr(key)
    return Provider(name="p", kind="openai", base_url=base_url, api_key=ref)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **fields}


# --- check_responses -------------------------------------------------------------------


def test_a_minimal_body_reads_as_the_api_defaults() -> None:
    assert check_responses(body()) == ResponsesRequest(
        model="m", stream=False, previous_response_id=None, max_output_tokens=None, store=True
    )


def test_the_fields_the_router_reads_are_read() -> None:
    got = check_responses(
        body(stream=True, previous_response_id="resp_abc", max_output_tokens=64, store=False)
    )
    assert got == ResponsesRequest("m", True, "resp_abc", 64, False)


@pytest.mark.parametrize(
    "fields",
    [
        {"input": [{"role": "user", "content": "hi"}]},
        {"input": []},
        {"input": None},
        {"stream": None, "store": None, "max_output_tokens": None, "previous_response_id": None},
        {"input": [{}] * MAX_INPUT_ITEMS},
        {"max_output_tokens": MAX_OUTPUT_TOKENS},
        {"previous_response_id": "x" * MAX_ID_CHARS},
        {"unknown_field": {"passes": "through"}, "conversation": "conv_1"},
    ],
)
def test_valid_bodies_pass(fields: dict[str, Any]) -> None:
    check_responses(body(**fields))


def test_input_may_be_absent_as_the_api_allows() -> None:
    assert check_responses({"model": "m", "previous_response_id": "resp_1"}).model == "m"
    assert check_responses({"model": "m", "prompt": {"id": "pmpt_1"}}).model == "m"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"input": "hi"}, "model"),
        (body(model=""), "model"),
        (body(model=3), "model"),
        (body(input=3), "input"),
        (body(input={"role": "user"}), "input"),
        (body(input=[{}] * (MAX_INPUT_ITEMS + 1)), "input"),
        (body(input=[{"role": "user", "content": "a"}, "b"]), "input[1]"),
        (body(previous_response_id=""), "previous_response_id"),
        (body(previous_response_id="x" * (MAX_ID_CHARS + 1)), "previous_response_id"),
        (body(previous_response_id="resp|1"), "previous_response_id"),
        (body(previous_response_id="resp 1"), "previous_response_id"),
        (body(previous_response_id="resp\n1"), "previous_response_id"),
        (body(previous_response_id="résp"), "previous_response_id"),
        (body(previous_response_id=".."), "previous_response_id"),
        (body(previous_response_id=7), "previous_response_id"),
        (body(max_output_tokens=0), "max_output_tokens"),
        (body(max_output_tokens=-5), "max_output_tokens"),
        (body(max_output_tokens=MAX_OUTPUT_TOKENS + 1), "max_output_tokens"),
        (body(max_output_tokens=1.5), "max_output_tokens"),
        (body(max_output_tokens=True), "max_output_tokens"),
        (body(max_output_tokens="64"), "max_output_tokens"),
        (body(stream="true"), "stream"),
        (body(stream=1), "stream"),
        (body(store="no"), "store"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(data: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_responses(data)
    assert info.value.param == param
    error = to_openai_error(info.value)["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert f"'{param}'" in error["message"]


@pytest.mark.parametrize("data", [[], "x", None, 3])
def test_a_body_that_is_not_an_object_is_a_400(data: Any) -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        check_responses(data)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b", True),
        ("a", True),
        ("x" * MAX_ID_CHARS, True),
        ("!#$%&'()*+,-./:;<=>?@[]^_`{}~", True),
        ("...", True),
        ("", False),
        ("x" * (MAX_ID_CHARS + 1), False),
        (".", False),
        ("..", False),
        ("a|b", False),
        ("a b", False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("a\x00b", False),
        ("ré", False),
    ],
)
def test_response_id_ok(raw: str, ok: bool) -> None:
    assert response_id_ok(raw) is ok


# --- upstream requests -----------------------------------------------------------------


def test_request_posts_the_body_with_the_model_replaced() -> None:
    sent = body(model="alias", tools=[{"type": "function", "name": "f"}], stream=True)
    req = responses.request(provider(), "gpt-real", sent)
    assert req.url == "http://up:8000/v1/responses"
    assert req.headers == {"content-type": "application/json", "authorization": "Bearer sk-up"}
    assert orjson.loads(req.body) == {**sent, "model": "gpt-real"}
    assert sent["model"] == "alias"  # the client's body is not changed


def test_request_without_a_key_sends_no_authorization() -> None:
    req = responses.request(provider("http://up/v1/", key=None), "m", body())
    assert req.url == "http://up/v1/responses"
    assert req.headers == {"content-type": "application/json"}


def test_an_unserializable_body_is_a_400() -> None:
    with pytest.raises(BadRequest):
        responses.request(provider(), "m", body(metadata={"n": 2**70}))


@pytest.mark.parametrize("build", [responses.get_request, responses.delete_request])
def test_item_requests_name_the_id_in_the_path(build: Any) -> None:
    req = build(provider(), "resp_123")
    assert req.url == "http://up:8000/v1/responses/resp_123"
    assert req.headers == {"authorization": "Bearer sk-up"}
    assert req.body == b""


@pytest.mark.parametrize("build", [responses.get_request, responses.delete_request])
def test_an_id_cannot_leave_its_path_segment(build: Any) -> None:
    req = build(provider(), "../files/x?y=1#z%")
    assert req.url == "http://up:8000/v1/responses/..%2Ffiles%2Fx%3Fy%3D1%23z%25"
    with pytest.raises(BadRequest):
        build(provider(), "..")
    with pytest.raises(BadRequest):
        build(provider(), "a b")


# --- whole answers ---------------------------------------------------------------------

ANSWER: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1700000000,
    "status": "completed",
    "model": "gpt-real",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 18,
    },
}


def test_response_returns_the_bytes_unchanged_with_usage_and_id() -> None:
    payload = orjson.dumps(ANSWER, option=orjson.OPT_INDENT_2)
    answer, rid = responses.response(payload)
    assert answer.body is payload
    assert answer.usage == Usage(prompt_tokens=11, completion_tokens=7)
    assert rid == "resp_1"


@pytest.mark.parametrize(
    ("changes", "usage", "rid"),
    [
        ({"usage": None}, None, "resp_1"),
        ({"usage": {"input_tokens": "x", "output_tokens": None}}, Usage(0, 0), "resp_1"),
        ({"id": None}, Usage(11, 7), None),
        ({"id": "bad id"}, Usage(11, 7), None),
        ({"id": 5}, Usage(11, 7), None),
    ],
)
def test_response_reads_what_is_sane(
    changes: dict[str, Any], usage: Usage | None, rid: Any
) -> None:
    answer, got = responses.response(orjson.dumps({**ANSWER, **changes}))
    assert (answer.usage, got) == (usage, rid)


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1]", b'"resp"', b'{"id": '])
def test_an_unreadable_answer_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        responses.response(payload)


def test_the_sdk_reads_a_relayed_answer() -> None:
    answer, _ = responses.response(orjson.dumps(ANSWER))

    def serve(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        return httpx.Response(
            200, content=answer.body, headers={"content-type": "application/json"}
        )

    with httpx.Client(transport=httpx.MockTransport(serve)) as http:
        client = openai.OpenAI(api_key="k", base_url="http://gw/v1", http_client=http)
        got = client.responses.create(model="m", input="hi")
    assert got.id == "resp_1"
    assert got.output_text == "Hello"


# --- estimates -------------------------------------------------------------------------


def test_a_string_input_counts_as_one_chat_message() -> None:
    text = "x" * 401
    assert responses.prompt_estimate({"input": text}) == prompt_tokens(
        {"messages": [{"role": "user", "content": text}]}
    )


def test_message_items_count_as_chat_messages() -> None:
    content = [
        {"type": "input_text", "text": "abcd" * 10},
        {"type": "input_image", "image_url": "u"},
    ]
    items = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    chat = prompt_tokens({"messages": items, "tools": tools})
    assert responses.prompt_estimate({"input": items, "tools": tools}) == chat


def test_every_other_item_counts_by_its_json() -> None:
    items = [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c", "output": "r" * 100},
        {"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": "e" * 200},
        {"type": "item_reference", "id": "msg_1"},
    ]
    chars = sum(len(orjson.dumps(i)) for i in items)
    expected = (chars + 3) // 4 + PER_MESSAGE * len(items) + PRIMING
    assert responses.prompt_estimate({"input": items}) == expected


def test_instructions_count_as_a_message() -> None:
    got = responses.prompt_estimate({"input": "abcd", "instructions": "x" * 8})
    assert got == 3 + 2 * PER_MESSAGE + PRIMING


@pytest.mark.parametrize("data", [{}, {"input": None}, {"input": []}, {"instructions": None}])
def test_an_empty_body_costs_the_priming(data: dict[str, Any]) -> None:
    assert responses.prompt_estimate(data) == PRIMING


# --- error event -----------------------------------------------------------------------


def test_error_event_is_a_response_error_event() -> None:
    raw = responses.error_event("the provider\nfailed", "upstream_error", sequence_number=9)
    assert raw.startswith(b"event: error\ndata: ")
    assert raw.endswith(b"\n\n")
    data = orjson.loads(raw.split(b"data: ", 1)[1])
    assert data == {
        "type": "error",
        "code": "upstream_error",
        "message": "the provider failed",
        "param": None,
        "sequence_number": 9,
    }
    event = openai.types.responses.ResponseErrorEvent.model_validate(data)
    assert event.code == "upstream_error"
