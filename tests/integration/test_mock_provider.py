"""The mock LLM provider served in-process over real HTTP, driven by httpx and the openai SDK."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.integration.inproc import Mock, Start, sdk, stats

HELLO = [{"role": "user", "content": "hello world!"}]  # 12 chars -> 3 prompt tokens
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


async def fault(http: httpx.AsyncClient, mock: Mock, **spec: Any) -> None:
    """Arm a fault via POST /admin/fault."""
    resp = await http.post(f"{mock.url}/admin/fault", json=spec)
    assert resp.status_code == 200, resp.text


async def chat(http: httpx.AsyncClient, mock: Mock, **body: Any) -> httpx.Response:
    """POST a chat completion."""
    return await http.post(
        f"{mock.url}/v1/chat/completions", json={"model": "gpt-x", "messages": HELLO, **body}
    )


async def eventually(cond: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``cond`` until true, failing after about two seconds."""
    for _ in range(200):
        if await cond():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not reached in time")


async def stream_data_lines(http: httpx.AsyncClient, url: str, body: Any, sink: list[str]) -> None:
    """Stream a POST, appending each SSE ``data:`` line to ``sink`` as it arrives."""
    async with http.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                sink.append(line)


def server_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Errors aiohttp logged (an escaped exception or a 500 it had to make up)."""
    return [
        r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.ERROR
    ]


def sse_payloads(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


async def test_chat_non_stream_shape_and_usage(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(completion_tokens=5)
    body = (await chat(http, mock)).json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-x"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 tok3 tok4 ",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

    parts = [{"role": "user", "content": [{"type": "text", "text": "abcde"}]}]
    capped = (await chat(http, mock, messages=parts, max_completion_tokens=2)).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


async def test_openai_sdk_non_stream_and_latency(start_mock: Start) -> None:
    mock = await start_mock(latency_ms=60, completion_tokens=3)
    async with sdk(mock) as client:
        started = time.monotonic()
        answer = await client.chat.completions.create(model="gpt-x", messages=HELLO, max_tokens=10)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.06
    assert answer.choices[0].message.content == "tok0 tok1 tok2 "
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 3)


async def test_stream_frames_pacing_and_include_usage(
    start_mock: Start, http: httpx.AsyncClient
) -> None:
    mock = await start_mock(ttft_ms=60, chunk_interval_ms=25, completion_tokens=3)
    body = {"model": "gpt-x", "messages": HELLO, "stream": True}
    body["stream_options"] = {"include_usage": True}
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()
    async with http.stream("POST", f"{mock.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - started, line[len("data: ") :]))

    payloads = [p for _, p in arrivals]
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-x" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert tokens == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[4]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert all(c["usage"] is None for c in chunks[:5])
    # Pacing: nothing before the TTFT, then at least one interval between consecutive tokens.
    times = [t for t, _ in arrivals]
    assert times[0] >= 0.06
    assert times[3] - times[1] >= 2 * 0.025 * 0.9
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_without_include_usage_has_no_usage_key(
    start_mock: Start, http: httpx.AsyncClient
) -> None:
    mock = await start_mock(completion_tokens=2)
    resp = await chat(http, mock, stream=True, max_tokens=1)
    payloads = sse_payloads(resp.text)
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]"
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_openai_sdk_stream(start_mock: Start) -> None:
    mock = await start_mock(completion_tokens=4, chunk_interval_ms=1)
    async with sdk(mock) as client:
        stream = await client.chat.completions.create(
            model="gpt-x", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_embeddings_plain_and_sdk_base64(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    url = f"{mock.url}/v1/embeddings"
    body = (await http.post(url, json={"model": "emb", "input": ["abcd", "efghij"]})).json()
    assert body["object"] == "list"
    assert body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    async with sdk(mock) as client:  # the SDK asks for base64 and decodes it itself
        result = await client.embeddings.create(model="emb", input="abcd")
    assert result.data[0].embedding == pytest.approx(body["data"][0]["embedding"], abs=1e-6)


async def test_rpm_limit(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(rpm=5)
    for i in range(5):
        resp = await chat(http, mock)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    resp = await chat(http, mock)
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    s = await stats(http, mock)
    assert (s["received"], s["ok"], s["rate_limited"]) == (6, 5, 1)
    assert (s["rpm_window"], s["rpm_peak"]) == (5, 5)
    assert s["by_status"] == {"200": 5, "429": 1}


async def test_rpm_window_is_an_exact_60s_log(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(rpm=2)
    now = [1000.0]
    mock.provider.clock = lambda: now[0]
    for at in (1000.0, 1010.0):
        now[0] = at
        assert (await chat(http, mock)).status_code == 200
    now[0] = 1020.0
    resp = await chat(http, mock)
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, "40")
    now[0] = 1060.0  # the entry from t=1000 leaves exactly 60 s later
    assert (await chat(http, mock)).status_code == 200
    now[0] = 1065.0
    resp = await chat(http, mock)
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, "5")
    assert resp.headers["x-ratelimit-reset-requests"] == "5s"


async def test_tpm_reserved_charges_max_tokens(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(tpm=100)
    resp = await chat(http, mock, max_tokens=60)
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-tokens"] == "40"
    resp = await chat(http, mock, max_tokens=60)
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "tokens"
    assert math.isclose(float(resp.headers["retry-after-ms"]) / 1000, 60, abs_tol=1)
    assert (await chat(http, mock, max_tokens=40)).status_code == 200  # 60 + 40 fits exactly
    s = await stats(http, mock)
    assert (s["tpm_window"], s["tpm_peak"], s["tokens_charged"], s["rate_limited"]) == (
        100,
        100,
        100,
        1,
    )

    await http.post(f"{mock.url}/stats/reset")
    long_prompt = [{"role": "user", "content": "x" * 200}]  # 50 tokens > max_tokens
    assert (await chat(http, mock, messages=long_prompt, max_tokens=1)).status_code == 200
    assert (await stats(http, mock))["tpm_window"] == 50


async def test_tpm_actual_charges_completion_after_answer(
    start_mock: Start, http: httpx.AsyncClient
) -> None:
    mock = await start_mock(tpm=1000, tpm_accounting="actual", completion_tokens=16)
    assert (await chat(http, mock, max_tokens=500)).status_code == 200
    assert (await chat(http, mock, stream=True)).status_code == 200
    s = await stats(http, mock)
    assert s["tpm_window"] == s["tokens_charged"] == 2 * (3 + 16)


async def test_anthropic_non_stream(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", completion_tokens=4, rpm=10, tpm=1000)
    body = {"model": "claude-x", "max_tokens": 100, "messages": HELLO}
    resp = await http.post(f"{mock.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    msg = resp.json()
    assert msg["id"].startswith("msg_")
    assert (msg["type"], msg["role"], msg["model"]) == ("message", "assistant", "claude-x")
    assert msg["content"] == [{"type": "text", "text": "tok0 tok1 tok2 tok3 "}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("end_turn", None)
    assert msg["usage"] == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 4,
    }
    assert resp.headers["anthropic-ratelimit-requests-remaining"] == "9"
    assert resp.headers["anthropic-ratelimit-tokens-remaining"] == "900"

    capped = {**body, "max_tokens": 2}
    resp = await http.post(f"{mock.url}/v1/messages", json=capped, headers=ANTHROPIC_HEADERS)
    assert resp.json()["stop_reason"] == "max_tokens"
    stop = {**body, "stop_sequences": ["tok1"]}
    resp = await http.post(f"{mock.url}/v1/messages", json=stop, headers=ANTHROPIC_HEADERS)
    assert (resp.json()["stop_reason"], resp.json()["stop_sequence"]) == ("stop_sequence", "tok1")


async def test_anthropic_stream_event_sequence(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", completion_tokens=3)
    body = {"model": "claude-x", "max_tokens": 100, "messages": HELLO, "stream": True}
    resp = await http.post(f"{mock.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    frames = [f for f in resp.text.split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    data = [orjson.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [d["type"] for d in data] == names
    assert data[0]["message"]["usage"] == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert data[1]["content_block"] == {"type": "text", "text": ""}
    assert [d["delta"] for d in data[3:6]] == [
        {"type": "text_delta", "text": f"tok{i} "} for i in range(3)
    ]
    assert data[7]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert data[7]["usage"] == {"output_tokens": 3}


async def test_anthropic_validation_and_errors(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(api="anthropic", rpm=1)
    url = f"{mock.url}/v1/messages"
    no_max = {"model": "c", "messages": HELLO}
    resp = await http.post(url, json=no_max, headers=ANTHROPIC_HEADERS)
    assert resp.status_code == 400
    assert resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "invalid_request_error"
    body = {**no_max, "max_tokens": 5}
    assert (await http.post(url, json=body)).status_code == 400  # no anthropic-version
    assert (await http.post(url, json=body, headers=ANTHROPIC_HEADERS)).status_code == 200
    resp = await http.post(url, json=body, headers=ANTHROPIC_HEADERS)
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.headers["anthropic-ratelimit-requests-remaining"] == "0"
    models = (await http.get(f"{mock.url}/v1/models", headers=ANTHROPIC_HEADERS)).json()
    assert models["data"][0]["type"] == "model"


async def test_api_key_enforced(start_mock: Start, http: httpx.AsyncClient) -> None:
    oai = await start_mock(api_key="sk-test")
    resp = await chat(http, oai)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    ok = await http.post(
        f"{oai.url}/v1/chat/completions",
        json={"messages": HELLO},
        headers={"Authorization": "Bearer sk-test"},
    )
    assert ok.status_code == 200
    async with sdk(oai, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=HELLO)

    ant = await start_mock(api="anthropic", api_key="ak")
    body = {"model": "c", "max_tokens": 5, "messages": HELLO}
    bad = await http.post(f"{ant.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert (bad.status_code, bad.json()["error"]["type"]) == (401, "authentication_error")
    good_headers = {**ANTHROPIC_HEADERS, "x-api-key": "ak"}
    good = await http.post(f"{ant.url}/v1/messages", json=body, headers=good_headers)
    assert good.status_code == 200
    assert (await stats(http, oai))["errors"] == 2


async def test_invalid_json_and_error_rate(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(rpm=10)
    resp = await http.post(f"{mock.url}/v1/chat/completions", content=b"{nope")
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "code" in resp.json()["error"]

    flaky = await start_mock(error_rate=1.0, error_status=503, rpm=10)
    resp = await chat(http, flaky)
    assert (resp.status_code, resp.json()["error"]["type"]) == (503, "server_error")
    s = await stats(http, flaky)
    assert (s["errors"], s["ok"], s["rpm_window"]) == (1, 0, 0)


async def test_fault_error_with_count(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(rpm=10)
    await fault(http, mock, mode="error", status=503, count=2)
    assert [(await chat(http, mock)).status_code for _ in range(3)] == [503, 503, 200]
    s = await stats(http, mock)
    assert (s["faults"], s["ok"], s["rpm_window"], s["fault"]) == (2, 1, 1, "none")


async def test_fault_close_is_a_disconnect(
    start_mock: Start, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    mock = await start_mock()
    await fault(http, mock, mode="close")
    with caplog.at_level(logging.ERROR, "aiohttp"), pytest.raises(httpx.TransportError):
        await chat(http, mock)
    assert not server_errors(caplog)
    s = await stats(http, mock)
    assert (s["faults"], s["by_status"]) == (1, {})


async def test_fault_bad_json(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    await fault(http, mock, mode="bad_json")
    resp = await chat(http, mock)
    assert resp.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(resp.content)


async def test_fault_cut_stream_ends_without_done(
    start_mock: Start, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    mock = await start_mock(completion_tokens=10)
    await fault(http, mock, mode="cut_stream", after_chunks=3)
    payloads: list[str] = []
    body = {"model": "m", "messages": HELLO, "stream": True}
    url = f"{mock.url}/v1/chat/completions"
    with caplog.at_level(logging.ERROR, "aiohttp"), pytest.raises(httpx.TransportError):
        await stream_data_lines(http, url, body, payloads)
    assert len(payloads) == 3
    assert "data: [DONE]" not in payloads
    assert not server_errors(caplog)
    s = await stats(http, mock)
    assert (s["faults"], s["rpm_window"]) == (1, 1)  # admitted normally, then cut

    await fault(http, mock, mode="cut_stream", count=1)
    with pytest.raises(httpx.TransportError):  # non-streamed: half the body, then disconnect
        await chat(http, mock)
    assert (await chat(http, mock)).status_code == 200
    assert not server_errors(caplog)


async def test_fault_rate_limit(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    await fault(http, mock, mode="rate_limit", retry_after_s=2)
    resp = await chat(http, mock)
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, "2")
    s = await stats(http, mock)
    assert (s["faults"], s["rate_limited"], s["rpm_window"]) == (1, 0, 0)


async def test_fault_hang_until_client_gives_up(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock()
    await fault(http, mock, mode="hang")
    with pytest.raises(httpx.ReadTimeout):
        await http.post(f"{mock.url}/v1/chat/completions", json={"messages": HELLO}, timeout=0.15)

    async def released() -> bool:
        return (await stats(http, mock))["in_flight"] == 0

    await eventually(released)
    s = await stats(http, mock)
    assert (s["faults"], s["in_flight_peak"], s["rpm_window"]) == (1, 1, 1)


async def test_stats_and_reset(start_mock: Start, http: httpx.AsyncClient) -> None:
    mock = await start_mock(name="p1", rpm=2, tpm=1000)
    await chat(http, mock, model="a")
    await chat(http, mock, model="b")
    await chat(http, mock, model="b")
    s = await stats(http, mock)
    assert (s["name"], s["api"], s["models"]) == ("p1", "openai", {"a": 1, "b": 2})
    assert (s["received"], s["ok"], s["rate_limited"], s["in_flight"]) == (3, 2, 1, 0)
    assert s["tokens_charged"] == s["tpm_window"] == 6

    reset = (await http.post(f"{mock.url}/stats/reset")).json()
    zeroed = ("received", "ok", "rate_limited", "rpm_window", "tpm_window", "rpm_peak")
    assert all(reset[key] == 0 for key in (*zeroed, "tokens_charged", "faults", "errors"))
    assert (reset["by_status"], reset["models"]) == ({}, {})
    assert (await chat(http, mock)).status_code == 200  # windows were cleared too
    models = (await http.get(f"{mock.url}/v1/models")).json()
    assert models["data"] == [
        {"id": "mock-model", "object": "model", "created": 1704067200, "owned_by": "p1"}
    ]


async def test_cli_port_zero_prints_real_port(http: httpx.AsyncClient) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.mock_provider",
        "--port",
        "0",
        "--name",
        "cli",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("mock-provider cli listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert int(url.rsplit(":", 1)[1]) > 0
        assert (await http.get(f"{url}/stats")).json()["name"] == "cli"
    finally:
        proc.terminate()
        await proc.communicate()
    assert proc.returncode == 0
