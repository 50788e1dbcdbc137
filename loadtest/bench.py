"""The router against its performance targets, on a private loopback rig, in one command.

    python -m loadtest.bench [--quick] [--duration S] [--profile] [--peers | --peers-only]

Everything runs as private processes in a temporary directory, on loopback only, each load
bounded in time; nothing touches the machine's own nginx or Redis:

    wrk (core 1) --> (a) nginx upstream ............................... (core 1)
                 --> (b) nginx proxy (core 0) ---------------------------> nginx upstream
                 --> (c, d) router (core 0) ---------------------------> nginx upstream
                                         `--> redis-server (core 1)
                 --> (e) two routers (cores 0 and 1, SO_REUSEPORT), wrk unpinned
                 --> (peers) LiteLLM, Portkey's gateway (core 0) --------> nginx upstream

The upstream is nginx answering a fixed ``chat.completion`` (with usage) on three ports. The
system under test has core 0 to itself; wrk, the upstream and Redis share core 1. Compared in
one run: (a) upstream direct, (b) an nginx proxy hop (the one-hop limit), (c) one router
replica on round_robin, (d) the other four strategies, (e) two replicas; plus the decision log
at INFO, TTFT added on streams and chunk pacing (the mock provider), the acquire+release pairs
one Redis sustains, and the acquire script's server-side time with 10 targets. Results go to
``loadtest/results/bench-<date>.json`` and ``.md``; the table is printed too.

Needs ``apt-get update && apt-get install -y nginx-light wrk`` (and redis-server; taskset is
in util-linux). ``--profile`` also samples the router with py-spy under load.

``--peers`` also measures two peer gateways in the same rig, pinned the same way, behind the
same load and upstreams, and prints the ratios ours/peer: LiteLLM's proxy (PyPI) and
Portkey's gateway (npm), installed pinned on first use (``loadtest/peers.py`` says how each is
configured). ``--peers-only`` runs just that comparison (upstream direct, our round_robin with
the decision log off and at INFO, the peers) into ``loadtest/results/peers-<date>.*``; with
``--quick`` it takes about three minutes. A peer that cannot be installed, started or verified
(200s with the upstream's answer, served by the rig's upstreams) is reported as NOT MEASURED
with the reason, and the run exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import redis
import uvloop
import yaml

from loadtest.procs import Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
APT_LINE = "apt-get update && apt-get install -y nginx-light wrk"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
CLIENT_KEY = "bench-client-key-0123456789abcdef"
KEY_ENV = "BENCH_CLIENT_KEY"
SUT_CPU, LOAD_CPU = "0", "1"
STRATEGIES = ("round_robin", "weighted", "least_connections", "least_latency", "headroom")
BIG_LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 100_000}
"""Limits that never bind, so the scripts still check every window."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOP_LEVEL = frozenset({"evalsha", "eval", "info", "config|resetstat", "ping", "script|load"})
"""Commands a client sends; the others counted while only scripts run come from scripts."""
BUSY_RUNS = 5
"""Runs of the acquire cost with Redis busy; the best one is reported, the median beside it."""
STREAM_TTFT_MS = 50
STREAM_GAP_MS = 50
TARGETS = {
    "rps": 3000.0,
    "added_p50_ms": 0.8,
    "added_p99_ms": 2.0,
    "redis_round_trips": 2.0,
    "acquire_us_10": 50.0,
    "ttft_added_ms": 1.0,
    "rss_load_mb": 150.0,
}
UPSTREAM_ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "system_fingerprint": "fp_bench",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help?", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
}


# ---------------------------------------------------------------------------- processes


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tool(name: str) -> str | None:
    """Path of the executable ``name`` (also looked for in the sbin directories)."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return None


def require_tools(names: Sequence[str]) -> dict[str, str]:
    """The paths of ``names``; exit with the install line when one is missing."""
    paths = {name: tool(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        hint = {
            "nginx": APT_LINE,
            "wrk": APT_LINE,
            "redis-server": "apt-get install -y redis-server",
            "taskset": "apt-get install -y util-linux",
        }
        lines = sorted({hint.get(m, f"install {m}") for m in missing})
        sys.exit(f"bench: missing {', '.join(missing)}; install with:\n  " + "\n  ".join(lines))
    return {name: path for name, path in paths.items() if path is not None}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without what would redirect a child (REDIS_URL, OTLP endpoints)."""
    drop = ("REDIS_URL", "ROUTER_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("OTEL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


class Rig:
    """The processes of one run, all stopped (by PID, newest first) when it ends."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[Proc] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def start(
        self, name: str, argv: list[str], cpus: str | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        """Start ``argv`` (pinned to ``cpus`` with taskset when given)."""
        pin = ["taskset", "-c", cpus] if cpus is not None else []
        proc = Proc(name, [*pin, *argv], child_env(env), self.dir)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)


def wait_until(cond: Callable[[], bool], what: str, proc: Proc, timeout: float = 30.0) -> None:
    """Poll ``cond`` until true; fail with ``proc``'s output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not cond():
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited while waiting for {what}:\n{proc.output(tail=4000)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}:\n{proc.output(tail=4000)}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MB (``VmRSS`` now, ``VmHWM`` its peak)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def busy_seconds() -> tuple[float, float]:
    """The machine's CPU seconds so far: (user + nice + system, steal)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (v[0] + v[1] + v[2]) / CLK_TCK, v[7] / CLK_TCK


class Noise:
    """CPU other people's processes used while we measured, in % of the whole machine."""

    def __init__(self) -> None:
        self.pids = descendants(os.getpid())
        self.started = time.monotonic()
        self.ours = self._ours()
        self.busy, self.steal = busy_seconds()

    def _ours(self) -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(cpu_seconds(p) for p in self.pids) + kids.ru_utime + kids.ru_stime

    def done(self) -> dict[str, float]:
        wall = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        busy, steal = busy_seconds()
        foreign = (busy - self.busy) - (self._ours() - self.ours)
        return {
            "foreign_cpu_pct": round(max(foreign, 0.0) / wall * 100, 1),
            "steal_pct": round((steal - self.steal) / wall * 100, 1),
        }


class RssSampler:
    """Samples the resident memory of some processes every 0.1 s; keeps each one's peak."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.peak = dict.fromkeys(self.pids, 0.0)
        self.total_peak = 0.0
        """The peak of the processes' sum (one system's process tree)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = 0.0
            for pid in self.pids:
                mb = rss_mb(pid)
                self.peak[pid] = max(self.peak[pid], mb)
                total += mb
            self.total_peak = max(self.total_peak, total)


# ---------------------------------------------------------------------------- nginx


NGINX_MAIN = """\
worker_processes 1;
pid __DIR__/nginx.pid;
error_log __DIR__/error.log warn;
__USER__
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path __DIR__/body;
  proxy_temp_path __DIR__/proxy;
  fastcgi_temp_path __DIR__/fastcgi;
  uwsgi_temp_path __DIR__/uwsgi;
  scgi_temp_path __DIR__/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
__SERVERS__
}
"""
NGINX_ANSWER = """\
  server {
__LISTEN__
    location / { default_type application/json; return 200 '__BODY__'; }
  }
"""
NGINX_STUB = """\
  server {
    listen 127.0.0.1:__PORT__;
    location / { stub_status; }
  }
"""
NGINX_PROXY = """\
  upstream providers {
__SERVERS__
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:__PORT__;
    location / {
      proxy_pass http://providers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
"""


def nginx_conf(prefix: Path, servers: str) -> str:
    """A private nginx config: pid, logs and temp files under ``prefix``, one worker."""
    # as root the workers would switch to 'nobody', which cannot enter the private temp dir
    user = "user root;" if os.geteuid() == 0 else ""
    text = NGINX_MAIN.replace("__USER__", user).replace("__SERVERS__", servers)
    return text.replace("__DIR__", str(prefix))


