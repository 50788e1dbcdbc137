"""healthd: the leader probes providers into Redis, publishes transitions once, hands over.

Real processes throughout: healthd daemons, mock providers, the session's private Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from healthd.probe import probe
from router.config import Config, parse_config
from router.state.health import ProbeWrite
from router.state.keys import Keys
from tests.helpers import (
    ENV,
    PROVIDER_KEY,
    SECRETS,
    Cluster,
    Mock,
    Proc,
    free_port,
    start_gateway,
    wait_until,
    write_config,
    write_with_epoch,
)

FAST = {"interval_s": 0.3, "timeout_s": 0.5, "rise": 2, "fall": 2}
# The mock answers GET /v1/models even while a fault is armed, so the outage test probes
# with a cheap completion instead (a configured probe), which the fault does hit.
CHAT_PROBE = {
    "method": "POST",
    "path": "/chat/completions",
    "body": {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
}
KEYS = Keys("rc", "default")  # write_config's key_prefix, and the default pool
ROUTES = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
SLACK_S = 2.0
"""Margin on every timing deadline, for a loaded CI machine; the measured times are printed."""


def start_healthd(cluster: Cluster, name: str, config: Path) -> tuple[Proc, str]:
    """Start one healthd on a free port and wait until it answers /healthz."""
    port = free_port()
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(config), "--port", str(port)]
    # REDIS_URL empty: the config's URL (the private Redis) wins over the environment's
    proc = cluster.start(name, argv, {**ENV, "REDIS_URL": ""})
    url = f"http://127.0.0.1:{port}"

    def up() -> dict[str, Any] | None:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{proc.output()}")
        return healthz(url)

    wait_until(up, 20, f"{name} to serve /healthz")
    return proc, url


def healthz(url: str) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError):
        return dict(httpx.get(f"{url}/healthz", timeout=1).json())
    return None


def status(url: str) -> dict[str, Any]:
    """/healthz of a daemon known to be serving."""
    found = healthz(url)
    assert found is not None, f"{url} does not answer /healthz"
    return found


def leading(url: str) -> bool:
    status = healthz(url)
    return bool(status and status["leading"])


def health_events(sub: Any, provider: str) -> list[dict[str, Any]]:
    """The health transitions of ``provider`` received so far (circuit events left out)."""
    events = []
    while (msg := sub.get_message(timeout=0.2)) is not None:
        if msg["type"] != "message":
            continue
        event = json.loads(msg["data"])
        if event.get("provider") == provider and "health" in event:
            events.append(event)
    return events


def fields(r: redis.Redis, provider: str) -> dict[str, str]:
    """The provider's shared hash, decoded."""
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.provider(provider)).items()}


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def transitions_logged(proc: Proc) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"] == "health transition"]


