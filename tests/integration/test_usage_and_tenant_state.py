"""Usage and tenant state read back from real Redis, in the documented layout written by hand:
``read_usage``, ``read_tenants``, ``GET /admin/usage``, ``routerctl usage`` and the tenant
gauges of a replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from router.budgets import period_id, period_label
from router.config import BudgetPeriod, Config, TenantSpec, parse_config
from router.state import tenantstate
from router.state.keys import WINDOW_BUCKETS, Keys
from router.state.store import Store, TenantPlan
from router.state.tenantstate import config_plans, pack_live, read_tenants
from router.state.usage import read_usage
from tests.helpers import (
    ADMIN_TOKEN,
    CLIENT_KEY,
    ENV,
    SECRETS,
    Cluster,
    Gateway,
    Mock,
    start_gateway,
    wait_until,
)

KEYS = Keys("rc", "default")
TENANTS = [
    {"name": "team-a", "limits": {"rpm": 20, "tpm": 5000, "max_in_flight": 3},
     "budget": {"usd": 50.0, "period": "month"}},
    {"name": "team.b"},
]  # fmt: skip
ROUTES = [
    {"model": "chat", "targets": [{"provider": "a", "model": "m"}]},
    {"model": "org|chat", "targets": [{"provider": "a", "model": "m"}]},
]


def config(redis_url: str) -> Config:
    data = {
        "client_keys": [{"env": "K"}], "redis_url": redis_url, "tenants": TENANTS,
        "providers": [{"name": "a", "kind": "openai", "base_url": "http://x/v1"}],
        "routes": ROUTES,
    }  # fmt: skip
    return parse_config(data, {"K": "client-key"})


async def write_usage(redis_url: str) -> tuple[str, str]:
    """Today's and this month's usage hashes, by hand, as release.lua writes them; plus an
    older month. Returns today's and this month's labels, by Redis's clock."""
    client = aioredis.Redis.from_url(redis_url)
    sec, _ = await client.time()
    day = period_label(BudgetPeriod.DAY, sec)
    month = period_label(BudgetPeriod.MONTH, sec)
    today = {
        "team-a|chat|a|req": 3, "team-a|chat|a|in": 120, "team-a|chat|a|out": 30,
        "team-a|chat|a|cost": 27_000_000,
        "team-a|org|chat|a|req": 1, "team-a|org|chat|a|cost": 1_500,
        "default|chat|a|req": 2, "default|chat|a|in": 10, "default|chat|a|out": 4,
    }  # fmt: skip
    await client.hset(KEYS.usage("day", day), mapping=today)
    await client.hset(KEYS.usage("month", month), mapping={**today, "team.b|chat|a|req": 7})
    await client.hset(KEYS.usage("month", "2020-01"), mapping={"team-a|chat|a|req": 99})
    await client.aclose()
    return day, month


async def test_read_usage_of_a_day_a_month_and_a_tenant(redis_url: str) -> None:
    day, month = await write_usage(redis_url)
    store = Store.from_config(config(redis_url))
    await store.start(warm=1)
    try:
        today = await read_usage(store, "day")
        this_month = await read_usage(store, "month", month)
        old = await read_usage(store, "month", "2020-01", "team-a")
        none = await read_usage(store, "day", "2020-01-01")
        team_b = await read_usage(store, "month", None, "team.b")
    finally:
        await store.close()
    assert (today.period, today.label) == ("day", day)
    rows = {(r.tenant, r.route, r.provider): r.figures for r in today.rows}
    assert set(rows) == {("default", "chat", "a"), ("team-a", "chat", "a"),
                         ("team-a", "org|chat", "a")}  # fmt: skip
    f = rows[("team-a", "chat", "a")]
    assert (f.requests, f.prompt_tokens, f.completion_tokens, f.cost_nano) == (3, 120, 30, 27e6)
    totals = dict(today.totals)
    assert (totals["team-a"].requests, totals["team-a"].cost_nano) == (4, 27_001_500)
    assert today.total.requests == 6
    assert dict(this_month.totals)["team.b"].requests == 7
    assert [(r.tenant, r.figures.requests) for r in old.rows] == [("team-a", 99)]
    assert none.rows == ()
    assert none.total.requests == 0
    assert [r.tenant for r in team_b.rows] == ["team.b"]