def upstream_servers(
    ports: Sequence[int], stub_port: int, answer: dict[str, Any] = UPSTREAM_ANSWER
) -> str:
    """The fixed chat.completion ``answer`` on each of ``ports`` (any path, POST allowed),
    and the request count (stub_status) on ``stub_port``."""
    body = orjson.dumps(answer).decode()
    if "'" in body or "$" in body or "\\" in body:
        raise ValueError("the answer must be quotable in nginx")
    listen = "\n".join(f"    listen 127.0.0.1:{p};" for p in ports)
    answer = NGINX_ANSWER.replace("__LISTEN__", listen).replace("__BODY__", body)
    return answer + NGINX_STUB.replace("__PORT__", str(stub_port))


NGINX_STREAM_PROXY = """\
  upstream mock {
    server 127.0.0.1:__MOCK__;
    keepalive 16;
  }
  server {
    listen 127.0.0.1:__PORT__;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
"""


def stream_proxy_servers(port: int, mock_port: int) -> str:
    """An unbuffered proxy to the paced mock: the one-hop limit for a stream's TTFT."""
    return NGINX_STREAM_PROXY.replace("__MOCK__", str(mock_port)).replace("__PORT__", str(port))


def proxy_servers(port: int, upstream_ports: Sequence[int]) -> str:
    """Round robin over ``upstream_ports`` with a keepalive pool: the one-hop limit."""
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstream_ports)
    return NGINX_PROXY.replace("__SERVERS__", servers).replace("__PORT__", str(port))


def start_nginx(rig: Rig, name: str, servers: str, ports: Sequence[int], cpus: str) -> Proc:
    """Run ``nginx -p DIR -c nginx.conf -g 'daemon off;'`` in a private prefix; wait for it."""
    prefix = rig.dir / name
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, servers))
    argv = [tool("nginx") or "nginx", "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"]
    proc = rig.start(name, argv, cpus)
    wait_until(lambda: all(port_open(p) for p in ports), f"{name} to listen", proc)
    return proc


# ---------------------------------------------------------------------------- redis


