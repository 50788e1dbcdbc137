"""What an upstream HTTP client costs in the router's place: ours against the libraries.

    python -m loadtest.client_cost [--duration S] [--concurrency N] [--rounds R]
        [--client NAME ...] [--case whole|stream] [--extra-site DIR] [--json FILE]
    python -m loadtest.client_cost --table FILE    (the tables of a saved run)
    python -m loadtest.client_cost --hostile [--client NAME ...]
    python -m loadtest.client_cost --caps [--client NAME ...]

Each client is put where ``router/upstream/client.py`` is: one asyncio process (uvloop, as
the replica runs) pinned to core 0 with taskset, as ``loadtest.bench`` pins the replica,
keeping N POSTs in flight through one shared client (keep-alive, its connection cap set to
N), a ~400-byte chat body and two headers each. Two cases:

- ``whole``: an nginx (``loadtest.bench``'s upstream rig, core 1) answers a fixed ~600-byte
  ``chat.completion``; the client reads it whole.
- ``stream``: an SSE server (this module, ``--serve-sse``, uvloop on core 1) answers with 50
  ``chat.completion.chunk`` events and ``[DONE]``, chunked, one event per connection every
  ``--tick-ms`` (2 ms): each event arrives on its own, as a provider's do, and the client
  reads the body chunk by chunk, as the replica relays it. Its requests/s are set by the
  pacing (about N / 0.1 s); what differs is the CPU a stream costs.

A worker measures itself over ``--duration`` seconds after a warm-up of ``--warm`` seconds
(connections open): the requests completed in that window, the process's CPU time in it
(``getrusage``: every thread, so a Rust client's runtime threads too), each request's
latency (for a stream, also the time to its first chunk), and its resident memory at the
window's end, absolute and over what it held before importing the client library. Every
answer is checked (status 200, the whole body, byte for byte in length). The clients take
turns in each round, in an order rotated every round, so the machine's drift falls on all
(as ``loadtest/ab.py`` does); the table gives means over the rounds and each client's ratio
to ours (req/s: higher is better; CPU per 1,000 requests: lower is better).

The candidate libraries are not dependencies of the router: install them for the
measurement (``pip install 'router-cluster[bench-clients]'``); a client whose library is
missing is named and skipped. niquests brings urllib3-future, which overwrites urllib3 in
the environment it is installed into (a ``.pth`` file that does it again at every start):
install it apart, ``URLLIB3_NO_OVERRIDE=1 pip install --target DIR niquests urllib3-future``,
and pass ``--extra-site DIR`` (appended to the workers' ``sys.path``, after the venv's).

``--caps`` checks each client's connection cap: 32 requests in flight through a cap of 4,
against a loopback server (in the process) that counts the connections open at once.

``--hostile`` measures nothing of speed: each client reads whole, its natural way, the
answers of ``tests/faults/hostile.py`` that a whole read meets (1 GiB bodies, a 200 or a 500,
a gzip bomb, headers that never end or never stop coming) and the table says what came of it
within 8 s and how much the peak RSS grew.

Needs nginx and taskset, as ``loadtest.bench`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Only the standard library at the top: a worker's memory is measured over what it held
# before it imported its client, so the rig's imports (loadtest.bench: httpx, redis) wait
# in the functions that run the rig.

CASES = ("whole", "stream")
CHUNKS = 50
TICK_MS = 2.0
REQUEST_BODY = {
    "model": "bench-model",
    "messages": [
        {
            "role": "system",
            "content": "You are a helpful assistant. Answer briefly and precisely, in plain "
            "English, without lists.",
        },
        {
            "role": "user",
            "content": "Which of the planets of the solar system has the shortest day, "
            "and how long is that day in Earth hours? One sentence, please.",
        },
    ],
    "max_tokens": 64,
    "temperature": 0.2,
    "user": "bench-user-0001",
    "stream": False,
}
ANSWER = {
    "id": "chatcmpl-bench-0123456789abcdef",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "system_fingerprint": "fp_bench",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Jupiter has the shortest day of the planets in the solar system: "
                "it turns once on its axis in about 9.9 Earth hours, which is less than half "
                "of an Earth day, although it is by far the largest planet of all of them; Saturn "
                "comes second.",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 41, "completion_tokens": 52, "total_tokens": 93},
}
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-0123456789"}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sse_events(n: int = CHUNKS) -> list[bytes]:
    """The stream's events: ``n`` chunks of one token, then ``[DONE]``."""
    out = []
    for i in range(n):
        chunk = {
            "id": "chatcmpl-bench-0123456789abcdef",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {"content": f"tok{i:03d} "}, "finish_reason": None}],
        }
        out.append(b"data: " + _dumps(chunk) + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


# ---------------------------------------------------------------------------- the clients


async def count_chunks(chunks: AsyncIterable[bytes]) -> tuple[int, int, float]:
    """A stream read as it comes: its bytes, its reads, and when the first came."""
    size = reads = 0
    first = 0.0
    async for chunk in chunks:
        if not reads:
            first = time.perf_counter()
        reads += 1
        size += len(chunk)
    return size, reads, first


class Client(Protocol):
    async def open(self, url: str, n: int) -> None: ...

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        """POST and read the answer whole: (status, body bytes)."""
        ...

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        """POST and read the answer chunk by chunk: (status, body bytes, chunks read, the
        ``perf_counter`` of the first chunk)."""
        ...

    async def close(self) -> None: ...


class Ours:
    """``router.upstream.client.Upstream``, called as the replica calls it."""

    async def open(self, url: str, n: int) -> None:
        from router.config import Provider
        from router.upstream.client import Upstream
        from router.upstream.providers.base import UpstreamRequest

        self.request = UpstreamRequest
        self.provider = Provider(name="bench", kind="openai", base_url=url, max_connections=n)
        self.upstream = Upstream()
        await self.upstream.start({})

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        p = self.provider
        deadline = asyncio.get_running_loop().time() + 30
        req = self.request(url, dict(HEADERS), body)
        resp = await self.upstream.send(req, p.timeouts, deadline, p.bounds, p)
        async with resp:
            data = await resp.read(deadline)
        return resp.status, len(data)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        p = self.provider
        deadline = asyncio.get_running_loop().time() + 30
        req = self.request(url, dict(HEADERS), body)
        resp = await self.upstream.send(req, p.timeouts, deadline, p.bounds, p)
        async with resp:
            size, reads, first = await count_chunks(resp.chunks())
        return resp.status, size, reads, first

    async def close(self) -> None:
        await self.upstream.close()


class Aiohttp:
    async def open(self, url: str, n: int) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=n, limit_per_host=n)
        self.session = aiohttp.ClientSession(connector=connector, headers=HEADERS)

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        async with self.session.post(url, data=body) as resp:
            data = await resp.read()
            return resp.status, len(data)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        async with self.session.post(url, data=body) as resp:
            size, reads, first = await count_chunks(resp.content.iter_any())
            return resp.status, size, reads, first

    async def close(self) -> None:
        await self.session.close()


