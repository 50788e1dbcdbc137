"""Tenants and keys through the admin API, on two replicas sharing a real Redis: a key issued
on one replica works on both within a second; revoked, it is refused on both within a second;
no key is ever stored, logged or shown again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.helpers import ADMIN_TOKEN, CLIENT_KEY, ENV, Cluster, Gateway, Mock, wait_until

TEAM_A_KEY = "team-a-config-key-0123456789"
ROUTES = [
    {"model": "chat", "targets": [{"provider": "a", "model": "m"}]},
    {"model": "other", "targets": [{"provider": "a", "model": "m"}]},
]
TENANTS = [{"name": "team-a", "keys": [{"env": "TEAM_A_KEY"}], "routes": ["chat"],
            "limits": {"rpm": 1000}}]  # fmt: skip
PROPAGATION_S = 1.0
"""The contract: a key issued or revoked is honoured or refused everywhere within this."""


@pytest.fixture
def gw(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    from tests.helpers import start_gateway

    g = start_gateway(cluster, tmp_path, redis_url, [Mock("a")], ROUTES, replicas=0,
                      tenants=TENANTS)  # fmt: skip
    for _ in range(2):
        g.add_replica({"TEAM_A_KEY": TEAM_A_KEY})
    return g


def admin(url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return httpx.request(method, f"{url}/admin{path}", json=body, headers=headers, timeout=10)


def chat(url: str, key: str, model: str = "chat") -> int:
    """The status of one chat completion through the openai SDK (200, or the error's)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10) as client:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


def within_a_second_of(answered: float, cond: Any, what: str) -> None:
    left = answered + PROPAGATION_S - time.monotonic()
    wait_until(cond, max(left, 0.0), what)


def test_an_issued_key_works_on_every_replica_within_a_second_then_revoked_is_refused(
    gw: Gateway,
) -> None:
    first, second = gw.urls
    r = admin(first, "POST", "/tenants/team-a/keys")
    answered = time.monotonic()
    assert r.status_code == 201, r.text
    issued = r.json()
    key = issued["key"]
    assert set(issued) == {"tenant", "id", "created", "key"}
    assert issued["tenant"] == "team-a"
    assert key.startswith("sk-rc-")
    within_a_second_of(
        answered, lambda: all(chat(u, key) == 200 for u in gw.urls), "the key on both replicas"
    )
    r = admin(second, "DELETE", f"/tenants/team-a/keys/{issued['id']}")
    answered = time.monotonic()
    assert r.status_code == 200, r.text
    within_a_second_of(
        answered, lambda: all(chat(u, key) == 401 for u in gw.urls), "401 on both replicas"
    )
    assert admin(first, "DELETE", f"/tenants/team-a/keys/{issued['id']}").status_code == 404
    assert chat(first, TEAM_A_KEY) == 200  # the config's key is not the issued one


def test_a_tenant_created_through_the_api_gets_keys_and_limits(gw: Gateway) -> None:
    first, second = gw.urls
    spec = {"name": "team-c", "limits": {"rpm": 50}, "budget": {"usd": 5, "period": "day"}}
    r = admin(first, "POST", "/tenants", spec)
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "api"
    assert admin(second, "POST", "/tenants", spec).json()["error"]["code"] == "tenant_exists"
    r = admin(second, "POST", "/tenants/team-c/keys")
    answered = time.monotonic()
    key = r.json()["key"]
    within_a_second_of(
        answered, lambda: all(chat(u, key) == 200 for u in gw.urls), "the new tenant's key"
    )
    r = admin(first, "PUT", "/tenants/team-c", {"limits": {"rpm": 7}, "routes": ["other"]})
    assert r.status_code == 200, r.text
    within_a_second_of(
        time.monotonic(), lambda: all(chat(u, key) == 404 for u in gw.urls), "the new allow-list"
    )
    listed = {t["name"]: t for t in admin(second, "GET", "/tenants").json()["tenants"]}
    c = listed["team-c"]
    assert (c["owner"], c["limits"]["rpm"], c["routes"], c["budget"]) == ("api", 7, ["other"], None)
    r = admin(second, "DELETE", "/tenants/team-c")
    assert r.status_code == 200, r.text
    assert r.json()["keys_revoked"] == 1
    within_a_second_of(
        time.monotonic(), lambda: all(chat(u, key) == 401 for u in gw.urls), "the tenant gone"
    )
    assert admin(first, "DELETE", "/tenants/team-c").json()["error"]["code"] == "tenant_not_found"
    assert admin(first, "PUT", "/tenants/team-c", {}).status_code == 404
    assert admin(first, "POST", "/tenants/team-c/keys").status_code == 404


@pytest.mark.parametrize("name", ["team-a", "default"])
def test_config_owned_tenants_refuse_changes_but_take_keys(gw: Gateway, name: str) -> None:
    url = gw.urls[0]
    for method, path, body in (
        ("POST", "/tenants", {"name": name}),
        ("PUT", f"/tenants/{name}", {"limits": {"rpm": 1}}),
        ("DELETE", f"/tenants/{name}", None),
    ):
        r = admin(url, method, path, body)
        assert r.status_code == 403, (method, r.text)
        assert r.json()["error"]["code"] == "config_owned"
    r = admin(url, "POST", f"/tenants/{name}/keys")
    assert r.status_code == 201
    assert chat(url, r.json()["key"]) == 200


def test_bodies_are_validated_and_bounded(gw: Gateway) -> None:
    url = gw.urls[0]
    for body, param in (
        ({"name": "bad name!"}, "name"),
        ({"name": "x", "limits": {"rpm": 0}}, "limits.rpm"),
        ({"name": "x", "routes": ["chat", "nope"]}, "routes[1]"),
        ({"name": "x", "budget": {"usd": 1, "period": "year"}}, "budget.period"),
        ({"name": "x", "extra": 1}, "extra"),
    ):
        r = admin(url, "POST", "/tenants", body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    r = admin(url, "PUT", "/tenants/x", {"name": "y"})
    assert r.status_code == 400
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    big = b'{"name": "x", "routes": [' + b'"chat",' * 20_000 + b'"chat"]}'
    r = httpx.post(f"{url}/admin/tenants", content=big, headers=headers, timeout=10)
    assert r.status_code == 413
    client = {"Authorization": f"Bearer {TEAM_A_KEY}"}
    r = httpx.get(f"{url}/admin/tenants", headers=client, timeout=10)
    assert r.status_code == 403  # a client key is told it is one
    assert httpx.get(f"{url}/admin/tenants", timeout=10).status_code == 401


def test_an_allow_list_hides_the_other_routes(gw: Gateway) -> None:
    url = gw.urls[1]
    assert chat(url, TEAM_A_KEY, "chat") == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TEAM_A_KEY, max_retries=0)
    everyone = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
    with client, everyone:
        check_allow_list(client, everyone)


def check_allow_list(client: openai.OpenAI, everyone: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    body = err.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["message"] == "The model 'other' does not exist or you do not have access to it"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "do not have access" in str(err.value)  # the same answer: no route is revealed
    assert [m.id for m in client.models.list()] == ["chat"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert client.models.retrieve("chat").id == "chat"
    assert [m.id for m in everyone.models.list()] == ["chat", "other"]


def _redis_text(redis_url: str) -> bytes:
    """Every key and value of the Redis, as bytes."""
    client = redis.Redis.from_url(redis_url)
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        out.append(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            out += [x for kv in client.hgetall(key).items() for x in kv]
        elif kind == b"zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind in (b"list", b"set"):
            out += client.lrange(key, 0, -1) if kind == b"list" else list(client.smembers(key))
    client.close()
    return b"\n".join(out)


def test_no_key_in_clear_in_redis_logs_or_answers(gw: Gateway, redis_url: str) -> None:
    first, second = gw.urls
    admin(first, "POST", "/tenants", {"name": "team-d"})
    keys = [admin(first, "POST", f"/tenants/{t}/keys").json() for t in ("team-d", "team-a")]
    for k in keys:
        within_a_second_of(time.monotonic(), lambda k=k: chat(second, k["key"]) == 200, "key")
    admin(second, "DELETE", f"/tenants/team-a/keys/{keys[1]['id']}")
    listing = admin(second, "GET", "/tenants")
    ids = {t["name"]: [k["id"] for k in t["keys"]] for t in listing.json()["tenants"]}
    assert ids["team-d"] == [keys[0]["id"]]
    assert ids["team-a"] == []
    stored = _redis_text(redis_url)
    assert b"rc:{default}:tenant-keys" in stored  # the scan did see the keys' hashes
    for text in (
        stored.decode(errors="replace"),
        listing.text,
        *(p.output() for p, _ in gw.replicas),
    ):
        for secret in (k["key"] for k in keys):
            assert secret not in text
        assert TEAM_A_KEY not in text
        assert CLIENT_KEY not in text


def routerctl(gw: Gateway, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "router.ctl", *args, "--url", gw.urls[1]]
    full = {**os.environ, **ENV, "COLUMNS": "200", **env}
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=30)


def test_routerctl_manages_tenants_through_a_live_replica(gw: Gateway) -> None:
    import json

    done = routerctl(gw, "tenant", "add", "team-e", "--rpm", "30", "--budget-usd", "2",
                     "--period", "day", "--routes", "chat")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = routerctl(gw, "tenant", "key-add", "team-e")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("sk-rc-")
    assert key not in done.stderr
    within_a_second_of(time.monotonic(), lambda: chat(gw.urls[0], key) == 200, "the ctl's key")
    listing = json.loads(routerctl(gw, "tenants", "--json").stdout)
    e = {t["name"]: t for t in listing["tenants"]}["team-e"]
    assert (e["owner"], e["limits"]["rpm"], e["routes"]) == ("api", 30, ["chat"])
    assert e["budget"] == {"usd": 2.0, "period": "day"}
    (key_id,) = [k["id"] for k in e["keys"]]
    table = routerctl(gw, "tenants")
    assert table.returncode == 0, table.stderr
    assert "team-e" in table.stdout
    assert key_id in table.stdout
    assert "/30" in table.stdout
    done = routerctl(gw, "tenant", "key-revoke", "team-e", key_id)
    assert done.returncode == 0, done.stderr
    within_a_second_of(time.monotonic(), lambda: chat(gw.urls[0], key) == 401, "revoked")
    again = routerctl(gw, "tenant", "key-revoke", "team-e", key_id)
    assert again.returncode == 1
    assert "key_not_found" in again.stderr
    refused = routerctl(gw, "tenant", "add", "team-a")
    assert refused.returncode == 1
    assert "config_owned" in refused.stderr
    wrong = routerctl(gw, "tenants", ROUTER_ADMIN_TOKEN="not-the-token")
    assert wrong.returncode == 1
    assert "invalid_api_key" in wrong.stderr
    unset = routerctl(gw, "tenants", "--admin-token-env", "NO_SUCH_VARIABLE_X")
    assert unset.returncode == 2
    assert "NO_SUCH_VARIABLE_X" in unset.stderr
    for out in (done, again, refused, wrong, table):
        assert ADMIN_TOKEN not in out.stdout + out.stderr