def start_redis(rig: Rig, cpus: str | None = LOAD_CPU) -> tuple[Proc, int]:
    """A private, throw-away redis-server on a free port."""
    port = free_port()
    argv = [
        tool("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(rig.dir), "--protected-mode", "yes",
    ]  # fmt: skip
    proc = rig.start(f"redis-{port}", argv, cpus)
    wait_until(lambda: port_open(port), "redis-server to listen", proc)
    return proc, port


def redis_counters(r: redis.Redis) -> dict[str, int]:
    """Reads processed (one per client round trip) and calls per command, in one INFO."""
    info = r.info("stats", "commandstats")
    out = {"reads": int(info["total_reads_processed"])}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            out[key[8:]] = int(value["calls"])
            out[key[8:] + "_usec"] = int(value["usec"])
    return out


# ---------------------------------------------------------------------------- router


def router_config(
    redis_port: int, upstream: Sequence[int], mock_port: int, decisions: str, access: str = "OFF"
) -> dict[str, Any]:
    """Three openai providers at the nginx ports, one route per strategy, plus a stream route."""
    providers: list[dict[str, Any]] = [
        {
            "name": f"up{i}",
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "weight": 3 - i,
            "limits": BIG_LIMITS,
        }  # fmt: skip
        for i, port in enumerate(upstream)
    ]
    providers.append(
        {"name": "mock", "kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1"}
    )
    targets = [{"provider": p["name"], "model": "bench-model"} for p in providers[:-1]]
    routes: list[dict[str, Any]] = [
        {"model": s, "strategy": s, "targets": targets} for s in STRATEGIES
    ]
    routes.append({"model": "stream", "targets": [{"provider": "mock", "model": "mock-model"}]})
    return {
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "key_prefix": "bench",
        "client_keys": [{"env": KEY_ENV}],
        "log": {"level": "WARNING", "decisions": decisions, "access": access},
        "providers": providers,
        "routes": routes,
    }


def ready(url: str) -> bool:
    """The replica answers /readyz and is on the shared store (not degraded)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return bool(httpx.get(f"{url}/readyz", timeout=1.0).json().get("status") == "ready")
    return False


def start_router(
    rig: Rig, config: Path, port: int, cpus: str | None, name: str, *, reuse_port: bool = False
) -> Proc:
    """One replica (``python -m router.cli``), pinned to ``cpus``; waits until it is ready."""
    argv = [sys.executable, "-m", "router.cli", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--reuse-port"] if reuse_port else []
    proc = rig.start(name, argv, cpus, {KEY_ENV: CLIENT_KEY})
    wait_until(lambda: ready(f"http://127.0.0.1:{port}"), f"{name} to be ready", proc)
    return proc


# ---------------------------------------------------------------------------- wrk


WRK_LUA = """\
wrk.method = "POST"
wrk.body = '__BODY__'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer __KEY__"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,' ..
    '"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def chat_body(model: str) -> dict[str, Any]:
    """The small chat request every load posts (only the model differs)."""
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


def wrk_script(
    workdir: Path, model: str, key: str = CLIENT_KEY, headers: dict[str, str] | None = None,
    name: str | None = None,
) -> Path:  # fmt: skip
    """A wrk script posting a small chat body for ``model`` with the client ``key`` (and
    ``headers``, e.g. a peer's config)."""
    path = workdir / f"wrk-{name or model}.lua"
    text = WRK_LUA.replace("__BODY__", orjson.dumps(chat_body(model)).decode())
    extra = ""
    for k, v in (headers or {}).items():
        if "'" in k + v or "\\" in k + v or "\n" in k + v:
            raise ValueError(f"header {k} must be quotable in Lua")
        extra += f"wrk.headers['{k}'] = '{v}'\n"
    text = text.replace("done = function", extra + "done = function", 1)
    path.write_text(text.replace("__KEY__", key))
    return path


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: answers, errors and latency (ms)."""

    conns: int
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "rps": round(self.rps, 1)}


@dataclass(frozen=True)
class Load:
    """What wrk hits: the URL, its script, and where wrk runs (None = unpinned)."""

    url: str
    script: Path
    wrk_cpus: str | None = LOAD_CPU


def run_wrk(load: Load, conns: int, duration: float) -> WrkResult:
    """``wrk -t{1|2} -c{conns} -d{duration}s --latency``; parse the script's JSON line."""
    threads = 1 if conns == 1 else 2
    pin = ["taskset", "-c", load.wrk_cpus] if load.wrk_cpus is not None else []
    argv = [*pin, tool("wrk") or "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s"]
    argv += ["--latency", "--timeout", "5s", "-s", str(load.script), load.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    j = json.loads(line[8:])
    return WrkResult(
        conns=conns,
        requests=j["requests"],
        seconds=j["duration_us"] / 1e6,
        non2xx=j["status"],
        socket_errors=j["connect"] + j["read"] + j["write"] + j["timeout"],
        p50_ms=j["p50_us"] / 1000,
        p90_ms=j["p90_us"] / 1000,
        p99_ms=j["p99_us"] / 1000,
        mean_ms=j["mean_us"] / 1000,
        max_ms=j["max_us"] / 1000,
    )


# ---------------------------------------------------------------------------- scenarios


@dataclass
class Sut:
    """A system under test: the load it takes and the processes whose cost we count."""

    key: str
    label: str
    load: Load
    stub_port: int
    """The upstream nginx's stub_status: its request count is the requests served."""
    pids: list[int] = field(default_factory=list)
    redis_port: int | None = None
    redis_pid: int | None = None
    placement: str = ""
    rss_total: bool = False
    """RSS is the sum of ``pids`` (one system's process tree), not the largest replica's."""


def upstream_requests(stub_port: int) -> int:
    """Requests the upstream nginx has answered so far (this one included)."""
    text = httpx.get(f"http://127.0.0.1:{stub_port}/", timeout=5).text
    return int(text.splitlines()[2].split()[2])


class Meter:
    """CPU, Redis round trips and machine noise over one run, per request served.

    Requests served are counted by the upstream, not by wrk: wrk does not count the answers
    still in flight when it stops, which were acquired, sent and released all the same.
    """

    def __init__(self, sut: Sut) -> None:
        self.sut = sut
        self.redis = redis.Redis(port=sut.redis_port) if sut.redis_port else None
        self.cpu0 = {p: cpu_seconds(p) for p in sut.pids}
        self.redis_cpu0 = cpu_seconds(sut.redis_pid) if sut.redis_pid else 0.0
        self.counters0 = redis_counters(self.redis) if self.redis is not None else {}
        self.served0 = upstream_requests(sut.stub_port)
        self.noise = Noise()

    def figures(self) -> dict[str, Any]:
        """Per-request costs of the run, once its last releases have settled."""
        noise = self.noise.done()
        time.sleep(0.3)
        served = upstream_requests(self.sut.stub_port) - self.served0 - 1
        per_k = 1000 / served if served > 0 else 0.0
        cpu = sum(cpu_seconds(p) - c for p, c in self.cpu0.items())
        out: dict[str, Any] = {"served": served, "cpu_s_per_1k": round(cpu * per_k, 4), **noise}
        if self.redis is not None:
            if served > 0:
                out.update(self._redis(self.redis, served))
            self.redis.close()
        return out

    def _redis(self, r: redis.Redis, served: int) -> dict[str, Any]:
        after = redis_counters(r)
        delta = Counter({k: v - self.counters0.get(k, 0) for k, v in after.items()})
        redis_cpu = cpu_seconds(self.sut.redis_pid) - self.redis_cpu0 if self.sut.redis_pid else 0
        calls = delta["evalsha"]
        return {
            # what a request asks of Redis: its script calls (acquire, release), plus the
            # replica's own heartbeat and polling; they share one pipelined connection, so
            # the network reads Redis makes per request are far fewer (the last INFO's is ours)
            "redis_calls_per_req": round((calls + delta["eval"]) / served, 3),
            "redis_reads_per_req": round((delta["reads"] - 1) / served, 3),
            "evalsha_per_req": round(calls / served, 3),
            "redis_cpu_s_per_1k": round(redis_cpu * 1000 / served, 4),
            "redis_usec_per_evalsha": round(delta["evalsha_usec"] / calls, 1) if calls else None,
        }


def measure(sut: Sut, duration: float, *, warm: float = 1.0) -> dict[str, Any]:
    """Latency at 1 and 8 connections, then saturation at 32 with its costs."""
    print(f"  {sut.key}: {sut.label}", flush=True)
    with RssSampler(sut.pids) as rss:
        run_wrk(sut.load, 32, warm)  # opens every connection (Redis pool too) before measuring
        c1 = run_wrk(sut.load, 1, duration)
        c8 = run_wrk(sut.load, 8, duration)
        time.sleep(0.3)  # the last requests of c8 finish and release outside the meter
        meter = Meter(sut)
        c32 = run_wrk(sut.load, 32, duration)
        costs = meter.figures()
    return {
        "label": sut.label,
        "placement": sut.placement,
        "c1": c1.summary(),
        "c8": c8.summary(),
        "c32": c32.summary(),
        "rss_load_mb": round(
            rss.total_peak if sut.rss_total else max(rss.peak.values(), default=0.0), 1
        ),
        **costs,
    }


@dataclass
class Upstreams:
    """The rig's fixed parts: nginx upstream and proxy, Redis, the paced mock provider."""

    ports: list[int]
    stub_port: int
    proxy_port: int
    redis_port: int
    redis_pid: int
    mock_port: int
    stream_proxy_port: int


def start_upstreams(rig: Rig) -> Upstreams:
    """nginx upstream (3 ports) and the redis on core 1, nginx proxy on core 0, the mock."""
    ports, stub = [free_port() for _ in range(3)], free_port()
    start_nginx(rig, "nginx-upstream", upstream_servers(ports, stub), [*ports, stub], LOAD_CPU)
    proxy = free_port()
    start_nginx(rig, "nginx-proxy", proxy_servers(proxy, ports), [proxy], SUT_CPU)
    redis_proc, redis_port = start_redis(rig)
    mock_port = free_port()
    argv = [sys.executable, "-m", "loadtest.mock_provider", "--port", str(mock_port)]
    argv += ["--ttft-ms", str(STREAM_TTFT_MS), "--chunk-interval-ms", str(STREAM_GAP_MS)]
    mock = rig.start("mock-stream", [*argv, "--name", "mock"], LOAD_CPU)
    wait_until(lambda: port_open(mock_port), "the mock provider to listen", mock)
    stream_proxy = free_port()
    start_nginx(rig, "nginx-stream-proxy", stream_proxy_servers(stream_proxy, mock_port),
                [stream_proxy], SUT_CPU)  # fmt: skip
    return Upstreams(ports, stub, proxy, redis_port, redis_proc.pid, mock_port, stream_proxy)


def nginx_pids(rig: Rig, name: str) -> list[int]:
    """The nginx master and its worker."""
    master = next(p for p in rig.procs if p.name == name)
    return descendants(master.pid)


def baselines(rig: Rig, up: Upstreams, d: float) -> dict[str, Any]:
    """(a) wrk straight to the upstream; (b) through an nginx proxy hop."""
    script = wrk_script(rig.dir, "round_robin")
    path = "/v1/chat/completions"
    direct = Sut(
        "a", "upstream direct (wrk -> nginx)",
        Load(f"http://127.0.0.1:{up.ports[0]}{path}", script), up.stub_port,
        nginx_pids(rig, "nginx-upstream"), placement="nginx core 1, wrk core 1",
    )  # fmt: skip
    proxy = Sut(
        "b", "nginx proxy_pass, round robin, keepalive (one hop)",
        Load(f"http://127.0.0.1:{up.proxy_port}{path}", script), up.stub_port,
        nginx_pids(rig, "nginx-proxy"), placement="proxy core 0, wrk core 1",
    )  # fmt: skip
    return {"a": measure(direct, d), "b": measure(proxy, d)}


def router_sut(rig: Rig, key: str, model: str, port: int, pids: list[int], up: Upstreams) -> Sut:
    """A router scenario: wrk posts to ``model`` (the route named after its strategy)."""
    load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", wrk_script(rig.dir, model))
    label = f"router x{len(pids)}, {model}, Redis on"
    placement = "router core 0, wrk core 1" if len(pids) == 1 else "routers cores 0+1, wrk unpinned"
    return Sut(key, label, load, up.stub_port, pids, up.redis_port, up.redis_pid, placement)


def write_config(rig: Rig, name: str, up: Upstreams, decisions: str, access: str = "OFF") -> Path:
    path = rig.dir / name
    cfg = router_config(up.redis_port, up.ports, up.mock_port, decisions, access)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------- streaming


def content_times(sock: socket.socket, port: int, body: dict[str, Any]) -> list[float]:
    """Seconds from the request to each SSE event that carries content, as a minimal client on
    a raw keep-alive connection sees them (HTTP/1.1, the load core).

    A full client (httpx) spends most of a millisecond of Python on a response's headers; the
    router sends its headers with the first frame (a stream may still fail over until then)
    while the provider sends them at once, so such a client would charge its own work to the
    router. A raw read keeps the client's share equal and small on both paths."""
    payload = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    times: list[float] = []
    buf = b""
    started = time.perf_counter()
    sock.sendall(head + payload)
    while not buf.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked answer
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"port {port} closed the connection mid-answer")
        now = time.perf_counter()
        buf += data
        *events, rest = buf.split(b"\n\n")
        times += [now - started for e in events if _has_content(e)]
        buf = rest if not buf.endswith(b"\r\n0\r\n\r\n") else buf
    if not times:
        raise RuntimeError(f"no content events from port {port}")
    return times


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _has_content(event: bytes) -> bool:
    """Whether one SSE event (chunked-encoding sizes may sit around it) carries content."""
    start = event.find(b"data: {")
    if start < 0:
        return False
    with contextlib.suppress(orjson.JSONDecodeError):
        choices = orjson.loads(event[start + 6 :]).get("choices") or [{}]
        return bool((choices[0].get("delta") or {}).get("content"))
    return False


def stream_figures(up: Upstreams, router_port: int, n: int) -> dict[str, Any]:
    """TTFT direct, through an unbuffered nginx hop and through the router (interleaved, one
    keep-alive connection each, as an SDK client keeps them), then the relayed chunks' pacing;
    the client runs on the load core, like wrk."""
    msgs = [{"role": "user", "content": "hello"}]
    ttft: dict[str, list[float]] = {"direct": [], "nginx": [], "router": []}
    gaps: list[float] = []
    paths = (("direct", up.mock_port, "mock-model"), ("nginx", up.stream_proxy_port, "mock-model"),
             ("router", router_port, "stream"))  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(pinned(LOAD_CPU))
        socks = {via: stack.enter_context(_connect(port)) for via, port, _ in paths}
        for _ in range(n):
            for via, port, model in paths:
                body = {"model": model, "messages": msgs, "stream": True, "max_tokens": 2}
                ttft[via].append(content_times(socks[via], port, body)[0] * 1000)
        body = {"model": "stream", "messages": msgs, "stream": True, "max_tokens": 8}
        for _ in range(5):
            t = content_times(socks["router"], router_port, body)
            gaps += [(b - a) * 1000 for a, b in zip(t, t[1:], strict=False)]
    med = {k: statistics.median(v) for k, v in ttft.items()}
    return {
        "requests_each": n,
        "ttft_direct_p50_ms": round(med["direct"], 3),
        "ttft_router_p50_ms": round(med["router"], 3),
        "ttft_added_ms": round(med["router"] - med["direct"], 3),
        "ttft_nginx_p50_ms": round(med["nginx"], 3),
        "ttft_nginx_added_ms": round(med["nginx"] - med["direct"], 3),
        "chunk_gap_ms": {
            "min": round(min(gaps), 1),
            "p50": round(statistics.median(gaps), 1),
            "max": round(max(gaps), 1),
            "n": len(gaps),
        },  # fmt: skip
        "relayed_as_they_come": min(gaps) > STREAM_GAP_MS / 2
        and abs(statistics.median(gaps) - STREAM_GAP_MS) < STREAM_GAP_MS / 5,
    }


# ---------------------------------------------------------------------------- profile


def profile(rig: Rig, sut: Sut, pid: int, duration: float) -> dict[str, Any]:
    """py-spy samples the router under saturation; self and inclusive time per function."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {"error": "py-spy is not installed: .venv/bin/pip install py-spy"}
    out = rig.dir / "profile.txt"
    argv = ["taskset", "-c", LOAD_CPU, str(spy), "record", "-p", str(pid), "-r", "250",
            "-d", str(int(duration)), "-f", "raw", "-o", str(out), "--nonblocking",
            "--full-filenames"]  # fmt: skip
    spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        run_wrk(sut.load, 32, duration)
        spy_proc.wait(timeout=duration + 30)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if not out.exists():
        return {"error": f"py-spy wrote nothing (exit {spy_proc.returncode}; needs ptrace)"}
    RESULTS_DIR.mkdir(exist_ok=True)
    # collapsed stacks, for flame graph tools (e.g. speedscope, inferno)
    raw = RESULTS_DIR / f"profile-{dt.date.today()}.txt.gz"
    raw.write_bytes(gzip.compress(out.read_bytes()))
    return summarize_profile(out.read_text())


def _split_frame(frame: str) -> tuple[str, str]:
    """``func (/full/path/to/module.py:12)`` -> (``func``, ``pkg/module.py``), the path
    relative to site-packages, the standard library or this repository."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame, "?"
    func, path = m.group(1), m.group(2)
    for marker in ("site-packages/", f"python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            return func, path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return func, str(Path(path).relative_to(ROOT))
    return func, path


def _package(path: str) -> str:
    """The top-level package (or stdlib module) a file belongs to."""
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if head else "?"


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: self time by package, by function, and the inclusive
    time of this repository's functions (in % of the samples, idle excluded)."""
    by_pkg: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_split_frame(f) for f in stack.split(";")]
        func, path = frames[-1]
        by_pkg[_package(path)] += int(count)
        own[f"{path}:{func}"] += int(count)
        for name in {f"{p}:{f}" for f, p in frames if p.startswith(("router/", "loadtest/"))}:
            incl[name] += int(count)
    total = sum(by_pkg.values()) or 1

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "self_by_package": pct(by_pkg, top),
        "self": pct(own, top),
        "inclusive_router": pct(incl, top),
    }