class Httpx:
    async def open(self, url: str, n: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self.client = httpx.AsyncClient(limits=limits, headers=HEADERS, timeout=30)

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.client.post(url, content=body)
        return resp.status_code, len(resp.content)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        async with self.client.stream("POST", url, content=body) as resp:
            size, reads, first = await count_chunks(resp.aiter_bytes())
            return resp.status_code, size, reads, first

    async def close(self) -> None:
        await self.client.aclose()


class Pyreqwest:
    async def open(self, url: str, n: int) -> None:
        from pyreqwest.client import ClientBuilder

        self.client = ClientBuilder().max_connections(n).default_headers(HEADERS).build()

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.client.post(url).body_bytes(body).build().send()
        data = await resp.bytes()
        return resp.status, len(data)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        size = reads = 0
        first = 0.0
        # its default buffers up to 64 KiB (or the whole answer) before returning: a relay
        # must not wait for that
        request = self.client.post(url).body_bytes(body).streamed_read_buffer_limit(0)
        async with request.build_streamed() as resp:
            reader = resp.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                if not reads:
                    first = time.perf_counter()
                reads += 1
                size += len(chunk)
            return resp.status, size, reads, first

    async def close(self) -> None:
        await self.client.close()


class Rnet:
    async def open(self, url: str, n: int) -> None:
        import rnet

        self.client = rnet.Client(
            default_headers=HEADERS, pool_max_size=n, pool_max_idle_per_host=n, http1_only=True
        )

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.client.post(url, body=body)
        async with resp:
            data = await resp.bytes()
            return resp.status, len(data)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        resp = await self.client.post(url, body=body)
        async with resp, resp.stream() as chunks:
            size, reads, first = await count_chunks(chunks)
            return resp.status, size, reads, first

    async def close(self) -> None:
        pass


class Niquests:
    async def open(self, url: str, n: int) -> None:
        import niquests

        self.session = niquests.AsyncSession(pool_connections=1, pool_maxsize=n, retries=0)
        self.session.headers.update(HEADERS)

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.session.post(url, data=body)
        return int(resp.status_code or 0), len(resp.content or b"")

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        resp = await self.session.post(url, data=body, stream=True)
        size, reads, first = await count_chunks(await resp.iter_content())  # -1: as they come
        await resp.close()
        return int(resp.status_code or 0), size, reads, first

    async def close(self) -> None:
        await self.session.close()


class CurlCffi:
    async def open(self, url: str, n: int) -> None:
        from curl_cffi.requests import AsyncSession

        self.session = AsyncSession(max_clients=n, headers=HEADERS)

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.session.post(url, data=body)
        return resp.status_code, len(resp.content)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        async with self.session.stream("POST", url, data=body) as resp:
            size, reads, first = await count_chunks(resp.aiter_content())
            return resp.status_code, size, reads, first

    async def close(self) -> None:
        await self.session.close()


class Aiosonic:
    async def open(self, url: str, n: int) -> None:
        import aiosonic
        from aiosonic.pools import PoolConfig

        pools = {":default": PoolConfig(size=n, max_conn_requests=None)}
        self.client = aiosonic.HTTPClient(aiosonic.TCPConnector(pool_configs=pools))

    async def whole(self, url: str, body: bytes) -> tuple[int, int]:
        resp = await self.client.post(url, data=body, headers=HEADERS)
        data = await resp.content()
        return resp.status_code, len(data)

    async def stream(self, url: str, body: bytes) -> tuple[int, int, int, float]:
        resp = await self.client.post(url, data=body, headers=HEADERS)
        size, reads, first = await count_chunks(resp.read_chunks())
        return resp.status_code, size, reads, first

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True)
class Candidate:
    name: str
    module: str
    """The import that must work for it to run."""
    pip: str
    """What to install (PyPI)."""
    make: Callable[[], Client]


