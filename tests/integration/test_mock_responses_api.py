"""The mock's OpenAI Responses API, driven over real HTTP by the official openai SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.integration.inproc import Start, sdk, stats

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"unit": {"type": "string"}, "city": {"type": "string"}},
        "required": ["city"],
    },
}


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each frame of an ``event:``/``data:`` SSE body."""
    frames = [f.split("\n") for f in text.split("\n\n") if f]
    return [
        (lines[0].removeprefix("event: "), orjson.loads(lines[1].removeprefix("data: ")))
        for lines in frames
    ]


async def test_create_retrieve_delete(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(completion_tokens=3, api_key="sk-test")
    async with sdk(mock) as client:
        resp = await client.responses.create(
            model="gpt-x",
            input="hello world!",  # 12 characters -> 3 tokens
            instructions="be kind",  # 7 characters -> with the input, 19 -> 5 tokens
            metadata={"run": "1"},
            prompt_cache_key="conv-1",
            extra_headers={"OpenAI-Beta": "responses=v1"},
        )
        assert resp.id.startswith("resp_")
        assert (resp.object, resp.status, resp.model) == ("response", "completed", "gpt-x")
        assert resp.output_text == "tok0 tok1 tok2 "
        message = resp.output[0]
        assert message.type == "message"
        assert message.id.startswith("msg_")
        assert message.status == "completed"
        assert resp.usage is not None
        assert (resp.usage.input_tokens, resp.usage.output_tokens) == (5, 3)
        assert resp.usage.total_tokens == 8
        assert resp.usage.input_tokens_details.cached_tokens == 0
        assert resp.usage.output_tokens_details.reasoning_tokens == 0
        assert (resp.metadata, resp.instructions, resp.store) == ({"run": "1"}, "be kind", True)
        assert (resp.prompt_cache_key, resp.previous_response_id) == ("conv-1", None)
        assert (resp.tool_choice, resp.tools, resp.parallel_tool_calls) == ("auto", [], True)

        noted = (await stats(http, mock))["last_headers"]
        assert noted == {"openai-beta": "responses=v1"}  # never the Authorization header
        again = await client.responses.retrieve(resp.id)
        assert again.model_dump() == resp.model_dump()
        await client.responses.delete(resp.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.retrieve(resp.id)
        assert gone.value.body == {
            "message": f"No response found with id '{resp.id}'.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(resp.id)

    deleted = await http.delete(
        f"{mock.url}/v1/responses/{resp.id}", headers={"Authorization": "Bearer sk-test"}
    )
    assert deleted.status_code == 404
    assert (await http.get(f"{mock.url}/v1/responses/{resp.id}")).status_code == 401
    s = await stats(http, mock)
    assert (s["received"], s["ok"], s["models"], s["by_status"]) == (1, 1, {"gpt-x": 1}, {"200": 1})
    assert s["paths"] == {"/v1/responses": 1, "/v1/responses/{response_id}": 6}
    assert s["last_headers"] == {}  # the last request (the GET) named none of the noted headers


async def test_plain_delete_answer_shape(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    made = (await http.post(f"{mock.url}/v1/responses", json={"model": "m", "input": "x"})).json()
    deleted = await http.delete(f"{mock.url}/v1/responses/{made['id']}")
    assert deleted.json() == {"id": made["id"], "object": "response.deleted", "deleted": True}


async def test_stream_events_and_final_response(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(completion_tokens=3, chunk_interval_ms=1)
    body = {"model": "gpt-x", "input": [{"role": "user", "content": "hello world!"}]}
    resp = await http.post(f"{mock.url}/v1/responses", json={**body, "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["type"] for _, data in events] == names
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["output"] == []
    assert events[2][1]["item"]["content"] == []
    assert [data["delta"] for _, data in events[4:7]] == ["tok0 ", "tok1 ", "tok2 "]
    assert events[7][1]["text"] == "tok0 tok1 tok2 "
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 3
    stored = (await http.get(f"{mock.url}/v1/responses/{final['id']}")).json()
    assert stored == final

    async with sdk(mock) as client:
        async with client.responses.stream(**body) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            done = await stream.get_final_response()
        raw = await client.responses.create(**body, stream=True)
        kinds = [event.type async for event in raw]
    assert "".join(deltas) == done.output_text == "tok0 tok1 tok2 "
    assert done.status == "completed"
    assert kinds == names


async def test_function_call_round_trip(start_mock: Start) -> None:
    mock = await start_mock(completion_tokens=2)
    async with sdk(mock) as client:
        first = await client.responses.create(model="gpt-x", input="weather?", tools=[WEATHER])
        call = first.output[0]
        assert call.type == "function_call"
        assert call.id is not None
        assert call.id.startswith("fc_")
        assert call.call_id.startswith("call_")
        assert (call.name, call.arguments, call.status) == (
            "get_weather",
            '{"city":"mock"}',
            "completed",
        )
        assert first.tools[0].type == "function"
        assert first.output_text == ""

        follow = await client.responses.create(
            model="gpt-x",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=[WEATHER],
        )
        assert follow.output_text == "tok0 tok1 "
        assert follow.previous_response_id == first.id
        assert first.usage is not None
        assert follow.usage is not None
        # the previous response's whole context is billed again as input
        assert follow.usage.input_tokens > first.usage.total_tokens

        none = await client.responses.create(
            model="gpt-x", input="hi", tools=[WEATHER], tool_choice="none"
        )
        assert none.output[0].type == "message"


async def test_function_call_streamed(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    body = {"model": "gpt-x", "input": "weather?", "tools": [WEATHER], "stream": True}
    events = sse_events((await http.post(f"{mock.url}/v1/responses", json=body)).text)
    names = [name for name, _ in events]
    deltas = [data["delta"] for name, data in events if name.endswith("arguments.delta")]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert 2 <= len(deltas) <= 3
    assert "".join(deltas) == '{"city":"mock"}'
    added = events[2][1]["item"]
    assert (added["type"], added["arguments"], added["status"]) == (
        "function_call",
        "",
        "in_progress",
    )

    async with sdk(mock) as client:
        stream_body = {k: v for k, v in body.items() if k != "stream"}
        async with client.responses.stream(**stream_body) as stream:
            final = await stream.get_final_response()
    assert final.output[0].type == "function_call"
    assert final.output[0].arguments == '{"city":"mock"}'


async def test_wrong_previous_response_id(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    async with sdk(mock) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.responses.create(model="m", input="x", previous_response_id="resp_nope")
        assert err.value.code == "previous_response_not_found"
        assert err.value.param == "previous_response_id"
        assert err.value.message.endswith("Previous response with id 'resp_nope' not found.")

        unstored = await client.responses.create(model="m", input="x", store=False)
        assert unstored.store is False
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="m", input="x", previous_response_id=unstored.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
    s = await stats(http, mock)
    assert (s["previous_not_found"], s["by_status"]) == (2, {"200": 1, "400": 2})


async def test_store_keeps_the_latest(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    mock.provider.responses.limit = 2
    ids = []
    for _ in range(3):
        resp = await http.post(f"{mock.url}/v1/responses", json={"model": "m", "input": "x"})
        ids.append(resp.json()["id"])
    codes = [(await http.get(f"{mock.url}/v1/responses/{rid}")).status_code for rid in ids]
    assert codes == [404, 200, 200]


async def test_incomplete_at_max_output_tokens(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(completion_tokens=5)
    body = {"model": "m", "input": "x", "max_output_tokens": 2}
    resp = (await http.post(f"{mock.url}/v1/responses", json=body)).json()
    assert (resp["status"], resp["incomplete_details"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    assert resp["output"][0]["status"] == "incomplete"
    assert resp["usage"]["output_tokens"] == 2
    assert resp["max_output_tokens"] == 2
    events = sse_events(
        (await http.post(f"{mock.url}/v1/responses", json={**body, "stream": True})).text
    )
    assert events[-1][0] == "response.incomplete"
    assert (await stats(http, mock))["last_max_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "x"}, "model", "missing_required_parameter"),
        ({"model": 3, "input": "x"}, "model", "invalid_type"),
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"model": "m", "input": {"a": 1}}, "input", "invalid_type"),
        ({"model": "m", "input": []}, "input", "empty_array"),
        (
            {"model": "m", "input": [{"role": "robot", "content": "x"}]},
            "input[0].role",
            "invalid_value",
        ),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "image"}]}]},
            "input[0].content[0].type",
            "invalid_value",
        ),
        ({"model": "m", "input": [{"type": "function_call_output"}]}, "input[0].call_id", None),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", None),
        (
            {
                "model": "m",
                "input": "x",
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "name": "nope"},
            },
            "tool_choice",
            None,
        ),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name", None),
    ],
)
async def test_validation(
    start_mock: Start, http: httpx.AsyncClient, body: dict[str, Any], param: str, code: str | None
) -> None:
    mock = await start_mock()
    resp = await http.post(f"{mock.url}/v1/responses", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    if code is not None:
        assert error["code"] == code


async def test_limits_faults_and_rich_input(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(rpm=3, tpm_accounting="actual", tpm=10_000)
    url = f"{mock.url}/v1/responses"
    await http.post(f"{mock.url}/admin/fault", json={"mode": "error", "status": 503, "count": 1})
    assert (await http.post(url, json={"model": "m", "input": "x"})).status_code == 503
    items = [
        {"role": "developer", "content": "abcd"},  # 4 characters
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "abcd"},  # 4 characters
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},  # a block
            ],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "abcd"}]},
        {"type": "function_call", "call_id": "call_1", "name": "ab", "arguments": "{}"},  # block
        {"type": "function_call_output", "call_id": "call_1", "output": "abcd"},  # block
    ]
    resp = (await http.post(url, json={"model": "m", "input": items, "user": "u1"})).json()
    # 12 + 4 + 4 = 20 characters -> 5 tokens, plus three blocks of 8
    assert resp["usage"]["input_tokens"] == 5 + 3 * 8
    assert resp["user"] == "u1"
    assert (await http.post(url, json={"model": "m", "input": "x"})).status_code == 200
    assert (await http.post(url, json={"model": "m", "input": "x"})).status_code == 200
    limited = await http.post(url, json={"model": "m", "input": "x"})
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    s = await stats(http, mock)
    assert (s["received"], s["ok"], s["faults"], s["rate_limited"]) == (5, 3, 1, 1)
    assert s["tokens_charged"] == s["tpm_window"] > 29
    assert [text for _, text in s["arrivals"]] == ["", "x", "x", "x"]