# ---------------------------------------------------------------------------- Redis alone


def store_config(redis_port: int, n_targets: int, pool: int) -> Any:
    """A config of ``n_targets`` providers (never contacted) and one route per strategy."""
    from router.config import parse_config

    providers = [
        {
            "name": f"t{i}",
            "kind": "openai",
            "base_url": f"http://127.0.0.1:9/{i}/v1",
            "limits": BIG_LIMITS,
        }  # fmt: skip
        for i in range(n_targets)
    ]
    targets = [{"provider": p["name"], "model": "m"} for p in providers]
    data = {
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "key_prefix": f"store{n_targets}",
        "client_keys": [{"env": KEY_ENV}],
        "redis": {"timeout_ms": 5000, "pool_size": pool},
        "providers": providers,
        "routes": [{"model": s, "strategy": s, "targets": targets} for s in STRATEGIES],
    }
    return parse_config(data, {KEY_ENV: CLIENT_KEY})


async def _pair(store: Any, plan: Any, lease_id: str, rand: int) -> bool:
    """One acquire and its release, as a request makes them."""
    from router.state.store import Lease, Outcome

    n = len(plan.providers)
    d = await store.acquire(plan, lease_id, [32] * n, [False] * n, rand=rand, expected_output=16)
    if d.index is None:
        return False
    lease = Lease(lease_id, plan.providers[d.index], d.bucket, 32)
    await store.release(lease, Outcome("ok", ttft_ms=-1, tpot_ms=2.0))
    return True


async def pairs_per_second(redis_port: int, seconds: float, tasks: int = 64) -> dict[str, Any]:
    """Many concurrent clients calling acquire+release straight on the store (one Redis)."""
    from router.state.store import RoutePlan, Store

    cfg = store_config(redis_port, 3, tasks)
    store = Store.from_config(cfg)
    await store.start(warm=tasks)
    plan = RoutePlan.build(cfg, cfg.routes[0], store.keys)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    done = Counter[str]()

    async def worker(w: int) -> None:
        i = 0
        while loop.time() < stop_at:
            i += 1
            done["pairs" if await _pair(store, plan, f"w{w}:{i}", i) else "none"] += 1

    started = loop.time()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    elapsed = loop.time() - started
    await store.close()
    return {"tasks": tasks, "seconds": round(elapsed, 2), "pairs": done["pairs"],
            "refused": done["none"], "pairs_per_s": round(done["pairs"] / elapsed)}  # fmt: skip


def store_throughput(redis_port: int, redis_pid: int, seconds: float) -> dict[str, Any]:
    """Pairs/s one Redis shard served, the Redis CPU it took, and the capacity that implies."""
    r = redis.Redis(port=redis_port)
    before, redis0, self0 = redis_counters(r), cpu_seconds(redis_pid), cpu_seconds(os.getpid())
    started = time.monotonic()
    with pinned(SUT_CPU), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(pairs_per_second(redis_port, seconds))
    wall = time.monotonic() - started
    after = redis_counters(r)
    r.close()
    redis_frac = (cpu_seconds(redis_pid) - redis0) / wall
    calls = after["evalsha"] - before.get("evalsha", 0)
    usec = after["evalsha_usec"] - before.get("evalsha_usec", 0)
    out["redis_cpu_pct"] = round(redis_frac * 100, 1)
    out["client_cpu_pct"] = round((cpu_seconds(os.getpid()) - self0) / wall * 100, 1)
    out["server_usec_per_pair"] = round(2 * usec / calls, 1) if calls else None
    full = round(out["pairs_per_s"] / redis_frac) if redis_frac > 0 else None
    out["pairs_per_s_at_full_redis_core"] = full
    return out


