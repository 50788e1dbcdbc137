"""What a client sends before its body is bounded, and our refusals can be read.

A request line and headers past ``max_head_bytes`` or ``max_header_count`` get a 431 in
OpenAI's shape, then the connection is closed; a refusal sent while the client is still sending
(a 431, a 413) is read by a client that sends everything before it reads, instead of a reset; a
body that its answer did not wait for must still come within ``read_timeout_s``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

READ_TIMEOUT_S = 2.0
MAX_HEAD = 64 * 1024  # the defaults
MAX_HEADERS = 100
MAX_BODY = 4 * 1024 * 1024
CHAT = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("heads")
    cluster = Cluster(tmp)
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        yield start_gateway(cluster, Path(tmp), url, [Mock("p")], routes,
                            read_timeout_s=READ_TIMEOUT_S)  # fmt: skip
    finally:
        cluster.stop_all()


def port(gw: Gateway) -> int:
    return int(gw.urls[0].rsplit(":", 1)[1])


def exchange(gw: Gateway, raw: bytes, timeout: float = 10.0) -> tuple[bytes, OSError | None]:
    """Send all of ``raw``, then read until the replica closes: what came back, and the
    error sending met (None: it all went)."""
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=timeout) as s:
        # a small send buffer: what was sent has mostly reached the replica's side
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sent: OSError | None = None
        try:
            s.sendall(raw)
        except OSError as exc:
            sent = exc
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    return answer, sent


def responses(answer: bytes) -> list[tuple[int, bytes]]:
    """The status and body of each response in ``answer`` (bodies by Content-Length)."""
    out = []
    while answer:
        head, rest = answer.split(b"\r\n\r\n", 1)
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        if b"content-length" in fields:
            size = int(fields[b"content-length"])
        else:  # chunked, one chunk (what our JSON answers are)
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            rest = rest[:size] + rest[size + len(b"\r\n0\r\n\r\n") :]
        out.append((int(head.split(b" ")[1]), rest[:size]))
        answer = rest[size:]
    return out


def assert_431(answer: bytes, why: str) -> None:
    [(status, body)] = responses(answer)
    assert status == 431, answer[:300]
    err = orjson.loads(body)["error"]
    assert err["code"] == "request_header_fields_too_large"
    assert err["type"] == "invalid_request_error"
    assert why in err["message"]


def get(path: bytes = b"/healthz", *headers: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: x", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: x",
             b"Authorization: Bearer " + CLIENT_KEY.encode(),
             b"Content-Type: application/json", *headers]  # fmt: skip
    if not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CLOSE = b"Connection: close"


def test_a_header_past_max_head_bytes_gets_431(gw: Gateway) -> None:
    answer, _ = exchange(gw, get(b"/healthz", b"X-Big: " + b"a" * MAX_HEAD))
    assert_431(answer, f"over {MAX_HEAD} bytes")


def test_an_endless_header_gets_431_not_the_replicas_memory(gw: Gateway) -> None:
    # 8 MB of one header value, never ended: refused once 64 KiB have come
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(OSError):  # closed on us once past the drain bound
            for _ in range(128):
                s.sendall(b"a" * 65536)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    assert_431(answer, f"over {MAX_HEAD} bytes")


def test_a_request_line_past_max_head_bytes_gets_431(gw: Gateway) -> None:
    answer, _ = exchange(gw, get(b"/" + b"a" * MAX_HEAD))
    assert_431(answer, f"over {MAX_HEAD} bytes")


def test_more_header_lines_than_max_header_count_get_431(gw: Gateway) -> None:
    many = [b"X-%d: v" % i for i in range(MAX_HEADERS)]  # with Host: one too many
    answer, _ = exchange(gw, get(b"/healthz", *many))
    assert_431(answer, f"more than {MAX_HEADERS} header lines")


def test_too_many_header_lines_are_refused_before_the_head_ends(gw: Gateway) -> None:
    # lines that never end in a blank one: refused as they come, not kept to the deadline
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=READ_TIMEOUT_S / 2) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(MAX_HEADERS + 1):  # (a line is known to be whole once the next begins)
            s.sendall(b"X-%d: v\r\n" % i)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    assert_431(answer, f"more than {MAX_HEADERS} header lines")


def test_a_head_at_the_bounds_is_served(gw: Gateway) -> None:
    lines = [CLOSE, *(b"X-%d: v" % i for i in range(MAX_HEADERS - 3))]  # + Host = 99
    raw = get(b"/healthz", *lines, b"X-Pad: ")
    raw = raw[:-4] + b"a" * (MAX_HEAD - len(raw)) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD
    answer, _ = exchange(gw, raw)
    assert [status for status, _ in responses(answer)] == [200]


def test_a_head_near_the_bound_sent_with_its_body_is_served(gw: Gateway) -> None:
    # head and body in one write, read together: the head's end is found within the bound,
    # and what follows it is the body, not more head
    pad = b"X-Pad: " + b"a" * (MAX_HEAD - 500)
    raw = post(CHAT + b" " * 100_000, pad, CLOSE)
    assert MAX_HEAD - 400 < raw.index(b"\r\n\r\n") + 4 <= MAX_HEAD < len(raw)
    answer, _ = exchange(gw, raw)
    [(status, body)] = responses(answer)
    assert status == 200, body
    assert orjson.loads(body)["object"] == "chat.completion"


def test_every_request_of_a_connection_is_bounded(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=10) as s:
        s.sendall(get())
        first = b""
        while not first.endswith(b"}"):
            first += s.recv(65536)
        s.sendall(get(b"/healthz", b"X-Big: " + b"a" * MAX_HEAD))
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    assert responses(first)[0][0] == 200
    assert_431(answer, f"over {MAX_HEAD} bytes")


def test_a_431_is_read_by_a_client_that_sends_all_before_reading(gw: Gateway) -> None:
    # 1 MB of header sent in full first (a client with a huge cookie): the replica answers
    # at 64 KiB and reads the rest away, so the answer is not lost in a reset
    answer, sent = exchange(gw, get(b"/healthz", b"Cookie: " + b"a" * 1_000_000))
    assert sent is None
    assert_431(answer, f"over {MAX_HEAD} bytes")


def test_unparsable_http_gets_an_openai_shaped_400(gw: Gateway) -> None:
    answer, _ = exchange(gw, b"\x00\x01 garbage\r\n\r\n")
    [(status, body)] = responses(answer)
    assert status == 400
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_over_max_body_bytes_sent_in_full_gets_a_readable_413(
    gw: Gateway, framing: str
) -> None:
    # nearly twice the limit, sent before reading: the replica reads the rest away (up to
    # twice max_body_bytes) before it closes; a close at once reset the connection under us
    body = CHAT[:-2] + b', "pad": "' + b"x" * (2 * MAX_BODY - 100_000) + b'"}'
    if framing == "chunked":
        chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        raw = post(framed, b"Transfer-Encoding: chunked", CLOSE)
    else:
        raw = post(body, CLOSE)
    answer, sent = exchange(gw, raw)
    assert sent is None  # no reset while sending
    [(status, got)] = responses(answer)
    assert status == 413
    assert orjson.loads(got)["error"]["code"] == "request_too_large"


def test_a_refused_body_is_read_away_only_up_to_a_bound(gw: Gateway) -> None:
    # 64 MB declared and sent: answered at once, then at most max_body_bytes more are read
    # before the replica closes (the kernel's buffers hold some more; far from 64 MB)
    raw = post(b"x" * (64 << 20))
    started = time.monotonic()
    answer, sent = exchange(gw, raw)
    assert isinstance(sent, OSError)
    assert [status for status, _ in responses(answer)] == [413]
    assert time.monotonic() - started < READ_TIMEOUT_S + 5


def test_a_body_its_answer_did_not_wait_for_must_still_come_in_time(gw: Gateway) -> None:
    # no key: 401 at once; then the body trickles in, for ever. Without a bound the replica
    # read it as long as the client liked, holding the connection
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):
                    s.sendall(b"1\r\nx\r\n")

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            answer = b""
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    answer += chunk
            closed_after = time.monotonic() - started
        finally:
            stop.set()
            sender.join()
    assert [status for status, _ in responses(answer)] == [401]
    assert closed_after < READ_TIMEOUT_S + 3


MAX_PIPELINED = 16  # the default max_pipelined_requests


def test_pipelined_requests_are_answered_up_to_the_bound(gw: Gateway) -> None:
    # one answered at once, 16 waiting behind it: all served, in order
    answer, _ = exchange(gw, get() * MAX_PIPELINED + get(b"/healthz", CLOSE))
    assert [status for status, _ in responses(answer)] == [200] * (MAX_PIPELINED + 1)


def test_pipelining_past_the_bound_closes_the_connection(gw: Gateway) -> None:
    # 7,000 requests in one read were all queued, each with its head: a replica went from 64
    # to 425 MiB under eight such connections
    request = get()
    answer, _ = exchange(gw, request * (256 * 1024 // len(request)))
    assert len(responses(answer)) <= MAX_PIPELINED + 1
