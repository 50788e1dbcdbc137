"""``routerctl up`` takes its ports before starting anything: of two launchers started at the
same moment on one port exactly one goes on (and prints a banner); a port in use by anything
is refused with a message that says ``--port``."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import ROOT, Proc, free_port, launcher_env, local_config, wait_until
from tests.integration.test_launcher import banner, kill_leftovers, parse, up_argv

BANNER_END = "Ctrl-C stops everything."


@pytest.mark.slow
def test_two_launchers_at_once_on_one_port_exactly_one_goes_on(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = launcher_env(XDG_RUNTIME_DIR=str(runtime), ROUTERCTL_HAPROXY="")
    argv = up_argv(local_config(tmp_path), free_port())
    logs = [tmp_path / "a", tmp_path / "b"]
    for log in logs:
        log.mkdir()
    procs = [Proc("routerctl-up", argv, env, log) for log in logs]
    children: dict[str, int] = {}
    try:
        loser = wait_until(
            lambda: next((p for p in procs if p.popen.poll() is not None), None), 90,
            "one launcher to give up",
        )  # fmt: skip
        winner = procs[1 - procs.index(loser)]
        out = wait_until(lambda: banner(winner), 90, "the winner's banner")
        children = parse(winner, out).children
        lost = loser.output()
        assert loser.popen.returncode != 0, lost
        assert "is taken by another `routerctl up`" in lost
        assert f"(pid {winner.pid})" in lost
        assert "--port" in lost
        assert not re.search(r"^\[routerctl\] started ", lost, re.M)  # not one child
        assert BANNER_END not in lost
        assert winner.output().count(BANNER_END) == 1
    finally:
        for proc in procs:
            proc.stop(timeout=30)
        kill_leftovers(children)


def test_a_gateway_port_in_use_names_the_port_and_says_port_flag(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            up_argv(local_config(tmp_path), port),
            env=launcher_env(XDG_RUNTIME_DIR=str(runtime)),
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"router: cannot listen on 127.0.0.1:{port} (Address already in use)" in done.stderr
    assert "pick another port with --port" in done.stderr
    assert "started" not in done.stdout
    assert not list((runtime / "router-cluster").glob("*.lock"))  # claims let go on exit


class Foreign(http.server.BaseHTTPRequestHandler):
    """Another gateway on the port: ready, with a replica id that no child of ours has."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "ready", "store": "redis", "replica": "elsewhere-1-abcdef"})
        code = 200 if self.path == "/readyz" else 401
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


class SharedPortServer(http.server.ThreadingHTTPServer):
    allow_reuse_port = True  # shares the port with our replicas (SO_REUSEPORT, same user)


@pytest.mark.slow
def test_no_banner_when_another_gateway_answers_on_the_port(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    env = launcher_env(XDG_RUNTIME_DIR=str(runtime), ROUTERCTL_HAPROXY="")
    proc = Proc("routerctl-up", up_argv(local_config(tmp_path), port, "--replicas", "2"), env,
                tmp_path)  # fmt: skip
    children: dict[str, int] = {}
    try:
        # past the port check, before our replicas listen: the other gateway takes the port
        try:
            wait_until(lambda: "started mock claude" in proc.output(), 60, "the mocks to start")
        except TimeoutError:  # seen once in CI: what the launcher said by then
            raise AssertionError(f"no mock started within 60 s:\n{proc.output()}") from None
        with SharedPortServer(("127.0.0.1", port), Foreign) as foreign:
            threading.Thread(target=foreign.serve_forever, daemon=True).start()
            try:
                wait_until(
                    lambda: proc.popen.poll() is not None or BANNER_END in proc.output(), 90,
                    "the launcher to give up (or, wrongly, print its banner)",
                )  # fmt: skip
            finally:
                foreign.shutdown()
        out = proc.output()
        children = parse_children(out)
        assert proc.popen.wait(30) == 1, out
        assert "is answered by replica elsewhere-1-abcdef, which we did not start" in out
        assert "--port" in out
        assert BANNER_END not in out
        assert not list((runtime / "router-cluster").glob("*.json"))  # nothing recorded
    finally:
        proc.stop(timeout=30)
        kill_leftovers(children)


def parse_children(out: str) -> dict[str, int]:
    started = re.findall(r"^\[routerctl\] started (.+) pid (\d+)$", out, re.M)
    return {name: int(pid) for name, pid in started}