async def _acquire_batch(
    store: Any, plan: Any, r: redis.Redis, n: int, *, busy: bool, detail: bool = False,
    tenant: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """``n`` acquires, their leases held until after the reading: the acquire script's
    server-side time alone (INFO commandstats, and latencystats for percentiles).

    ``busy``: all ``n`` at once, pipelined over the store's one connection, so Redis runs them
    back to back, as under load (the figure that sets a shard's capacity); otherwise one at a
    time, Redis idle between calls (on this VM that costs a cold start per call).
    ``tenant``: each acquire also checks and charges it (limits and a budget that never
    refuse: the cost of the tenant's part, not of a refusal)."""
    from router.budgets import period_id
    from router.config import BudgetPeriod
    from router.state.store import Lease, Outcome

    k = len(plan.providers)

    async def one(i: int) -> Any:
        lid = f"{plan.route.model}:{busy}:{detail}:{tenant is not None}:{i}"
        d = await store.acquire(plan, lid, [32] * k, [False] * k, rand=i, expected_output=16,
                                detail=detail, tenant=tenant, tenant_tokens=48,
                                cost_nano=1000)  # fmt: skip
        if d.index is None:
            return None
        if tenant is None:
            return Lease(lid, plan.providers[d.index], d.bucket, 32)
        pid = period_id(tenant.period or BudgetPeriod.MONTH, d.bucket)
        return Lease(lid, plan.providers[d.index], d.bucket, 32, False, tenant.name,
                     plan.route.model, 48, 1000, pid)  # fmt: skip

    r.config_resetstat()
    if busy:
        held = await asyncio.gather(*(one(i) for i in range(n)))
    else:
        held = [await one(i) for i in range(n)]
    info = r.info("commandstats", "latencystats")
    for lease in held:
        if lease is not None:
            await store.release(lease, Outcome("ok", tpot_ms=2.0))
    cmd, pct = info["cmdstat_evalsha"], info.get("latency_percentiles_usec_evalsha", {})
    nested = sum(
        v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and k[8:] not in TOP_LEVEL
    )
    return {
        "mean_us": round(cmd["usec"] / cmd["calls"], 1),
        "p50_us": pct.get("p50"),
        "p99_us": pct.get("p99"),
        "n": cmd["calls"],
        "redis_calls_per_acquire": round(nested / cmd["calls"], 1),
    }


async def acquire_cost_async(redis_port: int, n: int) -> dict[str, Any]:
    """The acquire script's server-side time with 10 targets in the route, per strategy:
    Redis busy (the target's figure) and one call at a time, the decision log off (the
    router's default: codes only); and busy with the decision log's per-target detail; and
    busy with a tenant (limits and a budget), in runs paired with those without."""
    from router.config import TenantSpec
    from router.state.store import RoutePlan, Store, TenantPlan

    cfg = store_config(redis_port, 10, 4)
    store = Store.from_config(cfg)
    await store.start(warm=1)
    r = redis.Redis(port=redis_port)
    out: dict[str, Any] = {}
    spec = TenantSpec.model_validate({
        "name": "bench", "budget": {"usd": 1_000_000, "period": "month"},
        "limits": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6},
    })  # fmt: skip
    tenant = TenantPlan.build(spec, store.keys)
    try:
        for route in cfg.routes:
            plan = RoutePlan.build(cfg, route, store.keys)
            await _acquire_batch(store, plan, r, 200, busy=True)  # windows and counters exist
            await _acquire_batch(store, plan, r, 200, busy=True, tenant=tenant)
            # the best of BUSY_RUNS: on a shared VM a neighbour's burst can slow a whole run;
            # the least disturbed run is the nearest to the script's own cost. With and without
            # a tenant alternate, so that both see the same machine.
            runs, truns = [], []
            for _ in range(BUSY_RUNS):
                runs.append(await _acquire_batch(store, plan, r, n, busy=True))
                truns.append(await _acquire_batch(store, plan, r, n, busy=True, tenant=tenant))
            best = min(runs, key=lambda x: float(x["mean_us"]))
            tbest = min(truns, key=lambda x: float(x["mean_us"]))
            best["busy_runs"] = BUSY_RUNS
            best["busy_median_us"] = statistics.median(float(x["mean_us"]) for x in runs)
            best["busy_with_tenant"] = tbest
            best["tenant_cost_ratio"] = round(float(tbest["mean_us"]) / float(best["mean_us"]), 3)
            best["one_at_a_time"] = await _acquire_batch(store, plan, r, n // 2, busy=False)
            best["busy_with_detail"] = await _acquire_batch(store, plan, r, n, busy=True,
                                                            detail=True)  # fmt: skip
            out[route.model] = best
    finally:
        r.close()
        await store.close()
    return out


@contextlib.contextmanager
def pinned(cpu: str) -> Iterator[None]:
    """Run this thread on ``cpu`` for a while (the drivers of Redis on core 0)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def redis_alone(up: Upstreams, opts: Options) -> dict[str, Any]:
    """Pairs/s one Redis shard sustains; the acquire script's cost with 10 targets."""
    out = {"store": store_throughput(up.redis_port, up.redis_pid, opts.store_seconds)}
    with pinned(SUT_CPU), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out["acquire_10_targets"] = runner.run(acquire_cost_async(up.redis_port, opts.acquire_n))
    return out


# ---------------------------------------------------------------------------- the run


@dataclass
class Options:
    duration: float
    quick: bool
    profile: bool
    stream_requests: int
    store_seconds: float
    acquire_n: int
    acquire_only: bool = False
    peers: bool = False
    peers_only: bool = False


def one_replica(rig: Rig, up: Upstreams, opts: Options) -> dict[str, Any]:
    """(c) round_robin and (d) the other strategies on one replica; streaming; profile."""
    config = write_config(rig, "router.yaml", up, "OFF")
    port = free_port()
    proc = start_router(rig, config, port, SUT_CPU, "router-1")
    out: dict[str, Any] = {"rss_idle_mb": round(rss_mb(proc.pid), 1)}
    for strategy in STRATEGIES:
        key = "c" if strategy == "round_robin" else f"d-{strategy}"
        out[key] = measure(router_sut(rig, key, strategy, port, [proc.pid], up), opts.duration)
    print("  streaming: TTFT and chunk pacing", flush=True)
    out["streaming"] = stream_figures(up, port, opts.stream_requests)
    if opts.profile:
        print("  profile: py-spy under saturation", flush=True)
        sut = router_sut(rig, "p", "round_robin", port, [proc.pid], up)
        out["profile"] = profile(rig, sut, proc.pid, max(opts.duration, 5))
    rig.stop(proc)
    return out


def decision_log_cost(rig: Rig, up: Upstreams, opts: Options) -> dict[str, Any]:
    """(c) again with the decision log at INFO (one JSON line per decision to a file)."""
    config = write_config(rig, "router-info.yaml", up, "INFO")
    port = free_port()
    proc = start_router(rig, config, port, SUT_CPU, "router-info")
    sut = router_sut(rig, "c-info", "round_robin", port, [proc.pid], up)
    sut.label += ", decision log at INFO"
    out = measure(sut, opts.duration)
    rig.stop(proc)
    lines = proc.output().count('"router.decision"')
    out["decision_log_bytes_per_line"] = round(proc.log_path.stat().st_size / max(lines, 1))
    return out


def access_log_cost(rig: Rig, up: Upstreams, opts: Options) -> dict[str, Any]:
    """(c) again with the access log at INFO, the default (one JSON line per request)."""
    config = write_config(rig, "router-access.yaml", up, "OFF", "INFO")
    port = free_port()
    proc = start_router(rig, config, port, SUT_CPU, "router-access")
    sut = router_sut(rig, "c-access", "round_robin", port, [proc.pid], up)
    sut.label += ", access log at INFO"
    out = measure(sut, opts.duration)
    rig.stop(proc)
    lines = proc.output(tail=10**9).count('"router.access"')
    out["access_log_bytes_per_line"] = round(proc.log_path.stat().st_size / max(lines, 1))
    return out


def replicas_seen(port: int, tries: int = 20) -> set[str]:
    """The replica ids answering ``/healthz`` on ``port`` over new connections."""
    seen = set()
    for _ in range(tries):
        with contextlib.suppress(httpx.HTTPError, ValueError):
            seen.add(
                str(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["replica"])
            )
    return seen


def two_replicas(rig: Rig, up: Upstreams, opts: Options) -> dict[str, Any]:
    """(e) two replicas sharing one port (SO_REUSEPORT) on cores 0 and 1; wrk unpinned."""
    config = rig.dir / "router.yaml"
    port = free_port()
    procs = [
        start_router(rig, config, port, cpu, f"router-r{cpu}", reuse_port=True)
        for cpu in (SUT_CPU, LOAD_CPU)
    ]
    wait_until(lambda: len(replicas_seen(port)) == 2, "both replicas to accept", procs[1])
    sut = router_sut(rig, "e", "round_robin", port, [p.pid for p in procs], up)
    sut.load = Load(sut.load.url, sut.load.script, wrk_cpus=None)
    out = measure(sut, opts.duration)
    for p in procs:
        rig.stop(p)
    return out


# ---------------------------------------------------------------------------- peers


PEER_KEY = "sk-bench-peer-0123456789abcdef"
"""The master key LiteLLM checks (it wants the ``sk-`` form)."""
PEER_PLACEMENT = "peer core 0 (its whole process tree), wrk core 1"
UPSTREAM_CONTENT = UPSTREAM_ANSWER["choices"][0]["message"]["content"]


@dataclass
class Peer:
    """A peer gateway to start in the rig: how, what wrk sends it, and how we check it."""

    key: str
    label: str
    argv: list[str]
    port: int
    env: dict[str, str]
    model: str
    auth_key: str = PEER_KEY
    headers: dict[str, str] = field(default_factory=dict)
    spread_header: str = ""
    """The answer's header naming the upstream the peer chose (its balance is checked)."""


def verify_peer(
    peer: Peer, proc: Proc, stub_port: int, n: int = 30, timeout: float = 120.0
) -> dict[str, Any]:
    """Wait for the peer's first 200, then send ``n`` requests: all must be 200 with the
    upstream's answer, and the upstream must have served each one (the peer routes to the
    rig's nginx, not elsewhere). Returns the statuses and the spread over the targets."""
    url = f"http://127.0.0.1:{peer.port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {peer.auth_key}", **peer.headers}
    body = chat_body(peer.model)
    deadline, last = time.monotonic() + timeout, "no answer"
    with httpx.Client(timeout=10) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = client.post(url, headers=headers, json=body)
                if r.status_code == 200:
                    break
                last = f"{r.status_code} {r.text[:500]}"
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.output(tail=3000)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} never answered 200; last: {last}")
            time.sleep(0.5)
        before = upstream_requests(stub_port)
        statuses: Counter[int] = Counter()
        spread: Counter[str] = Counter()
        wrong = 0
        for _ in range(n):
            r = client.post(url, headers=headers, json=body)
            statuses[r.status_code] += 1
            spread[r.headers.get(peer.spread_header, "?")] += 1
            try:
                wrong += r.json()["choices"][0]["message"]["content"] != UPSTREAM_CONTENT
            except (ValueError, KeyError, IndexError, TypeError):
                wrong += 1
        served = upstream_requests(stub_port) - before - 1
    if statuses != Counter({200: n}):
        raise RuntimeError(f"{peer.label}: statuses {dict(statuses)} of {n} requests; last: "
                           f"{r.status_code} {r.text[:500]}")  # fmt: skip
    if wrong or served < n:
        raise RuntimeError(f"{peer.label}: the upstreams served {served} of {n} requests "
                           f"({wrong} answers not the upstream's)")  # fmt: skip
    return {"requests": n, "upstream_served": served, "targets": dict(sorted(spread.items()))}


