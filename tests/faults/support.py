"""Shared pieces of the fault suite: a Redis we may kill or pause, bounded load, metrics."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from router.state.keys import Keys
from tests.helpers import (
    ENV,
    Cluster,
    Gateway,
    Mock,
    Proc,
    auth,
    free_port,
    port_open,
    redis_argv,
    start_gateway,
    wait_until,
)

KEYS = Keys("rc", "default")  # write_config's key_prefix, and the default pool
CHAT: dict[str, Any] = {
    "model": "chat",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 5,
}


class RedisServer:
    """A private redis-server on a fixed port that a test may kill, restart or pause."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart, empty) the server on its port and wait until it listens."""
        argv = redis_argv(self.port, self.tmp)
        self.proc = self.cluster.start(f"redis-{self.port}-{time.monotonic_ns()}", argv)
        wait_until(lambda: port_open(self.port), 10, "redis-server to listen")
        return self

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone."""
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)
        self.proc.popen.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.kill(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause`` (harmless otherwise)."""
        if self.proc is not None:
            self.proc.kill(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A direct client (never through a proxy), answers decoded."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)


@dataclass(frozen=True, slots=True)
class Sample:
    """One request of a ``Load``: when it ran, where, and how it ended."""

    started: float
    ended: float
    url: str
    status: int
    """The HTTP status, or 0 when no answer came (``error`` says why)."""
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Load:
    """Closed-loop client traffic over some replicas, bounded in count and in time."""

    def __init__(
        self, urls: list[str], *, workers: int = 4, max_requests: int = 5000,
        max_seconds: float = 60.0, body: dict[str, Any] | None = None, timeout: float = 10.0,
    ) -> None:  # fmt: skip
        self._urls = itertools.cycle(urls)
        self._lock = threading.Lock()
        self.body = body or CHAT
        self.timeout = timeout
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.samples: list[Sample] = []
        self._issued = 0
        self._deadline = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _next(self) -> str | None:
        with self._lock:
            if self._stop.is_set() or self._issued >= self.max_requests:
                return None
            if time.monotonic() > self._deadline:
                return None
            self._issued += 1
            return next(self._urls)

    def _run(self) -> None:
        with httpx.Client(headers=auth(), timeout=self.timeout) as client:
            while (url := self._next()) is not None:
                started = time.monotonic()
                try:
                    r = client.post(f"{url}/v1/chat/completions", json=self.body)
                    sample = Sample(started, time.monotonic(), url, r.status_code,
                                    "" if r.status_code == 200 else r.text[:300])  # fmt: skip
                except httpx.HTTPError as exc:
                    sample = Sample(started, time.monotonic(), url, 0, repr(exc))
                with self._lock:
                    self.samples.append(sample)

    def count(self) -> int:
        with self._lock:
            return len(self.samples)

    def wait_for_more(self, n: int, timeout: float, what: str) -> None:
        """Wait until ``n`` more requests than now have been answered."""
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout, what)

    def between(self, start: float, end: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if start <= s.started < end]

    def __enter__(self) -> Load:
        self._deadline = time.monotonic() + self.max_seconds
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def readyz(url: str) -> dict[str, Any]:
    """A replica's /readyz body ({} when it does not answer)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return dict(httpx.get(f"{url}/readyz", timeout=5).json())
    return {}


def status(url: str) -> str:
    return str(readyz(url).get("status", "down"))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """GET /metrics parsed as Prometheus text: (sample name, labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the ``name`` samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def fields(r: redis.Redis, provider: str) -> dict[str, str]:
    """A provider's shared hash (``r`` decodes answers)."""
    raw = r.hgetall(KEYS.provider(provider))
    return {str(k): str(v) for k, v in raw.items()}  # r decodes: these are str already


def counter(r: redis.Redis, provider: str, outcome: str) -> int:
    """The provider hash's ``o:<outcome>`` counter."""
    return int(r.hget(KEYS.provider(provider), f"o:{outcome}") or 0)


def in_flight(r: redis.Redis, provider: str) -> int:
    """Unexpired leases of ``provider``, at Redis time."""
    sec, usec = r.time()
    return int(r.zcount(KEYS.leases(provider), f"({sec * 1000 + usec // 1000}", "+inf"))


def leases(r: redis.Redis, provider: str) -> int:
    """Every lease entry of ``provider``, expired or not."""
    return int(r.zcard(KEYS.leases(provider)))


class Via(Mock):
    """A mock provider that the router reaches through a proxy (tests still talk to it
    directly, for /stats and /admin/fault)."""

    def __init__(self, name: str, *args: str, **provider: Any) -> None:
        super().__init__(name, *args, **provider)
        self.proxy_port: int | None = None

    def config(self) -> dict[str, Any]:
        out = super().config()
        if self.proxy_port is not None:
            base = f"http://127.0.0.1:{self.proxy_port}"
            out["base_url"] = f"{base}/v1" if self.api == "openai" else base
        return out


def reset_provider_state(r: redis.Redis, names: list[str]) -> None:
    """Forget cooldowns and circuits that earlier tests left in the providers' hashes."""
    for name in names:
        r.hdel(KEYS.provider(name), "cool", "circ", "circ_until", "circ_trial", "circ_opens",
               "fails")  # fmt: skip


def within(seconds: float, fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn``; return its result and how long it took (asserting it took < ``seconds``)."""
    started = time.monotonic()
    result = fn()
    took = time.monotonic() - started
    assert took < seconds, f"took {took:.2f}s, bound {seconds}s"
    return result, took


def start(
    cluster: Cluster, tmp: Path, redis_url: str | None, mocks: list[Mock],
    routes: list[dict[str, Any]], replicas: int = 1, **extra: Any,
) -> Gateway:  # fmt: skip
    """``start_gateway``, with the config's Redis winning over a ``REDIS_URL`` in the
    environment (the router reads that variable; here it must reach the proxy)."""
    gw = start_gateway(cluster, tmp, redis_url, mocks, routes, replicas=0, **extra)
    for _ in range(replicas):
        gw.add_replica({"REDIS_URL": ""})
    return gw


class Healthd:
    """A healthd process on a free port, and its /healthz."""

    def __init__(self, cluster: Cluster, name: str, config: Path) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "healthd.cli", "--config", str(config), "--port", str(port)]
        # REDIS_URL empty: the config's Redis wins over the environment's
        self.proc = cluster.start(name, argv, {**ENV, "REDIS_URL": ""})
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        wait_until(self._up, 20, f"{name} to serve /healthz")

    def _up(self) -> dict[str, Any] | None:
        if self.proc.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.proc.output()}")
        return self.healthz()

    def healthz(self) -> dict[str, Any] | None:
        """Its /healthz ({id, leading, epoch}), or None when it does not answer."""
        with contextlib.suppress(httpx.HTTPError):
            return dict(httpx.get(f"{self.url}/healthz", timeout=1).json())
        return None

    def leading(self) -> bool:
        found = self.healthz()
        return bool(found and found["leading"])

    def epoch(self) -> int:
        found = self.healthz()
        assert found is not None, f"{self.name} does not answer"
        return int(found["epoch"])

    def logged(self) -> list[dict[str, Any]]:
        """Its JSON log lines."""
        lines = self.proc.output().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]