@pytest.mark.slow
def test_outage_is_detected_and_published_once_each_way(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mock = Mock("a", health={**FAST, "probe": CHAT_PROBE})
    gw = start_gateway(cluster, tmp_path, redis_url, [mock], ROUTES, replicas=0)
    r = redis.Redis(port=redis_port)
    sub = r.pubsub()
    sub.subscribe(KEYS.health_channel())
    proc, _ = start_healthd(cluster, "healthd", gw.config)
    wait_until(lambda: fields(r, "a").get("health") == "up", 10, "a to be up")
    assert [e["health"] for e in health_events(sub, "a")] == ["up"]

    injected_ms = time.time() * 1000
    mock.fault("error", status=503)
    bound = FAST["fall"] * FAST["interval_s"] * 1.1 + FAST["timeout_s"]
    wait_until(lambda: fields(r, "a").get("health") == "down", bound + SLACK_S, "a to be down")
    detected_ms = int(fields(r, "a")["h_since"]) - injected_ms
    print(f"\ndetection: down {detected_ms:.0f} ms after the fault (bound {bound * 1000:.0f} ms)")
    # a few more failed probes in a row, none of which may publish again
    wait_until(lambda: int(fields(r, "a")["h_bad"]) >= FAST["fall"] + 2, 5, "more bad probes")
    down = health_events(sub, "a")
    assert [(e["previous"], e["health"], e["error"]) for e in down] == [("up", "down", "HTTP 503")]

    mock.fault("none")
    wait_until(lambda: fields(r, "a").get("health") == "up", bound + SLACK_S, "a to be up again")
    wait_until(lambda: int(fields(r, "a")["h_ok"]) >= FAST["rise"] + 2, 5, "more good probes")
    assert [(e["previous"], e["health"]) for e in health_events(sub, "a")] == [("down", "up")]
    logged = [(t["previous"], t["health"]) for t in transitions_logged(proc)]
    assert logged == [("unknown", "up"), ("up", "down"), ("down", "up")]
    assert_no_secrets(proc.output())


def two_daemons(cluster: Cluster, config: Path) -> tuple[tuple[Proc, str], tuple[Proc, str]]:
    """Start two healthd; return (leader, standby) once exactly one leads."""
    daemons = [start_healthd(cluster, f"healthd-{i}", config) for i in range(2)]
    wait_until(lambda: [leading(url) for _, url in daemons].count(True) == 1, 10, "one leader")
    first, second = daemons
    leader, standby = (first, second) if leading(first[1]) else (second, first)
    assert not leading(standby[1])
    return leader, standby


def test_standby_takes_over_when_the_leader_dies(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mock = Mock("a", health=FAST)
    lease_s = 1.0
    gw = start_gateway(
        cluster, tmp_path, redis_url, [mock], ROUTES, replicas=0, healthd={"lease_s": lease_s}
    )
    (leader, leader_url), (_, standby_url) = two_daemons(cluster, gw.config)
    old_epoch = status(leader_url)["epoch"]

    killed = time.monotonic()
    leader.kill(signal.SIGKILL)
    wait_until(lambda: leading(standby_url), 2 * lease_s + SLACK_S, "the standby to lead")
    print(f"\ntakeover after SIGKILL: {time.monotonic() - killed:.2f} s (lease {lease_s} s)")
    new_epoch = status(standby_url)["epoch"]
    assert new_epoch > old_epoch

    before = fields(redis.Redis(port=redis_port), "a")
    stale = asyncio.run(write_with_epoch(gw.config, old_epoch))
    assert stale == ProbeWrite(recorded=False, state="", version=0)
    after = fields(redis.Redis(port=redis_port), "a")
    assert after.get("h_error") != "stale"
    assert after.get("health") == before.get("health")


def test_sigterm_resigns_so_the_standby_leads_at_once(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mock = Mock("a", health=FAST)
    lease_s = 3.0  # long, so taking over at once cannot be mistaken for the lease running out
    gw = start_gateway(
        cluster, tmp_path, redis_url, [mock], ROUTES, replicas=0, healthd={"lease_s": lease_s}
    )
    (leader, leader_url), (_, standby_url) = two_daemons(cluster, gw.config)
    leader_id = status(leader_url)["id"]

    stopped = time.monotonic()
    leader.kill(signal.SIGTERM)
    assert leader.popen.wait(10) == 0
    holder = redis.Redis(port=redis_port).get(KEYS.leader())
    assert holder != leader_id.encode()  # resigned: the lease is gone, not left to expire
    # Unresigned, the lease (renewed every lease_s / 3) would outlive the leader by at least
    # 2/3 of a lease; the standby's next tick comes at most lease_s / 3 after the resignation.
    wait_until(lambda: leading(standby_url), lease_s * 2 / 3, "the standby to lead")
    print(f"\ntakeover after SIGTERM: {time.monotonic() - stopped:.2f} s (lease {lease_s} s)")
    assert '"msg":"resigned"' in leader.output()


FAMILIES = {
    "healthd_leader": "gauge",
    "healthd_epoch": "gauge",
    "healthd_probes": "counter",
    "healthd_probe_duration_seconds": "histogram",
    "healthd_health_transitions": "counter",
}


def scrape(url: str) -> dict[str, float]:
    """GET /metrics, parsed as Prometheus text; sample (with its labels) -> value. Every family
    is there from the start but the latency histogram, which appears with the first probe."""
    resp = httpx.get(f"{url}/metrics", timeout=5)
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    families = list(text_string_to_metric_families(resp.text))
    got = {f.name: f.type for f in families}
    assert got == FAMILIES or got == {
        k: v for k, v in FAMILIES.items() if k != "healthd_probe_duration_seconds"
    }
    for family in families:
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    assert_no_secrets(resp.text)
    return samples


def test_metrics_count_probes_of_both_kinds(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    # default probes: GET /v1/models, which the mocks answer only with the right key headers
    mocks = [Mock("a", health=FAST), Mock("b", api="anthropic", health=FAST)]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, ROUTES, replicas=0)
    proc, url = start_healthd(cluster, "healthd", gw.config)
    ok = {p: f'healthd_probes_total{{provider="{p}",result="ok"}}' for p in ("a", "b")}
    first = wait_until(lambda: (m := scrape(url))[ok["a"]] >= 1 and m[ok["b"]] >= 1 and m, 10,
                       "a probe of each")  # fmt: skip
    later = wait_until(lambda: (m := scrape(url))[ok["a"]] > first[ok["a"]] + 1 and m, 10,
                       "probe counts to move")  # fmt: skip
    assert later[ok["b"]] > first[ok["b"]]
    assert later['healthd_probes_total{provider="a",result="fail"}'] == 0
    assert later["healthd_leader"] == 1
    assert later["healthd_epoch"] >= 1
    assert later['healthd_probe_duration_seconds_count{provider="a"}'] >= 1
    assert later['healthd_probe_duration_seconds_count{provider="b"}'] >= 1
    sum_b = later['healthd_probe_duration_seconds_sum{provider="b"}']
    assert (
        0 < sum_b < FAST["timeout_s"] * later['healthd_probe_duration_seconds_count{provider="b"}']
    )
    assert later['healthd_health_transitions_total{provider="a",to="up"}'] == 1
    assert_no_secrets(proc.output())


def test_no_redis_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    config = write_config(tmp_path / "router.yaml", None, [Mock("a")], ROUTES)
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(config), "--port", "0"]
    env = {**os.environ, **ENV, "REDIS_URL": ""}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "no shared store" in done.stderr
    assert "redis_url" in done.stderr
    assert "REDIS_URL" in done.stderr
    assert "embedded" in done.stderr


def test_unreachable_redis_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = write_config(tmp_path / "router.yaml", dead, [Mock("a")], ROUTES)
    argv = [sys.executable, "-m", "healthd.cli", "--config", str(config), "--port", "0"]
    env = {**os.environ, **ENV, "REDIS_URL": ""}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "healthd: cannot start: shared store unavailable" in done.stderr
    assert "Traceback" not in done.stderr


def provider_config(mock: Mock, **health: Any) -> Config:
    """A config whose only provider points at ``mock`` (no Redis: only the probe is used)."""
    data = {
        "client_keys": [{"env": "ROUTER_CLIENT_KEY"}],
        "providers": [{**mock.config(), "health": {**FAST, **health}}],
        "routes": [{"model": "chat", "targets": [{"provider": mock.name, "model": "m"}]}],
    }
    return parse_config(data, dict(ENV))


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"mode": "none"}, ""),
        ({"mode": "rate_limit"}, "HTTP 429 (rate-limited, counted as up)"),
        ({"mode": "error", "status": 503}, "HTTP 503"),
        ({"mode": "hang"}, "timed out after 0.5s"),
    ],
)
async def test_probe_verdicts(cluster: Cluster, fault: dict[str, Any], error: str) -> None:
    mock = Mock("a")
    cluster.mock("a", mock.port, "--api-key", PROVIDER_KEY)
    mock.fault(**fault)
    cfg = provider_config(mock, probe=CHAT_PROBE)
    async with httpx.AsyncClient() as client:
        result = await probe(client, cfg.providers[0])
    assert (result.ok, result.error) == (not error or "429" in error, error)
    assert result.latency_ms > 0


async def test_probe_of_a_dead_port_says_connect_failed() -> None:
    cfg = provider_config(Mock("nobody"))  # never started: nothing listens on its port
    async with httpx.AsyncClient() as client:
        result = await probe(client, cfg.providers[0])
    assert result == (False, result.latency_ms, "connect failed (ConnectError)")


async def test_probe_with_a_wrong_key_is_bad(cluster: Cluster) -> None:
    mock = Mock("a", api="anthropic")
    cluster.mock("a", mock.port, "--api", "anthropic", "--api-key", "another-key")
    async with httpx.AsyncClient() as client:
        result = await probe(client, provider_config(mock).providers[0])
    assert (result.ok, result.error) == (False, "HTTP 401")