def litellm_peer(rig: Rig, up: Upstreams, strategy: str) -> Peer:
    """LiteLLM's proxy over the three upstreams (``strategy``: usage or shuffle), one worker."""
    from loadtest import peers

    exe = peers.install_litellm()
    cfg = rig.dir / f"litellm-{strategy}.yaml"
    cfg.write_text(yaml.safe_dump(peers.litellm_config(up.ports, up.redis_port, PEER_KEY,
                                                       strategy)))  # fmt: skip
    port = free_port()
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]  # fmt: skip
    env = {
        "LITELLM_LOG": "ERROR",  # also turns uvicorn's access log off (like the router's here)
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
        "LITELLM_MODE": "PRODUCTION",  # no .env loading
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
    }
    label = (f"LiteLLM {peers.LITELLM_VERSION} proxy, "
             f"{peers.LITELLM_STRATEGIES[strategy]}, Redis on")  # fmt: skip
    return Peer(f"litellm-{strategy}", label, argv, port, env, peers.MODEL,
                spread_header="x-litellm-model-id")  # fmt: skip


def portkey_peer(rig: Rig, up: Upstreams) -> Peer:
    """Portkey's gateway, headless, loadbalance over the three upstreams in its config header."""
    from loadtest import peers

    entry = peers.install_portkey()
    node = shutil.which("node") or "node"
    port = free_port()
    argv = [node, str(entry), f"--port={port}", "--headless"]
    env = {"REDIS_CONNECTION_STRING": f"redis://127.0.0.1:{up.redis_port}",
           "NODE_ENV": "production"}  # fmt: skip
    config = orjson.dumps(peers.portkey_config(up.ports)).decode()
    label = f"Portkey gateway {peers.PORTKEY_VERSION}, loadbalance"
    return Peer("portkey", label, argv, port, env, peers.MODEL, headers={
        "x-portkey-config": config}, spread_header="x-portkey-last-used-option-index")  # fmt: skip


def measure_peer(rig: Rig, up: Upstreams, opts: Options, make: Callable[[], Peer],
                 key: str, label: str) -> dict[str, Any]:  # fmt: skip
    """Install, start (pinned to the router's core), verify and measure one peer; its error
    (install, start or verification) recorded in place of figures."""
    from loadtest.peers import PeerUnavailable

    try:
        peer = make()
    except PeerUnavailable as e:
        print(f"  {key}: NOT MEASURED: {e}", flush=True)
        return {"label": label, "error": str(e)}
    proc = rig.start(peer.key, peer.argv, SUT_CPU, peer.env)
    try:
        wait_until(lambda: port_open(peer.port), f"{peer.key} to listen", proc, timeout=180)
        checked = verify_peer(peer, proc, up.stub_port)
        print(f"  {peer.key}: verified, targets {checked['targets']}", flush=True)
        pids = descendants(proc.pid)
        script = wrk_script(rig.dir, peer.model, peer.auth_key, peer.headers, peer.key)
        load = Load(f"http://127.0.0.1:{peer.port}/v1/chat/completions", script)
        sut = Sut(peer.key, peer.label, load, up.stub_port, pids, up.redis_port, up.redis_pid,
                  PEER_PLACEMENT, rss_total=True)  # fmt: skip
        out = measure(sut, opts.duration, warm=2.0)
        out["verified"] = checked
        out["processes"] = len(pids)
        return out
    except (RuntimeError, TimeoutError) as e:
        print(f"  {peer.key}: NOT MEASURED: {e}", flush=True)
        return {"label": peer.label, "error": str(e)}
    finally:
        rig.stop(proc)


def peer_scenarios(rig: Rig, up: Upstreams, opts: Options) -> dict[str, Any]:
    """LiteLLM (usage-based routing, then simple shuffle) and Portkey, one after the other."""
    from loadtest import peers

    lite = f"LiteLLM {peers.LITELLM_VERSION} proxy"
    return {
        "litellm-usage": measure_peer(rig, up, opts, lambda: litellm_peer(rig, up, "usage"),
                                      "litellm-usage", f"{lite}, usage-based-routing-v2"),
        "litellm-shuffle": measure_peer(rig, up, opts, lambda: litellm_peer(rig, up, "shuffle"),
                                        "litellm-shuffle", f"{lite}, simple-shuffle"),
        "portkey": measure_peer(rig, up, opts, lambda: portkey_peer(rig, up), "portkey",
                                f"Portkey gateway {peers.PORTKEY_VERSION}"),
    }  # fmt: skip