CLIENTS = (
    Candidate("ours", "httptools", "(the router's own)", Ours),
    Candidate("aiohttp", "aiohttp", "aiohttp", Aiohttp),
    Candidate("httpx", "httpx", "httpx", Httpx),
    Candidate("pyreqwest", "pyreqwest", "pyreqwest", Pyreqwest),
    Candidate("rnet", "rnet", "rnet", Rnet),
    Candidate("niquests", "niquests", "niquests (apart: see --extra-site)", Niquests),
    Candidate("curl_cffi", "curl_cffi", "curl-cffi", CurlCffi),
    Candidate("aiosonic", "aiosonic", "aiosonic", Aiosonic),
)
BY_NAME = {c.name: c for c in CLIENTS}


# ---------------------------------------------------------------------------- a worker


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


class _Tally:
    """The answers completed in the measured window: counts, latencies, failures."""

    def __init__(self, expected: int, window: tuple[float, float]) -> None:
        self.expected = expected
        self.window = window
        self.done = self.reads = self.bad = 0
        self.lat: list[float] = []
        self.ttfc: list[float] = []
        self.errors: list[str] = []

    def failed(self, why: str) -> None:
        self.bad += 1
        if len(self.errors) < 3:
            self.errors.append(why[:300])

    def answered(self, t0: float, status: int, size: int, reads: int, first: float) -> None:
        t1 = time.perf_counter()
        if status != 200 or size != self.expected:
            self.failed(f"status {status}, {size} bytes (expected {self.expected})")
        elif self.window[0] <= t1 < self.window[1]:
            self.done += 1
            self.reads += reads
            self.lat.append(t1 - t0)
            if first:
                self.ttfc.append(first - t0)


async def _call(client: Client, case: str, url: str, body: bytes) -> tuple[int, int, int, float]:
    """One request of ``case``: (status, body bytes, chunks read, first chunk's time)."""
    if case == "whole":
        status, size = await client.whole(url, body)
        return status, size, 1, 0.0
    return await client.stream(url, body)


