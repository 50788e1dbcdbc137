"""``routerctl simulate``: every strategy's split, in numbers, through one real cluster.

One cluster for the module, started by the launcher (``routerctl up``: the three mock
providers of ``examples/simulate.yaml`` on free ports, a private redis-server, two
replicas), and one ``routerctl simulate --host`` per strategy, each on the route of
``examples/simulate.yaml`` that uses it. The launcher paces every mock alike, so the config's
``least_latency`` route has a fourth provider, a 1 ms mock on 127.0.0.2 (loopback, but not an
address the launcher mocks), started here with the command the config's comments give: the
README's table comes from the shipped config as it is, but for the ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from loadtest.loadrun import Gateway, LocalCluster
from loadtest.procs import free_port
from tests.helpers import ROOT, Proc, wait_until

REQUESTS = 150  # a multiple of 6: whole rounds of round robin (3) and of weights 1, 2, 3
CONCURRENCY = 8
FAST_HOST = "127.0.0.2"
EXAMPLE = ROOT / "examples" / "simulate.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUTES = {
    "round_robin": "sim-round-robin",
    "weighted": "sim-weighted",
    "least_connections": "sim-least-connections",
    "least_latency": "sim-least-latency",
    "headroom": "sim-headroom",
}
# headroom first: on windows nothing else has filled yet its figures are the plain limit shares
ORDER = ("headroom", "round_robin", "weighted", "least_connections", "least_latency")
WEIGHTS = {"alpha": 1, "beta": 2, "gamma": 3}
CAPACITY = {"alpha": 600, "beta": 300, "gamma": 450}  # RPM, RPM, TPM 10800 / 24 tokens


@dataclass
class Sim:
    """The module's cluster, its config and a place for results."""

    gateway: Gateway
    config: Path
    tmp: Path


