"""router/upstream/providers/responses.py, ResponsesStream: events relayed unchanged at any
chunking, the terminal one held until taken, what the router reads, and the official SDK
reading what is relayed."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import UpstreamProtocolError
from router.upstream.providers import responses
from router.upstream.providers.base import StreamTranslator, Usage
from router.upstream.providers.responses import ResponsesStream

RID = "resp_0123456789abcdef"
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 3,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 15,
}


def _response(status: str, output: list[Any], usage: Any = None) -> dict[str, Any]:
    return {
        "id": RID,
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "model": "gpt-real",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def frame(event: dict[str, Any], named: bool = True, crlf: bool = False) -> bytes:
    head = b"event: " + event["type"].encode() + b"\n" if named else b""
    raw = head + b"data: " + orjson.dumps(event) + b"\n\n"
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def events(
    deltas: list[str], terminal: str = "response.completed", usage: Any = USAGE
) -> list[dict[str, Any]]:
    """A stream as OpenAI sends it: one message of ``deltas``, then ``terminal``."""
    text = "".join(deltas)
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant"}
    done_item = {**item, "status": "completed", "content": [{**part, "text": text}]}
    out: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response("in_progress", [])},
        {"type": "response.in_progress", "response": _response("in_progress", [])},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": part,
        },
    ]
    for d in deltas:
        out.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": d,
                "logprobs": [],
            }
        )
    place = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    out += [
        {"type": "response.output_text.done", **place, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
    ]
    status = terminal.removeprefix("response.")
    out.append({"type": terminal, "response": _response(status, [done_item], usage)})
    for n, event in enumerate(out):
        event["sequence_number"] = n
    return out


def stream_bytes(deltas: list[str], **kwargs: Any) -> bytes:
    return b"".join(frame(e) for e in events(deltas, **kwargs))


def relay(chunks: list[bytes], tr: ResponsesStream) -> bytes:
    """What a dispatcher sends: each feed, the terminal event once it is pending, the close."""
    out = b""
    for chunk in chunks:
        out += tr.feed(chunk)
        if tr.terminal_pending:
            out += tr.terminal()
    return out + tr.close()


def cut(data: bytes, offsets: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(o % (len(data) + 1) for o in offsets)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


STREAM = stream_bytes(["Hel", "lo", " \u2603"])


def test_it_is_a_stream_translator() -> None:
    tr: StreamTranslator = ResponsesStream(1024)
    assert tr.events == 0


def test_a_whole_stream_is_relayed_unchanged_and_read() -> None:
    tr = ResponsesStream()
    assert relay([STREAM], tr) == STREAM
    assert tr.finished
    assert tr.status == "completed"
    assert tr.usage == Usage(prompt_tokens=12, completion_tokens=3)
    assert tr.response_id == RID
    assert tr.content_chunks == 3
    assert tr.failed is None
    assert tr.events == len(events(["Hel", "lo", " \u2603"]))
    assert tr.next_sequence == tr.events


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_any_chunking_relays_the_same_bytes(offsets: list[int], crlf: bool) -> None:
    data = b"".join(frame(e, crlf=crlf) for e in events(["a", "b\n", "c"]))
    tr = ResponsesStream()
    assert relay(cut(data, offsets), tr) == data
    assert (tr.finished, tr.status, tr.content_chunks) == (True, "completed", 3)
    assert tr.usage == Usage(12, 3)


def test_one_byte_at_a_time() -> None:
    tr = ResponsesStream()
    assert relay([STREAM[i : i + 1] for i in range(len(STREAM))], tr) == STREAM
    assert tr.response_id == RID


def test_feed_holds_the_terminal_event_until_taken() -> None:
    tr = ResponsesStream()
    completed = frame(events(["x"])[-1])
    out = tr.feed(stream_bytes(["x"]))
    assert out == stream_bytes(["x"])[: -len(completed)]
    assert tr.finished
    assert tr.terminal_pending
    assert tr.usage == Usage(12, 3)
    # what follows the terminal event waits behind it, in order
    assert tr.feed(b"data: [DONE]\n\n") == b""
    assert tr.terminal() == completed + b"data: [DONE]\n\n"
    assert not tr.terminal_pending
    assert tr.terminal() == b""
    # once taken, anything later is relayed again
    assert tr.feed(b": keep-alive\n\n") == b": keep-alive\n\n"
    assert tr.close() == b""


def test_close_returns_a_terminal_event_never_taken() -> None:
    tr = ResponsesStream()
    out = tr.feed(STREAM)
    assert out + tr.close() == STREAM
    assert tr.terminal() == b""


def test_before_the_terminal_event_nothing_is_pending() -> None:
    tr = ResponsesStream()
    assert tr.feed(STREAM[:-5]) == STREAM[: STREAM.rindex(b"event: response.completed")]
    assert not tr.finished
    assert not tr.terminal_pending
    assert tr.terminal() == b""


@pytest.mark.parametrize(
    ("terminal", "status"),
    [("response.incomplete", "incomplete"), ("response.failed", "failed")],
)
def test_incomplete_and_failed_end_the_stream_too(terminal: str, status: str) -> None:
    tr = ResponsesStream()
    data = stream_bytes(["a"], terminal=terminal)
    assert relay([data], tr) == data
    assert (tr.finished, tr.status, tr.usage) == (True, status, Usage(12, 3))


def test_a_terminal_event_without_usage_leaves_it_unknown() -> None:
    tr = ResponsesStream()
    relay([stream_bytes(["a"], usage=None)], tr)
    assert tr.finished
    assert tr.usage is None


def test_events_without_an_event_line_are_read_from_their_data() -> None:
    data = b"".join(frame(e, named=False) for e in events(["a", "b"]))
    tr = ResponsesStream()
    out = tr.feed(data)
    assert tr.terminal_pending
    assert out + tr.terminal() + tr.close() == data
    assert (tr.response_id, tr.content_chunks, tr.usage) == (RID, 2, Usage(12, 3))


@pytest.mark.parametrize(
    "kind",
    [
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.audio.delta",
        "response.audio.transcript.delta",
    ],
)
def test_output_deltas_count_as_content(kind: str) -> None:
    tr = ResponsesStream()
    tr.feed(frame({"type": kind, "delta": "x", "sequence_number": 4}))
    tr.feed(frame({"type": kind, "delta": "y", "sequence_number": 5}, named=False))
    assert tr.content_chunks == 2
    assert tr.next_sequence == 6


@pytest.mark.parametrize(
    "kind",
    ["response.output_text.done", "response.output_item.added", "response.content_part.added"],
)
def test_other_events_are_not_content(kind: str) -> None:
    tr = ResponsesStream()
    assert tr.feed(frame({"type": kind, "sequence_number": 1})) != b""
    assert tr.content_chunks == 0


def test_a_sequence_number_quoted_in_text_is_not_the_events() -> None:
    tr = ResponsesStream()
    text = '{"sequence_number": 999}'
    tr.feed(frame({"type": "response.output_text.delta", "delta": text, "sequence_number": 7}))
    assert tr.next_sequence == 8


def test_an_error_event_is_relayed_and_marks_the_stream_failed() -> None:
    head = b"".join(frame(e) for e in events(["a"])[:5])
    error = frame(
        {"type": "error", "code": "server_error", "message": "boom\n!", "sequence_number": 5}
    )
    tr = ResponsesStream()
    assert tr.feed(head + error) == head + error
    assert (tr.failed, tr.failed_message, tr.finished) == ("server_error", "boom !", False)
    assert tr.close() == b""


def test_an_error_event_without_code_still_marks_the_stream_failed() -> None:
    tr = ResponsesStream()
    tr.feed(b'event: error\ndata: {"type": "error", "message": 3}\n\n')
    assert (tr.failed, tr.failed_message) == ("error", "")


def test_done_is_relayed_but_does_not_finish_a_stream() -> None:
    tr = ResponsesStream()
    assert tr.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert not tr.finished


def test_a_last_event_without_its_blank_line_is_completed() -> None:
    data = stream_bytes(["a"])
    tr = ResponsesStream()
    out = tr.feed(data[:-2])
    assert not tr.finished
    assert out + tr.close() == data
    assert tr.finished
    assert tr.usage == Usage(12, 3)


def test_a_stream_cut_mid_event_drops_the_broken_event() -> None:
    data = stream_bytes(["a"])
    tr = ResponsesStream()
    out = tr.feed(data[:-40])
    assert tr.close() == b""
    assert not tr.finished
    assert data.startswith(out)


def test_an_event_over_the_bound_is_a_protocol_error() -> None:
    tr = ResponsesStream(max_event_bytes=256)
    tr.feed(frame({"type": "response.output_text.delta", "delta": "x" * 100}))
    with pytest.raises(UpstreamProtocolError):
        tr.feed(frame({"type": "response.output_text.delta", "delta": "x" * 300}))


def test_what_follows_an_untaken_terminal_event_is_bounded() -> None:
    tr = ResponsesStream(max_event_bytes=2048)
    tr.feed(stream_bytes(["a"]))
    assert tr.terminal_pending
    assert tr.feed(b": keep-alive\n\n" * 100) == b""
    with pytest.raises(UpstreamProtocolError, match="after the stream's final event"):
        tr.feed(b": keep-alive\n\n" * 100)


def test_an_unsane_response_id_is_not_kept() -> None:
    created = events(["a"])[0]
    created["response"]["id"] = "bad id|x"
    tr = ResponsesStream()
    tr.feed(frame(created))
    assert tr.response_id is None


def test_a_second_terminal_event_changes_nothing() -> None:
    tr = ResponsesStream()
    relay([STREAM], tr)
    failed = events(["a"], terminal="response.failed", usage=None)[-1]
    assert tr.feed(frame(failed)) == frame(failed)
    assert (tr.status, tr.usage) == ("completed", Usage(12, 3))


# --- the official SDK reads what is relayed ----------------------------------------------


def _client(body: bytes) -> tuple[openai.OpenAI, httpx.Client]:
    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    http = httpx.Client(transport=httpx.MockTransport(serve))
    return openai.OpenAI(api_key="k", base_url="http://gw/v1", http_client=http), http


@pytest.mark.parametrize("crlf", [False, True])
def test_the_sdk_stream_helper_gets_the_final_response(crlf: bool) -> None:
    data = b"".join(frame(e, crlf=crlf) for e in events(["Hel", "lo"])) + b"data: [DONE]\n\n"
    relayed = relay(cut(data, [7, 100, 333, 1000, 1001]), ResponsesStream())
    client, http = _client(relayed)
    with http, client.responses.stream(model="m", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hel", "lo"]
    assert final.id == RID
    assert final.output_text == "Hello"
    assert final.usage is not None
    assert final.usage.output_tokens == 3


def test_the_sdk_reads_the_raw_events_and_an_error_event() -> None:
    tr = ResponsesStream()
    head = tr.feed(b"".join(frame(e) for e in events(["a", "b"])[:6]))
    relayed = head + responses.error_event("upstream timed out", "timeout", tr.next_sequence)
    client, http = _client(relayed)
    with http:
        got = list(client.responses.create(model="m", input="hi", stream=True))
    assert [e.type for e in got][:2] == ["response.created", "response.in_progress"]
    assert got[-1].type == "error"
    assert isinstance(got[-1], openai.types.responses.ResponseErrorEvent)
    assert (got[-1].code, got[-1].message, got[-1].sequence_number) == (
        "timeout",
        "upstream timed out",
        6,
    )