async def drive(
    client: Client, case: str, url: str, n: int, warm: float, duration: float, rss0_kb: int
) -> dict[str, Any]:
    """N tasks, each posting in a loop until the window ends; the figures of the window."""
    body = _dumps(REQUEST_BODY)
    expected = len(_dumps(ANSWER)) if case == "whole" else sum(map(len, sse_events()))
    await client.open(url, n)
    started = time.perf_counter()
    tally = _Tally(expected, (started + warm, started + warm + duration))

    async def one() -> None:
        while (t0 := time.perf_counter()) < tally.window[1]:
            try:
                answer = await _call(client, case, url, body)
            except Exception as exc:  # a client's failure is counted and shown, not fatal
                tally.failed(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)
                continue
            tally.answered(t0, *answer)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(warm)
    cpu0 = _cpu()
    await asyncio.sleep(duration)
    cpu1 = _cpu()
    rss_kb = _status_kb("VmRSS")
    await asyncio.gather(*tasks)
    await client.close()
    done = tally.done
    return {
        "requests": done,
        "bad": tally.bad,
        "errors": tally.errors,
        "rps": done / duration,
        "cpu_s_per_1k": (cpu1 - cpu0) * 1000 / done if done else None,
        "cpu_util": (cpu1 - cpu0) / duration,
        "p50_ms": _pct(tally.lat, 50) * 1000,
        "p99_ms": _pct(tally.lat, 99) * 1000,
        "ttfc_p50_ms": _pct(tally.ttfc, 50) * 1000 if tally.ttfc else None,
        "reads_per_req": tally.reads / done if done else None,
        "rss_mb": rss_kb / 1024,
        "rss_added_mb": (rss_kb - rss0_kb) / 1024,
    }


def worker(name: str, case: str, url: str, n: int, warm: float, duration: float) -> None:
    """Run one client in this process (uvloop) and print its figures as one JSON line."""
    import uvloop

    rss0 = _status_kb("VmRSS")
    client = BY_NAME[name].make()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(drive(client, case, url, n, warm, duration, rss0))
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- SSE server


class _SseConnection(asyncio.Protocol):
    """Answers each POST with a chunked SSE stream, one event per tick of ``SseServer``."""

    def __init__(self, server: SseServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", self.buf[:end])
            size = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + size:
                return
            self.buf = self.buf[end + 4 + size :]
            assert self.transport is not None
            self.transport.write(SseServer.HEAD)
            self.server.active.append([self, 0])


class SseServer:
    HEAD = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )

    def __init__(self) -> None:
        self.active: list[list[Any]] = []
        events = sse_events()
        self.frames = [f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events]
        self.frames[-1] += b"0\r\n\r\n"

    async def serve(self, port: int, tick_ms: float) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SseConnection(self), "127.0.0.1", port)
        async with server:
            while True:
                await asyncio.sleep(tick_ms / 1000)
                self.tick()

    def tick(self) -> None:
        """Each open stream's next event; the streams that sent their last are done."""
        keep = []
        for entry in self.active:
            conn, i = entry
            if conn.transport.is_closing():
                continue
            conn.transport.write(self.frames[i])
            entry[1] = i + 1
            if i + 1 < len(self.frames):
                keep.append(entry)
        self.active = keep


def serve_sse(port: int, tick_ms: float) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(SseServer().serve(port, tick_ms))


# ---------------------------------------------------------------------------- the rig


def available(extra_site: str | None) -> tuple[list[str], list[Candidate]]:
    """The clients that can run here, and those whose library is missing."""
    if extra_site and extra_site not in sys.path:
        sys.path.append(extra_site)
    ok, missing = [], []
    for c in CLIENTS:
        (ok if importlib.util.find_spec(c.module) is not None else missing).append(c)
    return [c.name for c in ok], missing


