"""After ``routerctl up``, the other commands find the cluster without flags or secrets.

One launcher for the module (one replica, its private redis-server), recording itself in a
runtime dir of the test's own (``XDG_RUNTIME_DIR``), so launchers of other tests are not seen.
Every ``routerctl`` here runs from another directory, with no ``--config``, no
``ROUTER_CONFIG``, no ``REDIS_URL`` and none of the config's secrets in its environment.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Proc, free_port, launcher_env, local_config, wait_until
from tests.integration.test_launcher import banner, found, kill_leftovers, parse, up_argv

pytestmark = pytest.mark.slow


@dataclass
class Up:
    """The running launcher, its banner, and the environment of a user's other shell."""

    proc: Proc
    output: str
    config: Path
    port: int
    env: dict[str, str]
    cwd: Path


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("found")
    runtime = tmp / "run"
    runtime.mkdir(mode=0o700)
    config, port = local_config(tmp), free_port()
    env = launcher_env(XDG_RUNTIME_DIR=str(runtime), ROUTERCTL_HAPROXY="")
    env.pop("ROUTER_CONFIG", None)
    proc = Proc("routerctl-up", up_argv(config, port), env, tmp)
    children: dict[str, int] = {}
    try:
        out = wait_until(lambda: banner(proc), 90, "the launcher's banner")
        children = parse(proc, out).children
        elsewhere = tmp / "elsewhere"
        elsewhere.mkdir()
        yield Up(proc, out, config, port, env, elsewhere)
    finally:
        proc.stop(timeout=30)
        kill_leftovers(children)


def routerctl(
    up: Up, *args: str, argv0: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [*(argv0 or [sys.executable, "-m", "router.ctl"]), *args]
    return subprocess.run(argv, env=up.env, cwd=up.cwd, capture_output=True, text=True, timeout=60)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


def names_the_cluster(up: Up, stderr: str) -> None:
    assert f"the local cluster on port {up.port} (routerctl up, pid {up.proc.pid})" in stderr
    assert str(up.config) in stderr


def providers(up: Up) -> dict[str, dict[str, Any]]:
    state = json.loads(ok(routerctl(up, "state", "--json")))
    return {p["name"]: p for p in state["providers"]}


def test_the_banner_prints_ready_to_paste_state_and_redis_cli_lines(up: Up) -> None:
    state = found(r"^  inspect +(\S*routerctl state)$", up.output)
    redis = found(r"^ +(redis-cli -u redis://127\.0\.0\.1:\d+/0)$", up.output)
    assert "***" not in redis  # the private redis-server has no password to hide
    done = routerctl(up, argv0=shlex.split(state))
    assert "pool default · prefix rc" in ok(done)
    names_the_cluster(up, done.stderr)
    if shutil.which("redis-cli"):
        argv = [*shlex.split(redis), "ping"]
        pong = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
        assert pong.stdout.strip() == "PONG"


def test_state_keys_drain_and_enable_need_no_flag_and_no_secret(up: Up) -> None:
    done = routerctl(up, "state", "--json")
    names_the_cluster(up, done.stderr)
    assert set(providers(up)) == {"fast-openai", "slow-openai", "claude"}
    keys = routerctl(up, "keys")
    assert re.search(r"\d+ keys present", ok(keys))
    names_the_cluster(up, keys.stderr)
    drained = routerctl(up, "drain", "claude")
    assert "claude: drained for every replica" in ok(drained)
    names_the_cluster(up, drained.stderr)
    assert providers(up)["claude"]["drained"] is True
    assert "claude: enabled for every replica" in ok(routerctl(up, "enable", "claude"))
    assert providers(up)["claude"]["drained"] is False


def test_with_the_clusters_config_it_reads_the_clusters_redis(up: Up) -> None:
    done = routerctl(up, "state", "--config", str(up.config))
    assert "pool default · prefix rc" in ok(done)
    names_the_cluster(up, done.stderr)


def test_a_stale_record_is_ignored_and_removed(up: Up) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass", "routerctl", "up"])
    gone.wait()
    port = free_port()
    stale = {
        "port": port, "endpoint": "http://127.0.0.1:9/v1", "config": str(up.config),
        "redis_url": "redis://127.0.0.1:9/0", "pid": gone.pid, "started": "2024-01-01T00:00Z",
    }  # fmt: skip
    path = Path(up.env["XDG_RUNTIME_DIR"]) / "router-cluster" / f"port-{port}.json"
    assert path.parent.is_dir()  # where the running launcher recorded itself
    path.write_text(json.dumps(stale))
    done = routerctl(up, "state")
    ok(done)
    names_the_cluster(up, done.stderr)  # not "several local clusters"
    assert not path.exists()


def test_loadtest_runs_against_the_cluster_with_the_key_it_generated(up: Up) -> None:
    out = up.cwd / "results"
    args = ["loadtest", "--users", "2", "--spawn-rate", "2", "--duration", "3"]
    done = routerctl(up, *args, "--out", str(out))
    assert f"routerctl loadtest: the local cluster on port {up.port}" in ok(done)
    assert "starting a local cluster" not in done.stdout
    report = json.loads((out / "providers.json").read_text())
    assert report["host"] == f"http://127.0.0.1:{up.port}"
    assert report["received"] > 0
    assert report["rate_limited"] == 0
