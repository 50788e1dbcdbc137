"""Clients without a key flood a replica with request heads: huge headers, endless header
lines, heads trickled in slowly, and hundreds of pipelined requests per read. The replica's
memory stays under twice its idle size and another client is served throughout.

Before the bounds (``max_head_bytes``, ``max_header_count``, ``max_pipelined_requests``), four
connections each sending one endless header took a replica from 63 MiB to 4.7 GB in 9 s: the
head was kept whole until it ended, and only then was the key checked. The attack stops as
soon as the replica passes the bound, so this test fails fast instead of exhausting the host.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.faults.support import CHAT, start
from tests.helpers import Cluster, Gateway, Mock, auth

ATTACK_S = 8.0
RSS_FACTOR = 2.0
SERVED_BOUND_S = 5.0
"""A normal client must be served within this while the flood goes on."""
HUGE_HEADS = 4
MANY_HEADERS = 4
SLOW_HEADS = 100
PIPELINERS = 2


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``) or its peak (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field_name)


def reset_peak(pid: int) -> bool:
    """Start the kernel's peak-RSS count (``VmHWM``) afresh; False where it cannot."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Rig:
    gw: Gateway

    @property
    def url(self) -> str:
        return self.gw.urls[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.gw.replicas[0][0].pid


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Rig]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("flood")
    cluster = Cluster(tmp)
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    try:
        yield Rig(start(cluster, tmp, f"redis://127.0.0.1:{redis_port}/0", [Mock("p")], routes))
    finally:
        cluster.stop_all()


@dataclass
class Flood:
    """The attackers' threads, their tally of answers, and when to stop."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    answers: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tally(self, kind: str, answer: bytes) -> None:
        first = answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else "closed"
        with self.lock:
            self.answers[f"{kind}: {first}"] += 1

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        return s

    def endless(self, kind: str, start: bytes, piece: bytes) -> None:
        """Send ``start``, then ``piece`` until the replica stops reading; again and again."""
        while not self.stop.is_set():
            with self.connect() as s:
                with contextlib.suppress(OSError):
                    s.sendall(start)
                    while not self.stop.is_set():
                        s.sendall(piece)
                self.tally(kind, read_some(s))

    def huge_head(self) -> None:
        self.endless("huge head", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 65536)

    def many_headers(self) -> None:
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(8000))
        self.endless("many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", lines)

    def pipelined(self) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        self.endless("pipelined", b"", request * (256 * 1024 // len(request)))

    def slow_heads(self) -> None:
        """``SLOW_HEADS`` connections, each sent 1 KiB of header every 50 ms: one line, or
        200 short ones."""
        pieces = [b"X-Slow: " + b"s" * 1014 + b"\r\n", b"a:b\r\n" * 200]
        held: list[socket.socket] = []
        sel = selectors.DefaultSelector()
        try:
            while not self.stop.is_set():
                while len(held) < SLOW_HEADS:
                    s = self.connect()
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                    held.append(s)
                for key, _ in sel.select(timeout=0.05):  # answered (a 431) or closed
                    s = held.pop(held.index(key.fileobj))  # type: ignore[arg-type]
                    sel.unregister(s)
                    self.tally("slow head", read_some(s))
                    s.close()
                for i, s in enumerate(held):
                    with contextlib.suppress(OSError):
                        s.send(pieces[i % 2])
        finally:
            for s in held:
                s.close()
            sel.close()


def errors_logged(rig: Rig) -> list[str]:
    """The replica's log lines at error level or above."""
    lines = rig.gw.replicas[0][0].output().splitlines()
    return [x for x in lines if '"level":"error"' in x or '"level":"critical"' in x]


def read_some(s: socket.socket) -> bytes:
    """What the replica sent on ``s`` until it closed (or a second of silence)."""
    s.settimeout(1)  # (blocking again)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def threads(flood: Flood) -> list[threading.Thread]:
    plan: list[tuple[Callable[[], None], int]] = [
        (flood.huge_head, HUGE_HEADS), (flood.many_headers, MANY_HEADERS),
        (flood.pipelined, PIPELINERS), (flood.slow_heads, 1),
    ]  # fmt: skip
    return [threading.Thread(target=f, daemon=True) for f, n in plan for _ in range(n)]


def warm_up(rig: Rig) -> None:
    """Every path the flood takes, once, so that idle memory includes what they load."""
    with httpx.Client(headers=auth(), timeout=10) as c:
        for _ in range(50):
            assert c.post(f"{rig.url}/v1/chat/completions", json=CHAT).status_code == 200
    flood = Flood(rig.port)
    for raw in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
                b"\x00garbage\r\n\r\n"):  # fmt: skip
        with flood.connect() as s:
            s.sendall(raw)
            read_some(s)


@pytest.mark.slow
def test_a_head_flood_leaves_memory_bounded_and_others_served(rig: Rig) -> None:
    warm_up(rig)
    idle = rss_mib(rig.pid)
    bound = RSS_FACTOR * idle
    logged = len(errors_logged(rig))
    exact_peak = reset_peak(rig.pid)
    flood = Flood(rig.port)
    attackers = threads(flood)
    for t in attackers:
        t.start()
    served: list[float] = []
    failed: list[str] = []
    sampled = idle
    started = time.monotonic()
    try:
        with httpx.Client(headers=auth(), timeout=SERVED_BOUND_S) as c:
            while time.monotonic() - started < ATTACK_S and not failed:
                t0 = time.monotonic()
                try:
                    r = c.post(f"{rig.url}/v1/chat/completions", json=CHAT)
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))
                else:
                    served.append(time.monotonic() - t0)
                    if r.status_code != 200:
                        failed.append(f"{r.status_code} {r.text[:200]}")
                sampled = max(sampled, rss_mib(rig.pid))
                if sampled > bound:
                    break  # fail now, not once the host is out of memory
                time.sleep(0.05)
    finally:
        flood.stop.set()
        for t in attackers:
            t.join(15)
    peak = rss_mib(rig.pid, "VmHWM") if exact_peak else sampled
    print(f"\nidle {idle:.0f} MiB, peak {peak:.0f} MiB under the flood (sampled {sampled:.0f}); "
          f"{len(served)} requests served in at most {max(served, default=0) * 1000:.0f} ms, "
          f"failed: {failed}; attackers got {dict(flood.answers)}")  # fmt: skip
    assert peak < bound, f"peak {peak:.0f} MiB, idle {idle:.0f} MiB"
    assert failed == []
    assert max(served) < SERVED_BOUND_S
    assert len(served) >= 10
    for kind in ("huge head", "many headers", "slow head"):
        assert flood.answers[f"{kind}: HTTP/1.1 431 Request Header Fields Too Large"] > 0, kind
    assert rig.gw.replicas[0][0].popen.poll() is None
    assert errors_logged(rig)[logged:] == []
