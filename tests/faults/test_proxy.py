"""The fault-injecting proxy itself, against a plain echo server."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import Proxy, ProxyPool
from tests.helpers import wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the proxy may reset us: that is a test
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    with _Server(("127.0.0.1", 0), _Echo) as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        yield int(server.server_address[1])
        server.shutdown()
        thread.join(5)


def connect(proxy: Proxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.settimeout(5)
    return s


def echo(s: socket.socket, data: bytes = b"ping") -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_and_counts(proxy_factory: ProxyPool, echo_port: int) -> None:
    proxy = proxy_factory(echo_port)
    with connect(proxy) as a, connect(proxy) as b:
        assert echo(a, b"hello") == b"hello"
        assert echo(b, b"x" * 200_000) == b"x" * 200_000
        stats = proxy.stats()
        assert (stats.accepted, stats.active) == (2, 2)
        assert stats.bytes_up == stats.bytes_down == 200_005
    wait_until(lambda: proxy.stats().active == 0, 5, "the connections to end")


def test_disable_refuses_new_connections_enable_listens_again(
    proxy_factory: ProxyPool, echo_port: int
) -> None:
    proxy = proxy_factory(echo_port)
    with connect(proxy) as kept:
        assert echo(kept) == b"ping"  # accepted (a backlog that nobody accepted is dropped)
        proxy.disable()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert echo(kept) == b"ping"  # connections already made go on
        proxy.enable()
        with connect(proxy) as again:
            assert echo(again) == b"ping"


def test_cut_closes_and_reset_aborts(proxy_factory: ProxyPool, echo_port: int) -> None:
    proxy = proxy_factory(echo_port)
    with connect(proxy) as s:
        assert echo(s) == b"ping"
        assert proxy.cut() == 1
        assert s.recv(10) == b""  # a FIN
    with connect(proxy) as s:
        assert echo(s) == b"ping"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    stats = proxy.stats()
    assert (stats.cut, stats.reset, stats.active) == (1, 1, 0)


def test_blackhole_holds_then_drops_the_broken_connections(
    proxy_factory: ProxyPool, echo_port: int
) -> None:
    proxy = proxy_factory(echo_port)
    with connect(proxy) as quiet, connect(proxy) as talker:
        proxy.blackhole(True)
        talker.settimeout(0.3)
        with pytest.raises(TimeoutError):
            echo(talker)  # swallowed: no answer, and the connection stays open
        with connect(proxy) as late:  # still accepted while blackholed
            late.settimeout(0.3)
            with pytest.raises(TimeoutError):
                echo(late)
            proxy.blackhole(False)
            late.settimeout(5)
            assert late.recv(10) == b""  # it lost bytes: closed
        talker.settimeout(5)
        assert talker.recv(10) == b""
        assert echo(quiet) == b"ping"  # it lost nothing: it goes on
    assert proxy.stats().dropped == 8


def test_delay_holds_each_chunk(proxy_factory: ProxyPool, echo_port: int) -> None:
    proxy = proxy_factory(echo_port)
    proxy.delay(150)
    with connect(proxy) as s:
        started = time.monotonic()
        assert echo(s) == b"ping"
        took = time.monotonic() - started
    assert took >= 0.3  # once up, once down
    proxy.delay(0)
    with connect(proxy) as s:
        started = time.monotonic()
        assert echo(s) == b"ping"
        assert time.monotonic() - started < 0.3