def run_peers_only(rig: Rig, opts: Options) -> dict[str, Any]:
    """The comparison alone: (a) upstream direct for the added latency, (c) our router on
    round_robin and again with the decision log at INFO, then the peers."""
    up = start_upstreams(rig)
    print(f"rig up in {rig.dir}; {opts.duration:g} s per wrk run", flush=True)
    script = wrk_script(rig.dir, "round_robin")
    direct = Sut(
        "a", "upstream direct (wrk -> nginx)",
        Load(f"http://127.0.0.1:{up.ports[0]}/v1/chat/completions", script), up.stub_port,
        nginx_pids(rig, "nginx-upstream"), placement="nginx core 1, wrk core 1",
    )  # fmt: skip
    scenarios = {"a": measure(direct, opts.duration)}
    config = write_config(rig, "router.yaml", up, "OFF")
    port = free_port()
    proc = start_router(rig, config, port, SUT_CPU, "router-1")
    scenarios["c"] = measure(router_sut(rig, "c", "round_robin", port, [proc.pid], up),
                             opts.duration)  # fmt: skip
    rig.stop(proc)
    scenarios["c-info"] = decision_log_cost(rig, up, opts)
    return {"scenarios": scenarios, "peers": peer_scenarios(rig, up, opts)}


def run_all(rig: Rig, opts: Options) -> dict[str, Any]:
    """Every scenario, in one rig."""
    up = start_upstreams(rig)
    print(f"rig up in {rig.dir}; {opts.duration:g} s per wrk run", flush=True)
    res: dict[str, Any] = {"scenarios": baselines(rig, up, opts.duration)}
    single = one_replica(rig, up, opts)
    res["rss_idle_mb"] = single.pop("rss_idle_mb")
    res["streaming"] = single.pop("streaming")
    res["profile"] = single.pop("profile", None)
    res["scenarios"].update(single)
    res["scenarios"]["c-info"] = decision_log_cost(rig, up, opts)
    res["scenarios"]["c-access"] = access_log_cost(rig, up, opts)
    res["scenarios"]["e"] = two_replicas(rig, up, opts)
    if opts.peers:
        res["peers"] = peer_scenarios(rig, up, opts)
    print("  one Redis shard: acquire+release pairs/s; acquire cost with 10 targets", flush=True)
    res.update(redis_alone(up, opts))
    return res