def run_worker(opts: argparse.Namespace, name: str, case: str, url: str) -> dict[str, Any]:
    from loadtest import bench

    argv = ["taskset", "-c", bench.SUT_CPU, sys.executable, "-m", "loadtest.client_cost",
            "--worker", name, "--case", case, "--url", url, "--concurrency", str(opts.concurrency),
            "--warm", str(opts.warm), "--duration", str(opts.duration)]  # fmt: skip
    env = bench.child_env()
    if opts.extra_site:
        env["CLIENT_COST_EXTRA_SITE"] = opts.extra_site
    noise = bench.Noise()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=bench.ROOT,
                          timeout=opts.warm + opts.duration + 120)  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-800:]}"}
    return {**json.loads(line[7:]), **noise.done()}


def rotated(names: Sequence[str], k: int) -> list[str]:
    """``names`` rotated by ``k``: each round starts with another client."""
    k %= len(names)
    return [*names[k:], *names[:k]]


def measure_all(opts: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Every client on every case, round after round; the per-round figures."""
    from loadtest import bench
    from loadtest.procs import free_port

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {n: [] for n in names} for c in opts.case
    }
    loads = []
    with tempfile.TemporaryDirectory() as tmp, bench.Rig(Path(tmp)) as rig:
        port, stub = free_port(), free_port()
        servers = bench.upstream_servers([port], stub, ANSWER)
        bench.start_nginx(rig, "nginx-upstream", servers, [port, stub], bench.LOAD_CPU)
        sse_port = free_port()
        argv = [sys.executable, "-m", "loadtest.client_cost", "--serve-sse", str(sse_port),
                "--tick-ms", str(opts.tick_ms)]  # fmt: skip
        sse = rig.start("sse", argv, bench.LOAD_CPU)
        bench.wait_until(lambda: bench.port_open(sse_port), "the SSE server to listen", sse)
        urls = {
            "whole": f"http://127.0.0.1:{port}/v1/chat/completions",
            "stream": f"http://127.0.0.1:{sse_port}/v1/chat/completions",
        }
        for k in range(opts.rounds):
            for case in opts.case:
                for name in rotated(names, k):
                    res = run_worker(opts, name, case, urls[case])
                    runs[case][name].append(res)
                    print(f"round {k + 1} {case:6} {round_line(name, res)}", flush=True)
            loads.append(os.getloadavg())
    return {"runs": runs, "loadavg": loads}


def round_line(name: str, r: dict[str, Any]) -> str:
    if "failed" in r:
        return f"{name:10} FAILED {r['failed']}"
    cpu = r["cpu_s_per_1k"]
    return (
        f"{name:10} {r['rps']:8.0f} req/s  {cpu if cpu is None else f'{cpu:.4f}'} CPU s/1k  "
        f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  RSS {r['rss_mb']:.0f} MB "
        f"(+{r['rss_added_mb']:.0f})  core {r['cpu_util'] * 100:.0f} %  "
        f"foreign {r.get('foreign_cpu_pct', 0)} %  bad {r['bad']}"
        + (f"  {r['errors'][0]}" if r["errors"] else "")
    )


# ---------------------------------------------------------------------------- hostile answers


HOSTILE_MODES = ("huge_body", "gzip_bomb", "endless_headers", "many_headers", "huge_error")
"""The answers of ``tests/faults/hostile.py`` a whole read meets (1 GiB bodies, a gzip bomb of
1 GiB in 1 MB, headers that never end)."""
HOSTILE_LIMIT_S = 8.0


def hostile_one(name: str, mode: str) -> None:
    """One client's natural whole read of one hostile answer: what came of it, how long it
    took and how much the peak RSS grew (one JSON line)."""
    import uvloop

    from tests.faults.hostile import Hostile

    async def attempt(url: str) -> tuple[str, float, int]:
        client = BY_NAME[name].make()
        await client.open(url, 4)
        base, t0 = _status_kb("VmHWM"), time.monotonic()
        try:
            call = client.whole(url, _dumps(REQUEST_BODY))
            status, size = await asyncio.wait_for(call, HOSTILE_LIMIT_S)
            out = f"read it: status {status}, {size >> 20} MiB"
        except TimeoutError:
            out = f"still reading after {HOSTILE_LIMIT_S:g} s"
        except Exception as exc:
            out = f"refused: {type(exc).__name__}: {str(exc)[:60]}"
        took = time.monotonic() - t0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)
        return out, took, (_status_kb("VmHWM") - base) // 1024

    with Hostile() as hostile:
        hostile.mode = mode
        url = hostile.base_url + "/chat/completions"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out, took, grew = runner.run(attempt(url))
    print("RESULT " + json.dumps([out, round(took, 1), grew]), flush=True)


def hostile(opts: argparse.Namespace, names: list[str]) -> None:
    """Every client against every hostile answer, each attempt in its own process."""
    print("| answer | client | seconds | peak RSS grew MB | outcome |\n|---|---|---|---|---|")
    for mode in HOSTILE_MODES:
        for name in names:
            argv = [sys.executable, "-m", "loadtest.client_cost", "--hostile-one", name, mode]
            env = {**os.environ, "CLIENT_COST_EXTRA_SITE": opts.extra_site or ""}
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"| {mode} | {name} | | | failed: exit {done.returncode} |", flush=True)
                continue
            out, took, grew = json.loads(line[7:])
            out = out.replace("|", "/").replace("\n", " ")
            print(f"| {mode} | {name} | {took} | {grew} | {out} |", flush=True)


# ---------------------------------------------------------------------------- connection caps


CAP = 4


class _Counting(asyncio.Protocol):
    """Answers each request with ``ANSWER`` 2 ms later; counts the connections open."""

    open = peak = opened = 0
    answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""
        cls = type(self)
        cls.open += 1
        cls.opened += 1
        cls.peak = max(cls.peak, cls.open)

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).open -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", self.buf[:end])
            size = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + size:
                return
            self.buf = self.buf[end + 4 + size :]
            asyncio.get_running_loop().call_later(0.002, self.transport.write, self.answer)


async def cap_check(name: str, n: int = 32, each: int = 30) -> str:
    """``n`` requests in flight through ``name`` with a cap of ``CAP``: what was opened."""
    body = _dumps(ANSWER)
    _Counting.answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    ) + body
    _Counting.open = _Counting.peak = _Counting.opened = 0
    server = await asyncio.get_running_loop().create_server(_Counting, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    client = BY_NAME[name].make()
    await client.open(url, CAP)
    failed = 0

    async def one() -> None:
        nonlocal failed
        for _ in range(each):
            try:
                status, size = await client.whole(url, _dumps(REQUEST_BODY))
                failed += status != 200 or size != len(body)
            except Exception:
                failed += 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 60)
    await client.close()
    server.close()
    return (
        f"| {name} | {CAP} | {_Counting.peak} | {_Counting.opened} | {n * each - failed} "
        f"of {n * each} |"
    )


def caps(names: list[str]) -> None:
    import uvloop

    print("| client | cap | most open at once | opened | answered |\n|---|---|---|---|---|")
    for name in names:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            print(runner.run(cap_check(name)), flush=True)


# ---------------------------------------------------------------------------- the table


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per client: the means over its good rounds (medians of the latencies)."""
    out: dict[str, dict[str, Any]] = {}
    for name, rounds in runs.items():
        good = [r for r in rounds if "failed" not in r and r["requests"] and not r["bad"]]
        if not good:
            why = next((r.get("failed") or r["errors"][:1] for r in rounds), "no round")
            out[name] = {"failed": str(why)}
            continue
        out[name] = {
            "rounds": len(good),
            "rps": statistics.mean(r["rps"] for r in good),
            "rps_min": min(r["rps"] for r in good),
            "rps_max": max(r["rps"] for r in good),
            "cpu_s_per_1k": statistics.mean(r["cpu_s_per_1k"] for r in good),
            "core_pct": statistics.mean(r["cpu_util"] for r in good) * 100,
            "p50_ms": statistics.median(r["p50_ms"] for r in good),
            "p99_ms": statistics.median(r["p99_ms"] for r in good),
            "ttfc_p50_ms": statistics.median(r["ttfc_p50_ms"] or 0.0 for r in good),
            "reads_per_req": statistics.mean(r["reads_per_req"] for r in good),
            "rss_mb": statistics.mean(r["rss_mb"] for r in good),
            "rss_added_mb": statistics.mean(r["rss_added_mb"] for r in good),
            "foreign_cpu_pct": statistics.mean(r.get("foreign_cpu_pct", 0.0) for r in good),
        }
    return out


def table(case: str, summary: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of one case, each client against ``ours``."""
    base = summary.get("ours", {})
    stream = case == "stream"
    head = (
        "| client | req/s | ratio | CPU s / 1k req | ratio | core % | p50 ms | p99 ms | "
        + ("first chunk p50 ms | chunks read / req | " if stream else "")
        + "RSS MB (added) | others' CPU % | rounds |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary.items():
        if "failed" in s:
            lines.append(f"| {name} | failed: {s['failed'][:80]} |")
            continue
        rps_ratio = s["rps"] / base["rps"] if base.get("rps") else None
        cpu_ratio = s["cpu_s_per_1k"] / base["cpu_s_per_1k"] if base.get("cpu_s_per_1k") else None
        extra = f"{s['ttfc_p50_ms']:.2f} | {s['reads_per_req']:.1f} | " if stream else ""
        lines.append(
            f"| {name} | {s['rps']:,.0f} ({s['rps_min']:,.0f}-{s['rps_max']:,.0f}) | "
            f"{_ratio(rps_ratio)} | {s['cpu_s_per_1k']:.4f} | {_ratio(cpu_ratio)} | "
            f"{s['core_pct']:.0f} | "
            f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {extra}"
            f"{s['rss_mb']:.0f} (+{s['rss_added_mb']:.0f}) | {s['foreign_cpu_pct']:.0f} | "
            f"{s['rounds']} |"
        )
    return lines


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds a run")
    parser.add_argument("--warm", type=float, default=1.0, help="warm-up seconds a run")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (N)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--client", action="append", choices=list(BY_NAME), help="only these")
    parser.add_argument("--case", action="append", choices=CASES, help="whole, stream (both)")
    parser.add_argument("--tick-ms", type=float, default=TICK_MS, help="the SSE pacing")
    parser.add_argument("--extra-site", help="a directory appended to sys.path (niquests)")
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    parser.add_argument("--table", type=Path, help="only print the tables of a --json file")
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="instead: each client's whole read of hostile answers",
    )
    parser.add_argument("--hostile-one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--caps", action="store_true", help=f"instead: does each client's cap ({CAP}) hold?"
    )
    parser.add_argument("--worker", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--serve-sse", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.concurrency < 1 or opts.duration <= 0 or opts.rounds < 1:
        parser.error("--concurrency, --duration and --rounds must be positive")
    opts.case = opts.case or list(CASES)
    opts.extra_site = opts.extra_site or os.environ.get("CLIENT_COST_EXTRA_SITE")
    return opts


def one_process(opts: argparse.Namespace) -> bool:
    """Run what the rig starts in a process of its own (or ``--table``), if that was asked."""
    if opts.serve_sse:
        serve_sse(opts.serve_sse, opts.tick_ms)
    elif opts.table:
        report(json.loads(opts.table.read_text()))
    elif opts.hostile_one:
        available(opts.extra_site)
        hostile_one(*opts.hostile_one)
    elif opts.worker:
        available(opts.extra_site)
        worker(opts.worker, opts.case[0], opts.url, opts.concurrency, opts.warm, opts.duration)
    else:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if one_process(opts):
        return 0
    from loadtest import bench

    names, missing = available(opts.extra_site)
    for c in missing:
        if not opts.client or c.name in opts.client:
            print(f"client_cost: {c.name} is not installed (pip install {c.pip}); skipped")
    names = [n for n in names if not opts.client or n in opts.client]
    if not names:
        return 1
    if opts.hostile:
        hostile(opts, names)
        return 0
    if opts.caps:
        caps(names)
        return 0
    bench.require_tools(["nginx", "taskset"])
    print(f"clients: {', '.join(names)}; N={opts.concurrency}, {opts.rounds} rounds of "
          f"{opts.duration:g} s; loadavg {os.getloadavg()}", flush=True)  # fmt: skip
    res = measure_all(opts, names)
    if opts.json:
        opts.json.write_text(json.dumps({"args": sys.argv[1:], **res}, indent=1))
    report(res)
    return 0


def report(res: dict[str, Any]) -> None:
    """Print the tables of a run (``measure_all``'s figures, or a ``--json`` file's)."""
    for case, runs in res["runs"].items():
        print(f"\n{case}:")
        print("\n".join(table(case, summarize(runs))))
    loads = ", ".join(f"{a:.2f}" for a, _, _ in res["loadavg"])
    print(f"\nloadavg (1 min) after each round: {loads}")


if __name__ == "__main__":
    sys.exit(main())
