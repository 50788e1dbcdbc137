"""The SSE splitter (router/providers/_common.py): same events however the bytes are cut,
linear in the size of one event, and bounded in it."""

from __future__ import annotations

import pytest

from router.errors import UpstreamProtocolError
from router.upstream.providers._common import EventSplitter
from router.upstream.providers.anthropic import AnthropicStream
from router.upstream.providers.openai import OpenAIStream

STREAMS = {
    "lf": b"data: 1\n\ndata: 2\n\n: keep-alive\n\ndata: [DONE]\n\n",
    "crlf": b"data: 1\r\n\r\ndata: 2\r\n\r\ndata: [DONE]\r\n\r\n",
    "mixed": b"data: a\n\ndata: b\r\n\r\ndata: c\r\n\r\n\ndata: d\n\n",
    "multi-line": b"event: x\ndata: 1\ndata: 2\n\nevent: y\r\ndata: 3\r\n\r\n",
    "unfinished tail": b"data: 1\n\ndata: 2\r\n\r\ndata: part",
}


def split(s: EventSplitter, pieces: list[bytes]) -> list[bytes]:
    events = []
    for piece in pieces:
        buf, ends = s.push(piece)
        start = 0
        for end in ends:
            events.append(buf[start:end])
            start = end
    return events


def whole(stream: bytes) -> tuple[list[bytes], bytes]:
    s = EventSplitter()
    return split(s, [stream]), s.rest()


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_cut_gives_the_same_events(name: str) -> None:
    stream = STREAMS[name]
    want = whole(stream)
    assert b"".join(want[0]) + want[1] == stream
    for i in range(len(stream) + 1):  # one cut anywhere
        s = EventSplitter()
        assert (split(s, [stream[:i], stream[i:]]), s.rest()) == want, i
    for size in (1, 2, 3, 5):  # many small pieces: terminators straddle pieces every way
        s = EventSplitter()
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert (split(s, pieces), s.rest()) == want, size


def test_counts_complete_events_keep_alives_included() -> None:
    s = EventSplitter()
    split(s, [b"data: 1\n", b"\n: ping\n\nda", b"ta: 2"])
    assert s.events == 2
    tr = OpenAIStream(False)
    tr.feed(b": keep-alive\n\n")
    assert tr.events == 1
    an = AnthropicStream(False)
    an.feed(b'event: ping\ndata: {"type": "ping"}\n\n')
    assert an.events == 1


class CountingBytes(bytes):
    """A chunk that is the splitter's own input: the splitter may hand it back, not copy it."""


def test_one_giant_event_is_held_without_copies() -> None:
    # before: the whole pending event was copied again for every chunk (8 MiB in 16 KiB
    # chunks took 1.8 s of CPU, 64 MiB in 64 KiB chunks 25.5 s); now each chunk is kept as
    # it came and the event is joined once at its end (0.02 s and 0.16 s): checked here by
    # what push() hands back, not by a timing
    size, piece = 8 << 20, 16 << 10
    s = EventSplitter(max_event_bytes=size + 16)
    s.push(b"data: ")
    for _ in range(size // piece):
        chunk = CountingBytes(b"x" * piece)
        buf, ends = s.push(chunk)
        assert buf is chunk  # held as it came: nothing joined or copied per chunk
        assert ends == []
    buf, ends = s.push(b"\n\n")
    assert ends == [size + 8]
    assert buf == b"data: " + b"x" * size + b"\n\n"


@pytest.mark.parametrize("translator", [OpenAIStream, AnthropicStream])
def test_an_event_past_its_bound_is_a_bad_response(translator: type) -> None:
    tr = translator(False, 1024)
    assert tr.feed(b"data: " + b"x" * 1000) == b""  # under the bound: kept
    with pytest.raises(UpstreamProtocolError, match="SSE event over 1024 bytes"):
        tr.feed(b"x" * 100)


def test_the_bound_is_on_one_event_not_on_the_stream() -> None:
    s = EventSplitter(max_event_bytes=64)
    event = b"data: " + b"x" * 50 + b"\n\n"
    pieces = [event[i : i + 7] for i in range(0, len(event), 7)] * 100
    assert len(split(s, pieces)) == 100