# ---------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    """Where and with what the run happened."""
    versions = {}
    for name, argv in (("nginx", ["nginx", "-v"]), ("redis", ["redis-server", "--version"]),
                       ("wrk", ["wrk", "-v"])):  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run([tool(argv[0]) or argv[0], *argv[1:]], capture_output=True,
                               text=True, timeout=10)  # fmt: skip
            versions[name] = (p.stdout + p.stderr).strip().splitlines()[0][:100]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "tools": versions,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def scenario_table(res: dict[str, Any]) -> list[str]:
    """One row per scenario: throughput, latency, overhead, CPU, memory, Redis."""
    a1 = res["scenarios"]["a"]["c1"]
    rows = [
        "| scenario | placement | req/s @32 | p50/p99 @1 (ms) | p50/p99 @8 (ms) "
        "| added p50/p99 @1 (ms) | CPU s/1k req | RSS peak (MB) | Redis calls (reads) /req "
        "| noise % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in res["scenarios"].items():
        c1, c8 = s["c1"], s["c8"]
        added = f"{c1['p50_ms'] - a1['p50_ms']:+.2f} / {c1['p99_ms'] - a1['p99_ms']:+.2f}"
        rows.append(
            f"| {key}: {s['label']} | {s['placement']} | {s['c32']['rps']:,.0f} "
            f"| {_ms(c1['p50_ms'])} / {_ms(c1['p99_ms'])} | {_ms(c8['p50_ms'])} / "
            f"{_ms(c8['p99_ms'])} | {added if key != 'a' else '-'} | {s['cpu_s_per_1k']:.3f} "
            f"| {s['rss_load_mb']:.0f} | {_calls(s)} "
            f"| {s['foreign_cpu_pct']} |"
        )
    return rows


def _calls(s: dict[str, Any]) -> str:
    if "redis_calls_per_req" not in s:
        return "-"
    return f"{s['redis_calls_per_req']} ({s['redis_reads_per_req']})"


Check = tuple[str, str, str, bool | None]


def _strategy_checks(res: dict[str, Any]) -> list[Check]:
    """Throughput, added latency, Redis round trips and memory of one replica."""
    sc = res["scenarios"]
    a1, c = sc["a"]["c1"], sc["c"]
    strategies = {k: v for k, v in sc.items() if k == "c" or k.startswith("d-")}
    worst, w = min(strategies.items(), key=lambda kv: float(kv[1]["c32"]["rps"]))
    rps, wrps = c["c32"]["rps"], w["c32"]["rps"]
    added50, added99 = c["c1"]["p50_ms"] - a1["p50_ms"], c["c1"]["p99_ms"] - a1["p99_ms"]
    rss = max(v["rss_load_mb"] for v in strategies.values())
    rt = max(v["redis_calls_per_req"] for v in strategies.values())
    reads = max(v["redis_reads_per_req"] for v in strategies.values())
    return [
        ("req/s @32, round_robin, 1 replica on 1 core", ">= 3,000", f"{rps:,.0f}",
         rps >= TARGETS["rps"]),
        (f"req/s @32, slowest strategy ({worst})", ">= 3,000", f"{wrps:,.0f}",
         wrps >= TARGETS["rps"]),
        ("added latency @1 conn, p50 (c - a)", "<= 0.8 ms", f"{added50:.2f} ms",
         added50 <= TARGETS["added_p50_ms"]),
        ("added latency @1 conn, p99 (c - a)", "<= 2 ms", f"{added99:.2f} ms",
         added99 <= TARGETS["added_p99_ms"]),
        ("Redis round trips per request: script calls (worst strategy; the replica's own "
         "heartbeat and polling, ~0.6/s, included)", "<= 2",
         f"{rt} (pipelined: {reads} network reads per request)",
         round(rt, 2) <= TARGETS["redis_round_trips"]),
        ("RSS under load, 1 replica", "<= 150 MB",
         f"{rss:.0f} MB (idle {res['rss_idle_mb']:.0f})", rss <= TARGETS["rss_load_mb"]),
    ]  # fmt: skip


def _other_checks(res: dict[str, Any]) -> list[Check]:
    """The acquire script's cost and the streams."""
    name, acq = max(res["acquire_10_targets"].items(), key=lambda kv: float(kv[1]["mean_us"]))
    st = res["streaming"]
    ttft = st["ttft_added_ms"]
    return [
        (f"acquire server side, 10 targets, Redis busy, mean, best of {acq['busy_runs']} runs "
         f"(worst strategy: {name})", "<= 50 µs",
         f"{acq['mean_us']} µs (median of the runs {acq['busy_median_us']:.1f}; p50 "
         f"{acq['p50_us']}, p99 {acq['p99_us']}; one at a time {acq['one_at_a_time']['mean_us']} "
         "µs)",
         acq["mean_us"] <= TARGETS["acquire_us_10"]),
        ("TTFT added on streams (median)", "<= 1 ms", f"{ttft:.2f} ms",
         ttft <= TARGETS["ttft_added_ms"]),
        ("chunks relayed as they come (mock paces 50 ms)", "gaps ~50 ms",
         "gaps min/p50/max {min}/{p50}/{max} ms".format(**st["chunk_gap_ms"]),
         st["relayed_as_they_come"]),
    ]  # fmt: skip


def _access_line(sc: dict[str, Any]) -> list[str]:
    if "c-access" not in sc:  # results of a bench from before the access log
        return []
    c, acc = sc["c"], sc["c-access"]
    return [
        f"- access log at INFO (the default): {acc['c32']['rps']:,.0f} vs {c['c32']['rps']:,.0f} "
        f"req/s; CPU {acc['cpu_s_per_1k']:.3f} vs {c['cpu_s_per_1k']:.3f} s/1k req; "
        f"{acc['access_log_bytes_per_line']} bytes per line"
    ]


def target_checks(res: dict[str, Any]) -> list[Check]:
    """(figure, target, measured, met?) for every target of the brief."""
    return [*_strategy_checks(res), *_other_checks(res)]


def other_lines(res: dict[str, Any]) -> list[str]:
    """Decision log cost, Redis alone, acquire cost per strategy, the profile's top."""
    sc, st = res["scenarios"], res["store"]
    c, info = sc["c"], sc["c-info"]
    lines = [
        f"- decision log at INFO: {info['c32']['rps']:,.0f} vs {c['c32']['rps']:,.0f} req/s; "
        f"CPU {info['cpu_s_per_1k']:.3f} vs {c['cpu_s_per_1k']:.3f} s/1k req; "
        f"{info['decision_log_bytes_per_line']} bytes per line",
        *_access_line(sc),
        f"- one Redis shard, acquire+release from {st['tasks']} asyncio tasks: "
        f"{st['pairs_per_s']:,} pairs/s with Redis at {st['redis_cpu_pct']}% of a core (client "
        f"{st['client_cpu_pct']}%); ~{st['pairs_per_s_at_full_redis_core'] or 0:,} pairs/s at a "
        f"full Redis core; {st['server_usec_per_pair']} µs of Redis time per pair",
        "- acquire with 10 targets, server side (INFO commandstats, latencystats), mean µs "
        "with Redis busy / one call at a time / busy with the decision log's detail: "
        + "; ".join(
            f"{k} {v['mean_us']} / {v['one_at_a_time']['mean_us']} / "
            f"{v['busy_with_detail']['mean_us']} (Redis calls per acquire "
            f"{v['redis_calls_per_acquire']})"
            for k, v in res["acquire_10_targets"].items()
        ),  # fmt: skip
        f"- streaming: TTFT p50 direct {res['streaming']['ttft_direct_p50_ms']} ms, via router "
        f"{res['streaming']['ttft_router_p50_ms']} ms, via an unbuffered nginx hop "
        f"{res['streaming']['ttft_nginx_p50_ms']} ms (+{res['streaming']['ttft_nginx_added_ms']} "
        "ms: the one-hop limit on this path)",
    ]
    prof = res.get("profile")
    if prof and "self" in prof:
        for title, key in (
            ("self time by package", "self_by_package"),
            ("self time by function", "self"),
            ("inclusive time, router code", "inclusive_router"),
        ):
            lines.append(f"- py-spy, router under wrk -c32, {title} (% of samples): "
                         + ", ".join(f"{n} {p}" for n, p in prof[key][:12]))  # fmt: skip
    return lines


def markdown(res: dict[str, Any]) -> str:
    head = [
        *report_head("Router benchmark", res),
        "| figure | target | measured | met? |",
        "|---|---|---|---|",
    ]
    checks = [f"| {f} | {t} | {m} | {_met(ok)} |" for f, t, m, ok in target_checks(res)]
    body = [*head, *checks, "", *scenario_table(res), "", *other_lines(res), ""]
    return "\n".join([*body, *peers_lines(res)])


def peers_lines(res: dict[str, Any]) -> list[str]:
    """The peers comparison: our router and each peer in one table, with the ratios."""
    if not res.get("peers"):
        return []
    from loadtest import peers

    sc = res["scenarios"]
    a1 = sc["a"]["c1"]

    def row(key: str, s: dict[str, Any]) -> peers.Row:
        return peers.row_from_scenario(key, s, float(a1["p50_ms"]), float(a1["p99_ms"]))

    ours = row("c", sc["c"])
    also = [row("c-info", sc["c-info"])] if "c-info" in sc else []
    rows = [row(k, v) for k, v in res["peers"].items()]
    lines = [
        "## Peers: the same rig, the same run",
        "",
        "Each system alone on core 0 (the peers' whole process tree; CPU and RSS summed over "
        "it), wrk on core 1 posting the same body, the same three nginx upstreams behind. "
        "Added latency: p50/p99 at 1 connection minus upstream direct's. req/s counts 2xx "
        "answers only; errors are the non-2xx and socket errors of all three wrk runs. "
        "Ratios are ours/peer: above 1x for req/s means ours serves more; below 1x for "
        "latency, CPU and RSS means ours costs less.",
        "",
        *peers.comparison_table(ours, rows, also),
        "",
    ]
    c = sc["c"]
    lines.append(f"- ours (c): Redis reads per request {c.get('redis_reads_per_req', '-')} "
                 f"(script calls {c.get('redis_calls_per_req', '-')})")  # fmt: skip
    for key, s in res["peers"].items():
        if "verified" in s:
            v = s["verified"]
            lines.append(f"- {key}: checked first: {v['requests']} requests all 200 with the "
                         f"upstream's answer, {v['upstream_served']} served by the upstreams, "
                         f"spread {v['targets']}; {s['processes']} process(es); Redis reads "
                         f"per request {s.get('redis_reads_per_req', '-')}")  # fmt: skip
    return [*lines, ""]


def peers_markdown(res: dict[str, Any]) -> str:
    """The report of ``--peers-only``."""
    return "\n".join([*report_head("Router vs peers", res), *peers_lines(res)])


def report_head(title: str, res: dict[str, Any]) -> list[str]:
    """A report's title and the machine it ran on (load at the end too, when known)."""
    env = res["environment"]
    end = env.get("loadavg_end")
    load = " ".join(env["loadavg_start"]) + (f", at end {' '.join(end)}" if end else "")
    return [
        f"# {title}, {env['date']}",
        "",
        f"{env['host_cpus']} CPUs, Linux {env['kernel']}, Python {env['python']}, "
        f"loadavg at start {load}; {res['duration_s']:g} s per wrk run"
        f"{' (quick)' if res['quick'] else ''}. 'noise %' is CPU used by processes outside the "
        "rig during the saturation run, in % of the machine.",
        "",
    ]


def write_results(res: dict[str, Any], name: str = "bench") -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"{name}-{dt.date.today()}"
    text = peers_markdown(res) if name == "peers" else markdown(res)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    return stem.with_suffix(".json")


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="3 s runs, fewer samples (debugging)")
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (10)")
    p.add_argument("--profile", action="store_true", help="also sample the router with py-spy")
    p.add_argument(
        "--acquire-only",
        action="store_true",
        help="only the acquire script's cost with 10 targets (printed, not written)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also measure LiteLLM and Portkey's gateway in the same rig (ratios)",
    )
    p.add_argument(
        "--peers-only",
        action="store_true",
        help="only the peers comparison: upstream direct, our round_robin, the peers",
    )
    a = p.parse_args(argv)
    duration = a.duration or (3.0 if a.quick else 10.0)
    return Options(
        duration=duration,
        quick=a.quick,
        profile=a.profile,
        stream_requests=20 if a.quick else 50,
        store_seconds=3.0 if a.quick else 10.0,
        acquire_n=500 if a.quick else 2000,
        acquire_only=a.acquire_only,
        peers=a.peers or a.peers_only,
        peers_only=a.peers_only,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    require_tools(["nginx", "wrk", "redis-server", "taskset"])
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs at least 2 CPUs (the router on core 0, the load on core 1)")
    env = environment()
    if opts.acquire_only:
        with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp, Rig(Path(tmp)) as rig:
            proc, port = start_redis(rig)
            with pinned(SUT_CPU), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                cost = runner.run(acquire_cost_async(port, opts.acquire_n))
        print(json.dumps({"environment": env, "acquire_10_targets": cost}, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp, Rig(Path(tmp)) as rig:
        res = run_peers_only(rig, opts) if opts.peers_only else run_all(rig, opts)
    res = {"environment": env, "duration_s": opts.duration, "quick": opts.quick, **res}
    res["environment"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if opts.peers:
        from loadtest.peers import versions

        res["environment"]["peers"] = versions()
    failed = [f"{k}: {v['error']}" for k, v in res.get("peers", {}).items() if "error" in v]
    if opts.peers_only:
        print(f"written: {write_results(res, 'peers')}")
        return _peers_failed(failed)
    res["targets"] = [
        {"figure": f, "target": t, "measured": m, "met": ok} for f, t, m, ok in target_checks(res)
    ]
    print(f"written: {write_results(res)}")
    return _peers_failed(failed)


def _peers_failed(failed: list[str]) -> int:
    """1, with each reason, when a peer could not be measured (never skipped silently)."""
    if not failed:
        return 0
    print("bench: peers NOT measured:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
