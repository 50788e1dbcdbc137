"""``routerctl up``: mocks, a private Redis and replicas sharing one port, all stopped cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml

from tests.helpers import ROOT, Proc, free_port, launcher_env, local_config, wait_until

PROVIDERS = {"fast-openai", "slow-openai", "claude"}
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass
class Launched:
    """A running ``routerctl up`` and what its output told us."""

    proc: Proc
    output: str
    endpoint: str
    key: str
    children: dict[str, int]
    tmpdir: Path


def up_argv(config: Path, port: int, *extra: str) -> list[str]:
    """The ``routerctl up`` command line."""
    argv = [sys.executable, "-m", "router.ctl", "up", "--config", str(config)]
    return [*argv, "--port", str(port), *extra]


def banner(proc: Proc) -> str | None:
    """The launcher's output once its banner is out; fail at once if it exited."""
    if proc.popen.poll() is not None:
        raise AssertionError(f"routerctl up exited {proc.popen.returncode}:\n{proc.output()}")
    out = proc.output()
    return out if "Ctrl-C stops everything." in out else None


def parse(proc: Proc, out: str) -> Launched:
    """Endpoint, client key, children and temp dir, as the launcher printed them."""
    endpoint = found(r"^  endpoint +(\S+)$", out)
    key = found(r"^  client key +(\S+)$", out)
    tmpdir = Path(found(r"temp dir (\S+)$", out))
    started = re.findall(r"^\[routerctl\] started (.+) pid (\d+)$", out, re.M)
    children = {name: int(pid) for name, pid in started}
    return Launched(proc, out, endpoint, key, children, tmpdir)


def found(pattern: str, out: str) -> str:
    """The first group of ``pattern`` (multi-line) in ``out``; fail showing ``out``."""
    match = re.search(pattern, out, re.M)
    assert match is not None, f"{pattern!r} not in:\n{out}"
    return match[1]


def alive(pid: int) -> bool:
    """True while a process with this PID exists (zombies included)."""
    return Path(f"/proc/{pid}").exists()


def kill_leftovers(children: dict[str, int]) -> None:
    """After a failure only: SIGKILL children the launcher left behind, by PID."""
    for pid in children.values():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # only our own children: a recycled PID would run something else
            if any(n in cmdline for n in (b"mock_provider", b"router", b"healthd", b"redis")):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Launched]:
    """Start ``routerctl up`` and wait for its banner; stop it (and any leftover) at the end."""
    argv = up_argv(local_config(tmp_path), free_port(), *args)
    proc = Proc("routerctl-up", argv, env or launcher_env(), tmp_path)
    launched = None
    try:
        launched = parse(proc, wait_until(lambda: banner(proc), 90, "the launcher's banner"))
        yield launched
    finally:
        proc.stop(timeout=30)
        kill_leftovers(launched.children if launched else {})


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """Two replicas on one port (SO_REUSEPORT: no HAProxy), with the launcher's own Redis."""
    env = launcher_env(ROUTERCTL_HAPROXY="")
    with launch(tmp_path_factory.mktemp("up"), "--replicas", "2", env=env) as launched:
        yield launched


def sdk(launched: Launched) -> openai.OpenAI:
    """The official client, on the endpoint and key the banner printed."""
    return openai.OpenAI(base_url=launched.endpoint, api_key=launched.key, max_retries=0)


@pytest.mark.slow
def test_banner_names_every_child_and_a_private_redis(two: Launched) -> None:
    names = {f"mock {p}" for p in PROVIDERS} | {"redis", "router-1", "router-2"}
    names |= {"healthd-1", "healthd-2"}
    assert set(two.children) == names
    assert re.search(
        r"^  store +private redis-server at redis://127\.0\.0\.1:\d+/0$", two.output, re.M
    )
    assert ":6379/" not in two.output
    assert "chat-default (round_robin: fast-openai, slow-openai, claude)" in two.output
    assert f"curl -sS {two.endpoint}/chat/completions" in two.output
    assert re.search(r"^\[redis\] ", two.output, re.M)
    assert re.search(r"^\[mock claude\] mock-provider claude listening", two.output, re.M)


@pytest.mark.slow
def test_openai_sdk_chat_whole_and_streamed(two: Launched) -> None:
    with sdk(two) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="chat-default", messages=MESSAGES, max_tokens=20
        )
        stream = client.chat.completions.create(
            model="chat-default", messages=MESSAGES, stream=True
        )
        chunks = list(stream)
    assert raw.headers["x-router-provider"] in PROVIDERS
    assert raw.parse().choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.slow
