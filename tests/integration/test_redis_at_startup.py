"""Redis unreachable at start-up: a replica (and healthd) waits for it up to
``redis.startup_timeout_s``, then exits non-zero saying so (the URL masked), unless the
operator chose ``redis.start_degraded``. A mistyped ``redis_url`` used to give a replica that
reported ready, degraded, and never shared anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    ENV,
    Cluster,
    Mock,
    Proc,
    free_port,
    port_open,
    redis_argv,
    wait_until,
    write_config,
)

ROUTES = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
PASSWORD = "hunter2-not-printed"
COMMANDS = {"router": "router.cli", "healthd": "healthd.cli"}


def config(tmp: Path, redis_port: int, **redis: Any) -> Path:
    """A config whose Redis (with a password, never printed) is at ``redis_port``."""
    url = f"redis://default:{PASSWORD}@127.0.0.1:{redis_port}/0"
    return write_config(tmp / "router.yaml", url, [Mock("a")], ROUTES, redis=redis)


def argv(command: str, config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", COMMANDS[command], "--config", str(config), "--port", str(port)]


def env() -> dict[str, str]:
    return {**os.environ, **ENV, "REDIS_URL": "", "PYTHONUNBUFFERED": "1"}  # the config's wins


def get(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return dict(r.json()) if r.status_code == 200 else None


@pytest.mark.parametrize("command", ["router", "healthd"])
def test_no_redis_at_start_up_is_a_loud_exit(tmp_path: Path, command: str) -> None:
    redis_port = free_port()  # nothing listens there
    cfg = config(tmp_path, redis_port, startup_timeout_s=1)
    started = time.monotonic()
    done = subprocess.run(
        argv(command, cfg, free_port()), env=env(), capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: cannot start: "), done.stderr
    assert f"redis://***@127.0.0.1:{redis_port}/0" in last
    assert f"Error 111 connecting to 127.0.0.1:{redis_port}" in last  # refused: why it failed
    assert "redis.start_degraded: true" in last
    assert PASSWORD not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    print(f"{command} exited {took:.1f} s after it was started (1 s of it waiting for Redis)")


def test_a_replica_may_opt_into_starting_degraded(cluster: Cluster, tmp_path: Path) -> None:
    cfg = config(tmp_path, free_port(), start_degraded=True)
    port = free_port()
    proc = cluster.router("router", cfg, port, {**ENV, "REDIS_URL": ""})  # waits for /readyz
    ready = get(f"http://127.0.0.1:{port}/readyz")
    assert ready is not None
    assert (ready["status"], ready["store"]) == ("degraded", "redis")
    assert PASSWORD not in proc.output()


def test_healthd_may_opt_into_standing_by_until_redis_answers(
    cluster: Cluster, tmp_path: Path
) -> None:
    redis_port, port = free_port(), free_port()
    cfg = config(tmp_path, redis_port, start_degraded=True)
    proc = cluster.start("healthd", argv("healthd", cfg, port), env())
    status = wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz"), 20, "healthd to serve")
    assert status["leading"] is False
    redis_server(cluster, tmp_path, redis_port)
    wait_until(lambda: (get(f"http://127.0.0.1:{port}/healthz") or {}).get("leading"), 20,
               "healthd to lead once Redis answers")  # fmt: skip
    assert PASSWORD not in proc.output()


@pytest.mark.parametrize("command", ["router", "healthd"])
def test_a_redis_that_comes_up_while_starting_is_waited_for(
    cluster: Cluster, tmp_path: Path, command: str
) -> None:
    redis_port, port = free_port(), free_port()
    cfg = config(tmp_path, redis_port, startup_timeout_s=30)
    proc = cluster.start(command, argv(command, cfg, port), env())
    wait_until(lambda: "not answer yet" in proc.output(), 20, f"{command} to wait for Redis")
    redis_server(cluster, tmp_path, redis_port)
    path = "/readyz" if command == "router" else "/healthz"
    seen = wait_until(lambda: get(f"http://127.0.0.1:{port}{path}"), 30, f"{command} to serve")
    assert proc.popen.poll() is None
    if command == "router":  # shared from the start: never degraded
        assert (seen["status"], seen["degraded_episodes"]) == ("ready", 0), seen
    assert PASSWORD not in proc.output()


def redis_server(cluster: Cluster, tmp: Path, port: int) -> Proc:
    """A private redis-server on ``port``, with the configs' password."""
    proc = cluster.start(f"redis-{port}", [*redis_argv(port, tmp), "--requirepass", PASSWORD])
    wait_until(lambda: port_open(port), 10, "redis-server to listen")
    return proc
