"""Test helpers: free ports, waiting on conditions with a deadline, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from loadtest.procs import Proc, free_port
from router.config import load_config
from router.state.health import HealthStore, ProbeWrite
from router.state.store import Store
from tests.tls import Certs

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


async def async_wait_until(
    cond: Callable[[], Awaitable[Any]], within: float = 10.0, what: str = "condition"
) -> Any:
    """Async twin of ``wait_until`` for conditions that need the event loop."""
    timeout = within
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """Starts mock providers and router replicas as real processes, stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = Proc(name, argv, full_env, self.log_dir)
        self.procs.append(proc)
        return proc

    def mock(self, name: str, port: int, *args: str, wait: bool = True) -> Proc:
        """Start a mock provider and (unless ``wait`` is false) wait until it serves."""
        argv = [sys.executable, "-m", "loadtest.mock_provider", "--port", str(port)]
        proc = self.start(f"mock-{name}", [*argv, "--name", name, *args])
        if wait:
            self.wait_mock(proc, port)
        return proc

    def wait_mock(self, proc: Proc, port: int) -> None:
        self._wait_http(proc, f"http://127.0.0.1:{port}/stats")

    def router(
        self, name: str, config: Path, port: int, env: dict[str, str], wait: bool = True
    ) -> Proc:
        """Start a router replica and (unless ``wait`` is false) wait until it is ready."""
        argv = [sys.executable, "-m", "router.cli", "--config", str(config)]
        proc = self.start(name, [*argv, "--host", "127.0.0.1", "--port", str(port)], env)
        if wait:
            self.wait_router(proc, port)
        return proc

    def wait_router(self, proc: Proc, port: int) -> None:
        self._wait_http(proc, f"http://127.0.0.1:{port}/readyz")

    def _wait_http(self, proc: Proc, url: str, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url, timeout=1.0).status_code == 200
            return False

        wait_until(ready, timeout, f"{proc.name} at {url}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def redis_server_binary() -> str:
    """Path of redis-server, or a clear failure saying how to install it."""
    for candidate in (os.environ.get("REDIS_SERVER"), "/usr/bin/redis-server"):
        if candidate and Path(candidate).exists():
            return candidate
    from shutil import which

    found = which("redis-server")
    if not found:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    return found


def redis_argv(port: int, data_dir: Path, certs: Certs | None = None) -> list[str]:
    """The command line of a private, throw-away redis-server (nothing written to disk); with
    ``certs``, it listens with TLS only and speaks TLS to its primary. A replica's first sync
    starts at once (Redis waits 5 s by default for more replicas to share it)."""
    listen = certs.server_args(port) if certs else ["--port", str(port)]
    return [
        redis_server_binary(), *listen,
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(data_dir), "--protected-mode", "yes", "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[tuple[int, Proc]]:
    """A private, throw-away redis-server on a free port (never the machine's own)."""
    port = free_port()
    proc = Proc(f"redis-{port}", redis_argv(port, log_dir), dict(os.environ), log_dir)
    try:
        wait_until(lambda: port_open(port), 10, "redis-server to listen")
        yield port, proc
    finally:
        proc.stop()


CLIENT_KEY = "test-client-key-0123456789"
ADMIN_TOKEN = "test-admin-token-9876543210"
PROVIDER_KEY = "test-provider-key-abcdef"
SECRETS = (CLIENT_KEY, ADMIN_TOKEN, PROVIDER_KEY)
ENV = {"ROUTER_CLIENT_KEY": CLIENT_KEY, "ROUTER_ADMIN_TOKEN": ADMIN_TOKEN, "P_KEY": PROVIDER_KEY}


class Mock:
    """A mock provider process to start: its name, API and command-line options."""

    def __init__(
        self, name: str, *args: str, api: str = "openai", alias_of: Mock | None = None,
        **provider: Any,
    ) -> None:  # fmt: skip
        self.name = name
        self.api = api
        self.args = list(args)
        self.provider = provider
        self.alias_of = alias_of
        """Another provider name for an already started mock (separate shared state)."""
        self.port = alias_of.port if alias_of else free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """The mock's own counts (GET /stats)."""
        return dict(httpx.get(f"{self.url}/stats", timeout=5).json())

    def fault(self, mode: str, **kw: Any) -> None:
        """Inject a fault (POST /admin/fault)."""
        httpx.post(f"{self.url}/admin/fault", json={"mode": mode, **kw}, timeout=5)

    def config(self) -> dict[str, Any]:
        base = f"{self.url}/v1" if self.api == "openai" else self.url
        out: dict[str, Any] = {"name": self.name, "kind": self.api, "base_url": base}
        out["api_key"] = {"env": "P_KEY"}
        return {**out, **self.provider}


class Gateway:
    """Mock providers and router replicas sharing one Redis, all real processes."""

    def __init__(self, cluster: Cluster, config: Path, mocks: list[Mock]) -> None:
        self.cluster = cluster
        self.config = config
        self.mocks = {m.name: m for m in mocks if m.alias_of is None}
        self.replicas: list[tuple[Proc, str]] = []

    def add_replica(self, env: dict[str, str] | None = None) -> str:
        """Start one more replica; return its base URL."""
        return self.add_replicas(1, env)[0]

    def add_replicas(self, n: int, env: dict[str, str] | None = None) -> list[str]:
        """Start ``n`` more replicas at once, then wait until all are ready; their URLs."""
        started = []
        for _ in range(n):
            port = free_port()
            name = f"router-{len(self.replicas)}"
            proc = self.cluster.router(name, self.config, port, {**ENV, **(env or {})}, False)
            self.replicas.append((proc, f"http://127.0.0.1:{port}"))
            started.append((proc, port))
        for proc, port in started:
            self.cluster.wait_router(proc, port)
        return [f"http://127.0.0.1:{port}" for _, port in started]

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas]

    def counts(self) -> dict[str, int]:
        """Requests each provider answered with 200, by its own count."""
        return {name: int(m.stats()["ok"]) for name, m in self.mocks.items()}


def ctl(gw: Gateway, *args: str, columns: int = 160) -> str:
    """Run ``routerctl`` on the gateway's config; its output, checked to hold no secret."""
    argv = [sys.executable, "-m", "router.ctl", *args, "--config", str(gw.config)]
    env = {**os.environ, **ENV, "COLUMNS": str(columns)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert not any(secret in done.stdout for secret in SECRETS)
    return done.stdout


def write_config(
    path: Path, redis_url: str | None, mocks: list[Mock], routes: list[dict[str, Any]],
    **extra: Any,
) -> Path:  # fmt: skip
    """Write a router config for ``mocks`` and ``routes``."""
    import yaml

    cfg: dict[str, Any] = {
        "key_prefix": "rc",
        "client_keys": [{"env": "ROUTER_CLIENT_KEY"}],
        "admin_token": {"env": "ROUTER_ADMIN_TOKEN"},
        "log": {"level": "INFO", "decisions": "INFO"},
        "providers": [m.config() for m in mocks],
        "routes": routes,
        **extra,
    }
    if redis_url:
        cfg["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_gateway(
    cluster: Cluster, tmp: Path, redis_url: str | None, mocks: list[Mock],
    routes: list[dict[str, Any]], replicas: int = 1, **extra: Any,
) -> Gateway:  # fmt: skip
    """Start the mocks, write the config, start ``replicas`` routers (each kind all at once,
    then waited for: the processes' start-ups overlap)."""
    started = []
    for m in mocks:
        if m.alias_of is not None:
            continue
        args = ["--api", m.api, "--api-key", PROVIDER_KEY, *m.args]
        started.append((cluster.mock(m.name, m.port, *args, wait=False), m.port))
    for proc, port in started:
        cluster.wait_mock(proc, port)
    config = write_config(tmp / "router.yaml", redis_url, mocks, routes, **extra)
    gw = Gateway(cluster, config, mocks)
    gw.add_replicas(replicas)
    return gw


def auth() -> dict[str, str]:
    """Headers of an authorized client."""
    return {"Authorization": f"Bearer {CLIENT_KEY}"}


async def write_with_epoch(config: Path, epoch: int) -> ProbeWrite:
    """A failed probe of provider ``a`` written through the store, carrying ``epoch`` (what a
    healthd leader that lost its lease would write)."""
    store = Store.from_config(load_config(config, dict(ENV)))
    await store.start()
    try:
        return await HealthStore(store).report_probe("a", epoch, False, 1.0, "stale", 1, 1)
    finally:
        await store.close()


async def drain_through_the_store(config: Path, provider: str) -> None:
    """Drain ``provider`` through a store of its own on the config's Redis (what routerctl
    does): the replicas hear of it by pub/sub."""
    store = Store.from_config(load_config(config, dict(ENV)))
    await store.start(warm=1)
    try:
        await HealthStore(store).set_drain(provider, True)
    finally:
        await store.close()


def drained(url: str, provider: str) -> bool:
    """The replica at ``url`` is ready and sees ``provider`` drained (``/readyz``)."""
    body = httpx.get(f"{url}/readyz", timeout=5).json()
    return bool(body["status"] == "ready" and body["providers"][provider]["drained"])


def local_config(tmp: Path) -> Path:
    """examples/local.yaml (what ``routerctl up`` runs) with every mock provider moved to a
    free port."""
    cfg = yaml.safe_load((ROOT / "examples" / "local.yaml").read_text())
    for provider in cfg["providers"]:
        url = urlsplit(provider["base_url"])
        provider["base_url"] = url._replace(netloc=f"{url.hostname}:{free_port()}").geturl()
    path = tmp / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher_env(**extra: str) -> dict[str, str]:
    """Our environment without Redis or secrets: the launcher must provide both."""
    drop = {"REDIS_URL", "ROUTER_CLIENT_KEY", "ROUTER_ADMIN_TOKEN", "ROUTERCTL_REDIS_SERVER"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # the launchers' port locks and state files go to a directory of this test run, never
    # to the user's own (~/.cache/router-cluster or $XDG_RUNTIME_DIR)
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": _runtime_dir(), **extra}


@functools.cache
def _runtime_dir() -> str:
    path = tempfile.mkdtemp(prefix="router-tests-runtime-")
    os.chmod(path, 0o700)
    return path