def test_two_replicas_share_one_port(two: Launched) -> None:
    base = two.endpoint.removesuffix("/v1")
    assert httpx.get(f"{base}/readyz", timeout=5).json()["store"] == "redis"
    replicas = set()
    for _ in range(40):
        # one client per request: a new connection, which the kernel may give to either replica
        with httpx.Client(timeout=5, trust_env=False) as client:
            replicas.add(client.get(f"{base}/healthz").json()["replica"])
    assert len(replicas) == 2


@pytest.mark.slow
def test_haproxy_fronts_the_replicas_when_installed(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tests/run.sh installs it: apt-get install haproxy)")
    with launch(tmp_path, "--replicas", "2") as launched:
        assert "behind HAProxy" in launched.output
        assert "haproxy" in launched.children
        base = launched.endpoint.removesuffix("/v1")
        replicas = set()
        for _ in range(20):  # a new connection each time: round robin over both
            with httpx.Client(timeout=5, trust_env=False) as client:
                replicas.add(client.get(f"{base}/healthz").json()["replica"])
        assert len(replicas) == 2
        with sdk(launched) as c:
            chunks = list(c.chat.completions.create(model="chat-default", messages=MESSAGES,
                                                    stream=True))  # fmt: skip
        assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)


@pytest.mark.slow
def test_sigterm_stops_every_child_and_removes_the_temp_dir(tmp_path: Path) -> None:
    with launch(tmp_path, "--replicas", "2") as launched:
        assert all(alive(pid) for pid in launched.children.values())
        assert launched.tmpdir.is_dir()
        launched.proc.popen.send_signal(signal.SIGTERM)
        assert launched.proc.popen.wait(20) == 0
        left = {name: pid for name, pid in launched.children.items() if alive(pid)}
        assert left == {}
        assert not launched.tmpdir.exists()
        assert "SIGTERM received: stopping all" in launched.proc.output()


@pytest.mark.slow
def test_sigkill_of_the_launcher_still_stops_every_child(tmp_path: Path) -> None:
    with launch(tmp_path) as launched:
        assert all(alive(pid) for pid in launched.children.values())
        launched.proc.popen.send_signal(signal.SIGKILL)
        launched.proc.popen.wait(10)
        # each child got SIGTERM from the kernel (parent-death signal) and stopped as usual
        wait_until(lambda: not any(alive(pid) for pid in launched.children.values()), 40,
                   "every child to stop after the launcher was killed")  # fmt: skip
        shutil.rmtree(launched.tmpdir, ignore_errors=True)  # the launcher could not


@pytest.mark.slow
def test_one_replica_without_redis_server_runs_embedded_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    env = launcher_env(ROUTERCTL_REDIS_SERVER="/nonexistent")
    with launch(tmp_path, env=env) as launched:
        assert "WARNING: redis-server not found" in launched.output
        assert "redis" not in launched.children
        with sdk(launched) as client:
            answer = client.chat.completions.create(model="chat-fast", messages=MESSAGES)
        assert answer.choices[0].message.content
        launched.proc.popen.send_signal(signal.SIGINT)
        assert launched.proc.popen.wait(20) == 0
        assert not any(alive(pid) for pid in launched.children.values())


def run_up(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``routerctl up`` expecting it to refuse before starting anything."""
    argv = up_argv(local_config(tmp_path), free_port(), *args)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_two_replicas_need_redis_server(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = launcher_env(PATH=str(empty), ROUTERCTL_REDIS_SERVER="/nonexistent")
    done = run_up(tmp_path, env, "--replicas", "2")
    assert done.returncode != 0
    assert "redis-server was not found" in done.stderr
    assert "apt-get install -y redis-server" in done.stderr
    assert "started" not in done.stdout


def test_a_taken_mock_port_is_refused_clearly(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    taken = urlsplit(yaml.safe_load(config.read_text())["providers"][1]["base_url"]).port
    assert taken is not None
    with socket.create_server(("127.0.0.1", taken)):
        argv = up_argv(config, free_port())
        done = subprocess.run(argv, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"mock provider slow-openai: cannot listen on 127.0.0.1:{taken}" in done.stderr
    assert "started" not in done.stdout
