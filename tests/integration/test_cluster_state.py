"""See the cluster: routerctl state and keys, and the admin API, on real replicas and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from router.config import parse_config
from router.state.cluster import describe_keys, read_state
from router.state.keys import Keys
from router.state.store import Store
from tests.helpers import (
    ADMIN_TOKEN,
    CLIENT_KEY,
    ENV,
    SECRETS,
    Cluster,
    Gateway,
    Mock,
    auth,
    port_open,
    redis_server,
    start_gateway,
    wait_until,
    write_config,
)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEYS = Keys("rc", "default")


def start(cluster: Cluster, tmp_path: Path, redis_url: str | None, **extra: Any) -> Gateway:
    mocks = [
        Mock("a", limits={"rpm": 100, "tpm": 50_000, "max_in_flight": 4}),
        Mock("b", weight=2, limits={"rpm": 50}),
        Mock("slow", "--latency-ms", "4000"),
    ]
    routes = [
        {"model": "chat", "strategy": "round_robin",
         "targets": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]},
        {"model": "slow-chat", "targets": [{"provider": "slow", "model": "m"}]},
    ]  # fmt: skip
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=2, **extra)


def ctl(gw: Gateway, *args: str) -> str:
    """Run ``routerctl`` on the gateway's config; its output, after checking it keeps secrets."""
    argv = [sys.executable, "-m", "router.ctl", *args, "--config", str(gw.config)]
    env = {**os.environ, **ENV, "COLUMNS": "220"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout + done.stderr)
    return done.stdout


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def state_of(gw: Gateway) -> dict[str, Any]:
    return dict(json.loads(ctl(gw, "state", "--json")))


def by_name(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in state["providers"]}