async def test_read_tenants_counts_live_leases_and_this_periods_spend(redis_url: str) -> None:
    cfg = config(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    sec, _ = await client.time()
    month = period_id(BudgetPeriod.MONTH, sec)
    await client.set(KEYS.tenant_live("team-a"), pack_live(
        oldest=sec, rpm=3, tpm=350, second=sec, second_requests=3, second_tokens=350,
        period=month, spend_nano=12_500_000_000, in_flight=1,
    ))  # fmt: skip
    # last month's spend: this month's is 0
    await client.set(KEYS.tenant_live("default"), pack_live(period=month - 1, spend_nano=7))
    await client.aclose()
    store = Store.from_config(cfg)
    await store.start(warm=1)
    try:
        plans = config_plans(cfg, store.keys)
        states = await read_tenants(store, plans)
        assert await read_tenants(store, []) == []
    finally:
        await store.close()
    by_name = {t.name: t for t in states}
    assert [t.name for t in states] == ["default", "team-a", "team.b"]
    a = by_name["team-a"]
    assert (a.rpm_used, a.tpm_used, a.in_flight) == (3, 350, 1)
    assert (a.rpm_limit, a.tpm_limit, a.max_in_flight) == (20, 5000, 3)
    assert (a.spend_nano, a.spend_usd, a.budget_usd, a.budget_period) == (
        12_500_000_000, 12.5, 50.0, "month"
    )  # fmt: skip
    d = by_name["default"]
    assert (d.rpm_used, d.spend_nano, d.budget_nano) == (0, 0, None)
    b = by_name["team.b"]
    assert (b.rpm_used, b.tpm_used, b.in_flight, b.spend_nano) == (0, 0, 0, 0)


# How long ago the window's head ('wh') was, in seconds: slid this second, at the window's
# oldest bucket, a few buckets out, more than half out (the buckets left in it are summed),
# exactly out, long out; and a tenant that never had a request (no fields at all).
HEADS = [0, 61, 62, 65, 100, 122, 123, 500, None]


def window_fields(sec: int, ago: int | None) -> dict[str, int]:
    """A tenant's window as acquire.lua leaves it: seconds only in [oldest, oldest + W - 1],
    some empty (the last one's in its live figures, the others in its hash), and the
    running totals their sums."""
    if ago is None:
        return {}
    head = sec - ago
    fields: dict[str, int] = {}
    for b in range(head, min(sec, head + WINDOW_BUCKETS - 1) + 1):
        if b % 3 or b == head:  # some seconds had no request; the first one had
            fields[f"r:{b}"], fields[f"t:{b}"] = b % 5 + 1, (b % 7) * 100 + 10
    return fields


async def write_window(client: aioredis.Redis, name: str, fields: dict[str, int]) -> None:
    """``fields`` as acquire.lua keeps them: the last second live, the others in the hash."""
    seconds = sorted(int(k[2:]) for k in fields if k.startswith("r:"))
    last = seconds[-1]
    past = {k: v for k, v in fields.items() if int(k[2:]) != last}
    if past:
        await client.hset(KEYS.tenant(name), mapping=past)
    await client.set(KEYS.tenant_live(name), pack_live(
        oldest=seconds[0], second=last, second_requests=fields[f"r:{last}"],
        second_tokens=fields[f"t:{last}"],
        rpm=sum(v for k, v in fields.items() if k.startswith("r:")),
        tpm=sum(v for k, v in fields.items() if k.startswith("t:")),
    ))  # fmt: skip


def in_window(fields: dict[str, int], prefix: str, sec: int) -> int:
    """The specification: the buckets of the window ending at ``sec``."""
    oldest = sec - WINDOW_BUCKETS + 1
    return sum(v for k, v in fields.items()
               if k.startswith(prefix) and oldest <= int(k[2:]) <= sec)  # fmt: skip


async def test_read_tenants_sums_exactly_the_buckets_in_the_window(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenantstate, "TENANTS_PER_CALL", 4)  # three calls, in order
    cfg = config(redis_url)
    names = [f"t{i}" for i in range(len(HEADS))]
    plans = [TenantPlan.build(TenantSpec(name=n), KEYS) for n in names]
    client = aioredis.Redis.from_url(redis_url)
    store = Store.from_config(cfg)
    await store.start(warm=1)
    try:
        for _ in range(5):  # again if Redis's clock turned a second in between
            await client.flushall()
            sec, _ = await client.time()
            written = [window_fields(sec, ago) for ago in HEADS]
            for name, fields in zip(names, written, strict=True):
                if fields:
                    await write_window(client, name, fields)
            states = await read_tenants(store, plans)
            if (await client.time())[0] == sec:
                break
    finally:
        await store.close()
        await client.aclose()
    got = [(t.rpm_used, t.tpm_used) for t in states]
    want = [(in_window(f, "r:", sec), in_window(f, "t:", sec)) for f in written]
    assert got == want
    assert want[0][0] > 0 and want[4][0] > 0 and want[6] == (0, 0)  # noqa: PT018


def gateway(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    return start_gateway(cluster, tmp_path, redis_url, [Mock("a")], ROUTES, tenants=TENANTS)


def admin(url: str, query: str, token: str = ADMIN_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    r = httpx.get(f"{url}/admin/usage{query}", headers=headers, timeout=10)
    assert not any(secret in r.text for secret in SECRETS)
    return r


def ctl(gw: Gateway, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "router.ctl", "usage", *args, "--config", str(gw.config)]
    env = {**os.environ, **ENV, "COLUMNS": "160"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == status, done.stderr
    assert not any(secret in done.stdout + done.stderr for secret in SECRETS)
    return done


async def test_admin_usage_and_routerctl_usage_show_the_same_figures(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    day, month = await write_usage(redis_url)
    url = gw.urls[0]
    r = admin(url, "")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["schema"], doc["period"], doc["label"], doc["tenant"]) == (1, "day", day, None)
    assert {t["tenant"]: t["requests"] for t in doc["tenants"]} == {"default": 2, "team-a": 4}
    row = next(x for x in doc["rows"] if x["route"] == "chat" and x["tenant"] == "team-a")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_nano"]) == (120, 30, 27e6)
    assert row["cost_usd"] == pytest.approx(0.027)
    monthly = admin(url, f"?period=month&at={month}&tenant=team.b").json()
    assert [(x["tenant"], x["requests"]) for x in monthly["rows"]] == [("team.b", 7)]

    cli = json.loads(ctl(gw, "--json").stdout)
    cli.pop("taken_at_ms"), doc.pop("taken_at_ms")
    assert cli == doc
    cli_month = json.loads(ctl(gw, "--period", "month", "--tenant", "team.b", "--json").stdout)
    assert cli_month["rows"] == monthly["rows"]
    table = ctl(gw).stdout
    assert f"usage day {day} (UTC)" in table
    assert "org|chat" in table
    assert any("team-a" in line and "total" in line and "0.027001" in line
               for line in table.splitlines())  # fmt: skip
    wrong = ctl(gw, "--period", "month", "--at", day, status=2)
    assert "--at" in wrong.stderr
    assert "YYYY-MM" in wrong.stderr


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?period=week", "period"),
        ("?period=day&at=2026-12", "at"),
        ("?period=month&at=2026-12-01", "at"),
        ("?at=2026-02-30", "at"),
        ("?tenant=no%20spaces", "tenant"),
        ("?tenant=", "tenant"),
    ],
)
def test_admin_usage_refuses_a_wrong_query_in_openai_shape(
    cluster: Cluster, tmp_path: Path, redis_url: str, query: str, param: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    r = admin(gw.urls[0], query)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error", "invalid_request", param
    )  # fmt: skip
    assert error["message"]


def test_admin_usage_needs_the_admin_token(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    assert admin(gw.urls[0], "", token=CLIENT_KEY).status_code == 403
    assert admin(gw.urls[0], "", token="wrong").status_code == 401


def gauges(url: str) -> dict[str, dict[str, float]]:
    """Each tenant gauge's value per tenant, as scraped."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name.startswith("router_tenant_"):
                out.setdefault(s.name, {})[s.labels.get("tenant", "")] = s.value
    return out


async def test_tenant_gauges_show_the_shared_state(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    client = aioredis.Redis.from_url(redis_url)
    sec, _ = await client.time()
    month = period_id(BudgetPeriod.MONTH, sec)
    await client.set(KEYS.tenant_live("team-a"), pack_live(
        oldest=sec, rpm=4, tpm=400, second=sec, second_requests=4, second_tokens=400,
        period=month, spend_nano=2_500_000_000, in_flight=1,
    ))  # fmt: skip
    await client.aclose()
    url = gw.urls[0]
    wait_until(
        lambda: gauges(url).get("router_tenant_rpm_used", {}).get("team-a") == 4,
        20,
        "the tenant gauges to show team-a's window",
    )
    g = gauges(url)
    assert g["router_tenant_tpm_used"]["team-a"] == 400
    assert g["router_tenant_in_flight"] == {"default": 0, "team-a": 1, "team.b": 0}
    assert g["router_tenant_spend_usd"] == {"team-a": 2.5}  # the others have no budget
    assert g["router_tenant_budget_usd"] == {"team-a": 50.0}