def launcher_env(**extra: str) -> dict[str, str]:
    """Our environment without Redis or secrets: the launcher provides both."""
    drop = {"REDIS_URL", "ROUTER_CLIENT_KEY", "ROUTER_ADMIN_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def simulate_config(tmp: Path) -> Path:
    """examples/simulate.yaml with every provider on a free port of its own address."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    for provider in cfg["providers"]:
        url = urlsplit(provider["base_url"])
        port = free_port(url.hostname or "")
        provider["base_url"] = url._replace(netloc=f"{url.hostname}:{port}").geturl()
    path = tmp / "simulate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fast_port(config: Path) -> int:
    """The port of the config's fast provider, on 127.0.0.2."""
    cfg = yaml.safe_load(config.read_text())
    url = urlsplit(next(p["base_url"] for p in cfg["providers"] if p["name"] == "fast"))
    assert url.hostname == FAST_HOST
    assert url.port is not None
    return url.port


def fast_mock_argv(port: int) -> list[str]:
    """The command examples/simulate.yaml's comments give for its fast mock, on ``port``."""
    lines = EXAMPLE.read_text().splitlines()
    argv = next(line for line in lines if "loadtest.mock_provider" in line).lstrip("# ").split()
    assert argv[:3] == ["python", "-m", "loadtest.mock_provider"]
    assert argv[argv.index("--host") + 1] == FAST_HOST
    argv[argv.index("--port") + 1] = str(port)
    return [sys.executable, *argv[1:]]


def fast_mock(tmp: Path, port: int) -> Proc:
    """The config's 1 ms mock, on 127.0.0.2, once it serves."""
    proc = Proc("mock-fast", fast_mock_argv(port), launcher_env(), tmp)

    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the fast mock exited:\n{proc.output()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://{FAST_HOST}:{port}/stats", timeout=1).status_code == 200
        return False

    wait_until(ready, 20, "the fast mock")
    return proc


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """One cluster (launcher, 2 replicas) plus the fast mock, for every strategy."""
    tmp = tmp_path_factory.mktemp("simulate")
    config = simulate_config(tmp)
    fast = fast_mock(tmp, fast_port(config))
    try:
        with LocalCluster(config, 2, tmp / "cluster.log", launcher_env()) as gateway:
            yield Sim(gateway, config, tmp)
    finally:
        fast.stop()


def run_simulate(config: Path, out: Path, *args: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Run ``routerctl simulate``, expect success, return its JSON report."""
    argv = [sys.executable, "-m", "router.ctl", "simulate", "--config", str(config)]
    argv += ["--requests", str(REQUESTS), "--concurrency", str(CONCURRENCY), "--out", str(out)]
    done = subprocess.run(
        [*argv, *args], env=dict(env), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    print(done.stdout)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    strategy = args[args.index("--strategy") + 1]
    png = out / f"simulate-{strategy}.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    report: dict[str, Any] = json.loads((out / f"simulate-{strategy}.json").read_text())
    return report


def received(report: Mapping[str, Any]) -> dict[str, int]:
    """Requests each provider received, by its own count."""
    return {r["name"]: r["received"] for r in report["providers"]}


def check_headroom(report: Mapping[str, Any]) -> None:
    """As the water-filled limits say, alpha > gamma > beta; the plain limit shares when the
    windows started empty."""
    got = received(report)
    for row in report["providers"]:
        assert abs(row["received"] - row["expected"]) <= 3, row
    assert got["alpha"] > got["gamma"] > got["beta"]  # 600 > 450 > 300
    assert [r["binding"] for r in report["providers"]] == ["rpm", "rpm", "tpm"]
    if all(r["rpm_start"] == 0 for r in report["providers"]):  # empty windows at the start
        for name, count in received(report).items():
            assert abs(count / REQUESTS - CAPACITY[name] / 1350) <= 0.03


def check_round_robin(report: Mapping[str, Any]) -> None:
    """One shared rotation: counts within one of each other."""
    counts = received(report).values()
    assert max(counts) - min(counts) <= 1


def check_weighted(report: Mapping[str, Any]) -> None:
    """Within 3 % of the weight shares 1:2:3."""
    for name, count in received(report).items():
        assert abs(count / REQUESTS - WEIGHTS[name] / 6) <= 0.03, received(report)


def check_least_connections(report: Mapping[str, Any]) -> None:
    """Everyone gets some; the heaviest weight gets more than the lightest."""
    got = received(report)
    assert all(got.values())
    assert got["gamma"] > got["alpha"]  # weight 3 against 1, equally fast


def check_least_latency(report: Mapping[str, Any]) -> None:
    """The fast mock gets more than any other."""
    got = received(report)
    fast = got.pop("fast")
    assert fast > max(got.values()), received(report)


CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "headroom": check_headroom,
    "round_robin": check_round_robin,
    "weighted": check_weighted,
    "least_connections": check_least_connections,
    "least_latency": check_least_latency,
}


def check_common(report: Mapping[str, Any], strategy: str) -> None:
    """Every request answered, no provider over a limit, peaks sampled and within bounds."""
    assert report["strategy"] == strategy
    assert report["statuses"] == {"200": REQUESTS}
    assert report["provider_429s"] == 0
    assert sum(received(report).values()) == REQUESTS
    assert report["state_samples"] >= 2
    for row in report["providers"]:
        assert row["rate_limited"] == 0
        assert 0 <= row["in_flight_peak"] <= CONCURRENCY
        for key in ("rpm", "tpm"):
            limit = row[f"{key}_limit"]
            assert limit is None or row[f"{key}_peak"] <= limit


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ORDER)
def test_each_strategy_splits_as_expected(sim: Sim, strategy: str) -> None:
    out = sim.tmp / strategy
    assert sim.gateway.key is not None
    assert sim.gateway.redis_url is not None
    env = launcher_env(ROUTER_CLIENT_KEY=sim.gateway.key)
    redis = ["--redis-url", sim.gateway.redis_url]
    report = run_simulate(
        sim.config, out, "--host", sim.gateway.root, "--strategy", strategy, *redis, env=env
    )
    assert report["route"] == ROUTES[strategy]  # the route that uses the strategy
    assert not report["replaced"]
    check_common(report, strategy)
    CHECKS[strategy](report)


def gone(pid: int) -> bool:
    """True once no process has this PID (or it is a zombie nobody reaped yet)."""
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "route", "replaced"),
    [
        (("--strategy", "weighted"), "sim-weighted", False),
        (("--route", "sim-round-robin", "--strategy", "weighted"), "sim-round-robin", True),
    ],
    ids=["the-route-of-the-strategy", "a-route-with-its-strategy-replaced"],
)
def test_without_host_it_starts_a_cluster_and_stops_it(
    tmp_path: Path, args: tuple[str, ...], route: str, replaced: bool
) -> None:
    config = simulate_config(tmp_path)
    report = run_simulate(config, tmp_path / "out", *args, env=launcher_env())
    assert (report["route"], report["replaced"]) == (route, replaced)
    check_common(report, "weighted")
    assert received(report) == {"alpha": 25, "beta": 50, "gamma": 75}  # a fresh rotation
    log = (tmp_path / "out" / "simulate-weighted-cluster.log").read_text()
    assert "[routerctl] stopped;" in log
    pids = [int(p) for p in re.findall(r"^\[routerctl\] started .+ pid (\d+)$", log, re.M)]
    assert pids
    assert all(gone(pid) for pid in pids)


def test_a_route_that_does_not_use_the_strategy_is_refused_with_host(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "router.ctl", "simulate", "--config"]
    argv += [str(simulate_config(tmp_path)), "--host", "http://127.0.0.1:9", "--route"]
    argv += ["sim-weighted", "--strategy", "headroom", "--out", str(tmp_path)]
    done = subprocess.run(
        argv, env=launcher_env(), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 2
    assert "route 'sim-weighted' uses weighted, not headroom" in done.stderr