def admin(url: str, method: str, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.request(method, f"{url}/admin{path}", headers=headers, timeout=10)
    assert_no_secret(r.text)
    return r


def test_routerctl_state_shows_traffic_limits_and_replicas(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = start(cluster, tmp_path, redis_url)
    with httpx.Client(headers=auth(), timeout=10) as client:
        for _ in range(6):
            assert client.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT).status_code == 200

    state = state_of(gw)
    p = by_name(state)
    assert (state["schema"], state["pool"], state["key_prefix"]) == (1, "default", "rc")
    assert (p["a"]["rpm_used"], p["b"]["rpm_used"], p["slow"]["rpm_used"]) == (3, 3, 0)
    assert p["a"]["tpm_used"] > 0
    assert [q["in_flight"] for q in state["providers"]] == [0, 0, 0]
    assert (p["a"]["rpm_limit"], p["a"]["tpm_limit"], p["a"]["max_in_flight"]) == (100, 50_000, 4)
    assert (p["b"]["rpm_limit"], p["b"]["tpm_limit"], p["b"]["max_in_flight"]) == (50, None, None)
    assert (p["a"]["outcomes"], p["b"]["weight"]) == ({"ok": 3}, 2)
    assert (p["a"]["health"], p["a"]["circuit"], p["a"]["drained"]) == ("unknown", "closed", False)
    assert len({r["id"] for r in state["replicas"]}) == 2
    assert all(r["pid"] and r["age_s"] < 10 for r in state["replicas"])
    assert state["routes"][0]["targets"][1] == {"provider": "b", "model": "m", "weight": 2}

    table = ctl(gw, "state")
    assert all(name in table for name in ("route chat", "route slow-chat", " a ", " b ", "slow"))
    assert "2 live replicas" in table
    assert "3/100" in table  # a's RPM used / limit
    print(table)


def test_a_slow_request_shows_in_flight_and_its_lease_key(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = start(cluster, tmp_path, redis_url)
    body = {**CHAT, "model": "slow-chat"}
    answers: list[int] = []

    def slow() -> None:
        r = httpx.post(f"{gw.urls[1]}/v1/chat/completions", json=body, headers=auth(), timeout=20)
        answers.append(r.status_code)

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_until(lambda: admin(gw.urls[0], "GET", "/state").json()["providers"][2]["in_flight"],
                   5, "the slow request to be in flight")  # fmt: skip
        assert by_name(state_of(gw))["slow"]["in_flight"] == 1
        keys = ctl(gw, "keys")
    finally:
        thread.join(20)
    assert answers == [200]
    assert by_name(state_of(gw))["slow"]["in_flight"] == 0

    rows = {line.split()[1]: line.split()[3] for line in keys.splitlines() if " rc:" in line}
    assert rows[KEYS.leases("slow")] == "zset"
    assert rows[KEYS.provider("slow")] == "hash"
    assert rows[KEYS.replicas()] == "zset"
    assert rows[KEYS.leases("a")] == "none"  # nothing in flight there: Redis holds no key
    print(keys)


def test_admin_api_state_auth_and_drain(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    gw = start(cluster, tmp_path, redis_url)
    url = gw.urls[1]
    assert admin(url, "GET", "/state", token=None).status_code == 401
    assert admin(url, "GET", "/state", token="not-the-token").status_code == 401
    refused = admin(url, "GET", "/state", token=CLIENT_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert admin(url, "POST", "/providers/a/drain", token=CLIENT_KEY).status_code == 403

    state = admin(url, "GET", "/state")
    assert state.status_code == 200
    cli = state_of(gw)
    assert state.json().keys() == cli.keys()
    assert state.json()["providers"][0].keys() == cli["providers"][0].keys()
    assert by_name(state.json()).keys() == by_name(cli).keys()

    drained = admin(url, "POST", "/providers/a/drain")
    assert drained.status_code == 200
    assert drained.json()["provider"] == "a"
    assert drained.json()["drained"] is True
    assert by_name(state_of(gw))["a"]["drained"] is True
    assert "DRAINED" in ctl(gw, "state")
    enabled = admin(url, "POST", "/providers/a/enable").json()
    assert enabled["drained"] is False
    assert enabled["version"] > drained.json()["version"]
    assert by_name(admin(gw.urls[0], "GET", "/state").json())["a"]["drained"] is False

    missing = admin(url, "POST", "/providers/nope/drain")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "provider_not_found"


def test_admin_api_is_off_without_an_admin_token(cluster: Cluster, tmp_path: Path) -> None:
    os.environ.pop("REDIS_URL", None)
    gw = start_gateway(cluster, tmp_path, None, [Mock("a")],
                       [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}],
                       admin_token=None)  # fmt: skip
    r = admin(gw.urls[0], "GET", "/state")
    assert r.status_code == 403
    assert "admin_token" in r.json()["error"]["message"]


def test_admin_state_is_503_while_redis_is_away(cluster: Cluster, tmp_path: Path) -> None:
    with redis_server(tmp_path) as (port, proc):
        routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
        gw = start_gateway(cluster, tmp_path, f"redis://127.0.0.1:{port}/0", [Mock("a")], routes)
        url = gw.urls[0]
        assert admin(url, "GET", "/state").status_code == 200
        proc.stop()
        wait_until(lambda: not port_open(port), 5, "redis to stop")

        def degraded() -> bool:
            return bool(httpx.get(f"{url}/readyz", timeout=5).json()["status"] == "degraded")

        wait_until(degraded, 5, "the replica to go degraded")
        r = admin(url, "GET", "/state")
    assert r.status_code == 503
    assert "Redis" in r.json()["error"]["message"]


def test_routerctl_state_needs_a_redis(tmp_path: Path) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
    config = write_config(tmp_path / "router.yaml", None, [Mock("a")], routes)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    argv = [sys.executable, "-m", "router.ctl", "state", "--config", str(config)]
    done = subprocess.run(argv, env={**env, **ENV}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "names no Redis" in done.stderr


async def test_read_state_counts_only_the_window_and_unexpired_leases(redis_url: str) -> None:
    data = {
        "client_keys": [{"env": "K"}], "redis_url": redis_url,
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://x/v1",
                       "limits": {"rpm": 10}}],
        "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
    }  # fmt: skip
    cfg = parse_config(data, {"K": "client-key"})
    client = aioredis.Redis.from_url(redis_url)
    now_s, _ = await client.time()
    now_ms = now_s * 1000
    # a stale running total and a bucket long out of the window: neither may count
    await client.hset(KEYS.provider("p"), mapping={
        "rpm": 999, f"r:{now_s - 100}": 50, f"r:{now_s}": 2, f"t:{now_s}": 30, "o:ok": 5,
        "health": "down", "h_since": now_ms - 1000, "cool": now_ms - 5, "drain": 1,
    })  # fmt: skip
    await client.zadd(KEYS.leases("p"), {"live": now_ms + 60_000, "dead": now_ms - 1})
    await client.aclose()
    store = Store.from_config(cfg)
    await store.start(warm=1)
    try:
        state = await read_state(store, cfg)
        keys = {k.key: k for k in await describe_keys(store, cfg)}
    finally:
        await store.close()
    p = state.providers[0]
    assert (p.rpm_used, p.tpm_used, p.in_flight, p.outcomes) == (2, 30, 1, {"ok": 5})
    assert (p.health, p.health_since_ms, p.drained) == ("down", now_ms - 1000, True)
    assert p.cooldown_until_ms == 0  # past
    assert state.replicas == ()
    assert abs(state.taken_at_ms - time.time() * 1000) < 5_000
    assert (keys[KEYS.provider("p")].type, keys[KEYS.provider("p")].ttl_ms) == ("hash", None)
    assert keys[KEYS.leases("p")].type == "zset"
    assert keys[KEYS.leader()].type == "none"
