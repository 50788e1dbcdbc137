"""Usage fields parsed by their documented layout, the usage JSON and table, the tenant
readings decoded, and the tenant metrics as Prometheus exposes them. Pure: no Redis."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, RenderableType

from router.budgets import period_id
from router.config import Budget, BudgetPeriod, TenantLimits, TenantSpec
from router.ctl.tables import render_usage, usd
from router.errors import BadRequest
from router.replica.poller import tenant_figures
from router.state.keys import Keys
from router.state.store import TenantPlan
from router.state.tenantstate import decode_tenants, tenant_json
from router.state.usage import (
    SCHEMA,
    Figures,
    UsageReport,
    current_label,
    parse_field,
    parse_usage,
    usage_json,
    usage_query,
)
from router.telemetry.metrics import METRIC_NAMES, RouterMetrics, SharedFigures, TenantFigures
from router.telemetry.tracing import Telemetry

KEYS = Keys("rc", "default")


@pytest.mark.parametrize(
    ("field", "parts"),
    [
        ("team-a|chat|fast|req", ("team-a", "chat", "fast", "req")),
        ("t|org/model|p|cost", ("t", "org/model", "p", "cost")),
        # a route model may hold '|': the tenant ends at the first, provider and figure are
        # the last two
        ("t|a|b||c|p|in", ("t", "a|b||c", "p", "in")),
        ("t|chat|p", None),
        ("t", None),
        ("|chat|p|req", None),
        ("t||p|req", None),
        ("t|chat||req", None),
        ("t|chat|p|", None),
    ],
)
def test_usage_fields_split_at_the_first_and_the_last_two_bars(
    field: str, parts: tuple[str, str, str, str] | None
) -> None:
    assert parse_field(field) == parts


RAW = {
    "team-a|chat|fast|req": "3",
    "team-a|chat|fast|in": "120",
    "team-a|chat|fast|out": "30",
    "team-a|chat|fast|cost": "36000000",
    "team-a|a|b|slow|req": "1",
    "team-a|a|b|slow|cost": "5000",
    "default|chat|fast|req": "2",
    "default|chat|fast|in": "10",
    "default|chat|fast|future-figure": "99",  # a newer release's figure: skipped
    "not a usage field": "7",
    "default|chat|fast|out": "oops",  # not a number: read as 0, never an error
}


def test_usage_rows_are_sorted_and_totalled_per_tenant() -> None:
    rows, totals, total = parse_usage(RAW)
    assert [(r.tenant, r.route, r.provider) for r in rows] == [
        ("default", "chat", "fast"),
        ("team-a", "a|b", "slow"),
        ("team-a", "chat", "fast"),
    ]
    assert rows[2].figures == Figures(3, 120, 30, 36_000_000)
    assert rows[0].figures == Figures(2, 10, 0, 0)
    assert dict(totals) == {
        "default": Figures(2, 10, 0, 0),
        "team-a": Figures(4, 120, 30, 36_005_000),
    }
    assert total == Figures(6, 130, 30, 36_005_000)


def test_usage_of_one_tenant() -> None:
    rows, totals, total = parse_usage(RAW, "default")
    assert {r.tenant for r in rows} == {"default"}
    assert [name for name, _ in totals] == ["default"]
    assert total == Figures(2, 10, 0, 0)


def report(tenant: str | None = None) -> UsageReport:
    rows, totals, total = parse_usage(RAW, tenant)
    return UsageReport(SCHEMA, "day", "2026-12-01", 1_795_000_000_000, tenant, rows, totals, total)


def test_usage_json_has_its_documented_keys_and_exact_cost() -> None:
    doc = json.loads(json.dumps(usage_json(report())))
    assert set(doc) == {"schema", "period", "label", "taken_at_ms", "tenant", "rows", "tenants",
                        "total"}  # fmt: skip
    assert (doc["schema"], doc["period"], doc["label"], doc["tenant"]) == (1, "day", "2026-12-01",
                                                                           None)  # fmt: skip
    figures = {"requests", "prompt_tokens", "completion_tokens", "cost_nano", "cost_usd"}
    row = doc["rows"][2]
    assert set(row) == {"tenant", "route", "provider"} | figures
    assert row["cost_nano"] == 36_000_000
    assert row["cost_usd"] == pytest.approx(0.036)
    assert [t["tenant"] for t in doc["tenants"]] == ["default", "team-a"]
    assert set(doc["tenants"][0]) == {"tenant"} | figures
    assert doc["total"]["requests"] == 6


def text_of(renderable: RenderableType) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def test_usage_table_shows_rows_and_totals_per_tenant() -> None:
    out = text_of(render_usage(report()))
    assert "usage day 2026-12-01 (UTC)" in out
    lines = out.splitlines()
    team_total = next(line for line in lines if "team-a" in line and "total" in line)
    assert "4" in team_total
    assert "0.036005" in team_total
    assert any("all tenants" in line and "0.036005" in line for line in lines)
    one = text_of(render_usage(report("default")))
    assert "all tenants" not in one
    assert "tenant default" in one


def test_an_empty_period_says_so() -> None:
    empty = UsageReport(SCHEMA, "month", "2026-11", 0, None, (), (), Figures())
    assert "no usage recorded in this period" in text_of(render_usage(empty))


@pytest.mark.parametrize(
    ("nano", "text"),
    [(0, "0.000000"), (1, "0.000000"), (1000, "0.000001"), (36_005_000, "0.036005"),
     (12_345_678_900_000, "12345.678900")],
)  # fmt: skip
def test_dollars_are_shown_to_six_decimals_exactly(nano: int, text: str) -> None:
    assert usd(nano) == text


@pytest.mark.parametrize(
    ("period", "at", "tenant", "param"),
    [
        ("week", None, None, "period"),
        ("", None, None, "period"),
        ("day", "2026-12", None, "at"),
        ("month", "2026-12-01", None, "at"),
        ("day", "2026-02-30", None, "at"),
        ("month", "2026-13", None, "at"),
        ("day", "yesterday", None, "at"),
        ("day", None, "team a", "tenant"),
        ("day", None, "", "tenant"),
        ("day", None, "x|y", "tenant"),
        ("day", None, "a" * 65, "tenant"),
    ],
)
def test_a_wrong_usage_query_names_its_parameter(
    period: str, at: str | None, tenant: str | None, param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        usage_query(period, at, tenant)
    assert caught.value.param == param
    assert caught.value.status == 400


def test_a_right_usage_query() -> None:
    q = usage_query("month", "2026-12", "team-a")
    assert (q.period, q.label, q.tenant) == ("month", "2026-12", "team-a")
    assert usage_query("day", None, None).label is None


def test_the_current_label_is_the_utc_day_or_month() -> None:
    sec = 1_796_169_599  # 2026-12-01 23:59:59 UTC
    assert current_label("day", sec) == "2026-12-01"
    assert current_label("month", sec) == "2026-12"
    assert current_label("day", sec + 1) == "2026-12-02"


SEC = 1_796_169_599


def plan(name: str, **spec: object) -> TenantPlan:
    return TenantPlan.build(TenantSpec.model_validate({"name": name, **spec}), KEYS)


def test_tenant_readings_count_spend_only_of_the_current_budget_period() -> None:
    plans = [
        plan("a", limits=TenantLimits(rpm=10, tpm=1000, max_in_flight=2),
             budget=Budget(usd=5, period=BudgetPeriod.MONTH)),
        plan("stale", budget=Budget(usd=1, period=BudgetPeriod.DAY)),
        plan("free"),
    ]  # fmt: skip
    month = period_id(BudgetPeriod.MONTH, SEC)
    day = period_id(BudgetPeriod.DAY, SEC)
    raw = [str(SEC).encode(), b"5", 4, 300, 1, str(month).encode(), b"2500000000",
           2, 20, 0, str(day - 1).encode(), b"900", 0, 0, 0, b"", b"0"]  # fmt: skip
    a, stale, free = decode_tenants(raw, plans)
    assert (a.rpm_used, a.rpm_limit, a.tpm_used, a.tpm_limit) == (4, 10, 300, 1000)
    assert (a.in_flight, a.max_in_flight) == (1, 2)
    assert (a.spend_nano, a.spend_usd, a.budget_usd) == (2_500_000_000, 2.5, 5.0)
    assert (a.budget_period, a.period_label) == ("month", "2026-12")
    assert stale.spend_nano == 0  # yesterday's spend: a new day's budget
    assert stale.period_label == "2026-12-01"
    assert (free.budget_nano, free.budget_period, free.spend_nano) == (None, None, 0)
    assert (free.rpm_limit, free.max_in_flight) == (None, None)
    doc = tenant_json(a)
    assert doc["spend_usd"] == 2.5
    assert doc["budget_usd"] == 5.0
    gauges = tenant_figures([a, free])
    assert gauges["a"] == TenantFigures(1, 4, 300, 2.5, 5.0)
    assert gauges["free"] == TenantFigures(0, 2 * 0, 0, None, None)


def exposed(tel: Telemetry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(tel.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_tenant_metrics_are_exposed_by_their_documented_names() -> None:
    tel = Telemetry("router", "test", env={})
    shared = SharedFigures()
    m = RouterMetrics(tel, shared, lambda: False, lambda: 0.0)
    m.tenant_request("team-a", "chat", "ok")
    m.tenant_request("team-a", "chat", "ok")
    m.tenant_served("team-a", "chat", "fast", 100, 20, 1_500_000)
    m.tenant_served("team-a", "chat", "fast", 1, 2, 500_000)
    m.tenant_rejected("team-a", "tenant_rpm_exceeded")
    shared.tenants = {"team-a": TenantFigures(1, 4, 300, 2.5, 5.0), "free": TenantFigures()}
    got = exposed(tel)
    tenant_names = {n for n in METRIC_NAMES if n.startswith("router_tenant_")}
    assert tenant_names <= set(got)
    assert got["router_tenant_requests_total"] == [
        ({"tenant": "team-a", "route": "chat", "outcome": "ok"}, 2.0)
    ]
    tokens = {s["kind"]: v for s, v in got["router_tenant_tokens_total"]}
    assert tokens == {"prompt": 101, "completion": 22}
    [(labels, cost)] = got["router_tenant_cost_usd_total"]
    assert labels == {"tenant": "team-a", "route": "chat", "provider": "fast"}
    assert cost == pytest.approx(0.002)
    assert got["router_tenant_rejections_total"] == [
        ({"tenant": "team-a", "code": "tenant_rpm_exceeded"}, 1.0)
    ]
    assert {s["tenant"] for s, _ in got["router_tenant_in_flight"]} == {"team-a", "free"}
    # without a budget there is no spend or budget to show
    assert got["router_tenant_budget_usd"] == [({"tenant": "team-a"}, 5.0)]
    assert got["router_tenant_spend_usd"] == [({"tenant": "team-a"}, 2.5)]
    tel.shutdown()
