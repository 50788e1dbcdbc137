"""The Prometheus scrape config and the Grafana dashboard keep to the metrics contract.

Pure and fast: the files are parsed, every PromQL expression on the dashboard is checked
against the documented metric names and labels below (the contract), and ``promtool`` is
run on the scrape config and on the dashboard's expressions only when it is on PATH.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "router-cluster.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE_VAR = "${datasource}"

# ---------------------------------------------------------------- the contract
# Prometheus exposition names, as the OpenTelemetry Prometheus exporter emits them, with
# their labels (job and instance come from the scrape and are allowed everywhere).
COUNTERS: dict[str, frozenset[str]] = {
    "router_requests_total": frozenset({"route", "provider", "status_class", "outcome"}),
    "router_failovers_total": frozenset({"route", "provider", "reason"}),
    "router_saturation_rejections_total": frozenset({"route"}),
    "router_cooldowns_total": frozenset({"provider"}),
    "router_circuit_openings_total": frozenset({"provider"}),
    "router_redis_errors_total": frozenset({"operation"}),
    "router_degraded_seconds_total": frozenset(),
    "router_tenant_requests_total": frozenset({"tenant", "route", "outcome"}),
    "router_tenant_tokens_total": frozenset({"tenant", "route", "provider", "kind"}),
    "router_tenant_cost_usd_total": frozenset({"tenant", "route", "provider"}),
    "router_tenant_rejections_total": frozenset({"tenant", "code"}),
    "healthd_probes_total": frozenset({"provider", "result"}),
    "healthd_health_transitions_total": frozenset({"provider", "to"}),
}
HISTOGRAMS: dict[str, frozenset[str]] = {
    "router_request_duration_seconds": frozenset({"route", "provider"}),
    "router_time_to_first_token_seconds": frozenset({"route", "provider"}),
    "router_decision_duration_seconds": frozenset({"route", "mode"}),
    "router_queue_wait_seconds": frozenset({"route", "tenant"}),
    "healthd_probe_duration_seconds": frozenset({"provider"}),
}
# Per-provider gauges read from shared state: every replica reports the same cluster-wide
# value, so they must be aggregated with max by (provider), never summed.
SHARED_STATE_GAUGES: dict[str, frozenset[str]] = {
    name: frozenset({"provider"})
    for name in (
        "router_provider_in_flight",
        "router_provider_rpm_used",
        "router_provider_rpm_limit",
        "router_provider_tpm_used",
        "router_provider_tpm_limit",
        "router_provider_healthy",
        "router_provider_circuit_open",
        "router_provider_drained",
        "router_provider_ttft_ewma_seconds",
        "router_provider_tpot_ewma_seconds",
    )
}
# The per-tenant gauges read from shared state: the same on every replica, max by (tenant).
TENANT_STATE_GAUGES: dict[str, frozenset[str]] = {
    name: frozenset({"tenant"})
    for name in (
        "router_tenant_in_flight",
        "router_tenant_rpm_used",
        "router_tenant_tpm_used",
        "router_tenant_spend_usd",
        "router_tenant_budget_usd",
    )
}
# Who waits for each route, read from the shared queues: the same on every replica, max by
# (route, tenant, priority).
QUEUE_STATE_GAUGES: dict[str, frozenset[str]] = {
    "router_queue_waiting": frozenset({"route", "tenant", "priority"}),
}
GAUGES: dict[str, frozenset[str]] = {
    **SHARED_STATE_GAUGES,
    **TENANT_STATE_GAUGES,
    **QUEUE_STATE_GAUGES,
    "router_degraded": frozenset(),
    "healthd_leader": frozenset(),
    "healthd_epoch": frozenset(),
}
METRICS: dict[str, frozenset[str]] = {**COUNTERS, **HISTOGRAMS, **GAUGES}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series names a query may select: histograms only through their suffixed series.
SERIES: dict[str, frozenset[str]] = {
    **COUNTERS,
    **GAUGES,
    **{f"{h}_bucket": labels | {"le"} for h, labels in HISTOGRAMS.items()},
    **{f"{h}{s}": labels for h, labels in HISTOGRAMS.items() for s in ("_sum", "_count")},
}
BUCKETS = frozenset(f"{h}_bucket" for h in HISTOGRAMS)
# Cumulative series: read only through rate() or increase().
MONOTONIC = frozenset(COUNTERS) | {f"{h}{s}" for h in HISTOGRAMS for s in HISTOGRAM_SUFFIXES}
SCRAPE_LABELS = frozenset({"job", "instance"})
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
     "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)  # fmt: skip
RANGE_COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase"})

_METRIC = re.compile(r"(?<![\w:])(?:router|healthd)_\w*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OPEN_CALL = re.compile(r"([A-Za-z_]\w*)\s*(?:(?:by|without)\s*\(([^()]*)\)\s*)?$")
_SELECTOR = re.compile(r"(?<![\w:])((?:router|healthd)_\w*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


# ---------------------------------------------------------------- helpers
@cache
def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _all_panels() -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels folded inside collapsed rows."""
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _data_panels() -> list[dict[str, Any]]:
    return [p for p in _all_panels() if p.get("type") != "row"]


def _exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"])
        for p in _data_panels()
        for t in p.get("targets", [])
    ]


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _variable_query(var: dict[str, Any]) -> str:
    query = var.get("query")
    return str(query["query"] if isinstance(query, dict) else query)


def _label_values_selectors() -> list[tuple[str, str]]:
    """The series selector inside each ``label_values(selector, label)`` variable query."""
    found = []
    for name, var in _variables().items():
        if var.get("type") != "query":
            continue
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", _variable_query(var))
        assert m, f"variable {name}: expected label_values(selector, label)"
        found.append((f"variable {name}", m.group(1)))
    return found


def _blank_strings(expr: str) -> str:
    """The expression with string literals blanked, positions kept."""
    return _STRING.sub(lambda m: '"' + " " * (len(m.group()) - 2) + '"', expr)


def _names(expr: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in _METRIC.finditer(_blank_strings(expr))]


def _base(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def _enclosing(expr: str, pos: int) -> list[tuple[str, frozenset[str] | None]]:
    """Calls around ``pos``, innermost first: (function or aggregation, its by-labels)."""
    text = _blank_strings(expr)
    stack: list[tuple[str, frozenset[str] | None]] = []
    for i, ch in enumerate(text[:pos]):
        if ch == "(":
            m = _OPEN_CALL.search(text[:i])
            name = m.group(1) if m else ""
            by = frozenset(s.strip() for s in m.group(2).split(",")) if m and m.group(2) else None
            stack.append((name, by))
        elif ch == ")" and stack:
            stack.pop()
    return stack[::-1]


def _call_spans(expr: str, function: str) -> list[str]:
    """The argument text of every call to ``function``."""
    text = _blank_strings(expr)
    spans = []
    for m in re.finditer(rf"(?<![\w:]){function}\s*\(", text):
        depth, start = 0, m.end() - 1
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                spans.append(text[start + 1 : i])
                break
        else:
            pytest.fail(f"unbalanced parentheses after {function}( in {expr!r}")
    return spans


def _as_promql(expr: str) -> str:
    """Grafana variables replaced by values that make the expression plain PromQL."""
    fixed = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
    return _VARIABLE.sub(lambda m: fixed.get(m.group(1), ".*"), expr)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install -y prometheus)")
    return path


def _load_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{path}: not a YAML mapping"
    return loaded


# ---------------------------------------------------------------- dashboard structure
def test_dashboard_loads_with_schema_and_uid() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] == 39
    assert dash["uid"]
    assert dash["title"]
    assert _data_panels(), "the dashboard has no panels"


def test_panel_ids_are_unique() -> None:
    ids = [p.get("id") for p in _all_panels()]
    assert all(isinstance(i, int) for i in ids), ids
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    assert not dupes, f"duplicate panel ids: {dupes}"


def test_panels_have_a_grid_position_inside_the_grid_without_overlap() -> None:
    boxes = []
    for p in _all_panels():
        pos = p.get("gridPos")
        assert isinstance(pos, dict), f"panel {p.get('id')} has no gridPos"
        x, y, w, h = (pos[k] for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) for v in (x, y, w, h)), (p["id"], pos)
        assert min(x, y) >= 0, (p["id"], pos)
        assert min(w, h) >= 1, (p["id"], pos)
        assert x + w <= 24, (p["id"], pos)
        boxes.append((p["id"], x, y, w, h))
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1 :]:
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"panels {a} and {b} overlap"


def _uses_datasource_var(ds: Any) -> bool:
    if isinstance(ds, dict):
        return ds.get("uid") == DATASOURCE_VAR and ds.get("type", "prometheus") == "prometheus"
    return bool(ds == DATASOURCE_VAR)


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for p in _all_panels():
        assert _uses_datasource_var(p.get("datasource")), f"panel {p['id']}: {p.get('datasource')}"
        for t in p.get("targets", []):
            if "datasource" in t:
                assert _uses_datasource_var(t["datasource"]), f"panel {p['id']} {t['refId']}"


def test_every_data_panel_has_promql_targets() -> None:
    for p in _data_panels():
        targets = p.get("targets", [])
        assert targets, f"panel {p['id']} {p.get('title')!r} has no targets"
        refs = [t.get("refId") for t in targets]
        assert len(set(refs)) == len(refs), f"panel {p['id']}: duplicate refIds {refs}"
        exprs = [t.get("expr") for t in targets]
        for expr in exprs:
            assert isinstance(expr, str), (p["id"], targets)
            assert expr.strip(), (p["id"], targets)
        assert any(_names(e) for e in exprs), f"panel {p['id']}: no router_/healthd_ metric"


def test_template_variables() -> None:
    variables = _variables()
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    for name in ("route", "provider", "tenant"):
        var = variables[name]
        assert var["type"] == "query"
        assert _uses_datasource_var(var["datasource"])
        assert re.search(rf"label_values\(.*,\s*{name}\s*\)", _variable_query(var)), var
        assert var.get("includeAll")
        assert var.get("allValue") == ".*"


# ---------------------------------------------------------------- PromQL against the contract
def test_dashboard_metric_names_are_in_the_contract() -> None:
    for where, expr in _exprs() + _label_values_selectors():
        for _, name in _names(expr):
            assert _base(name) in METRICS, f"{where}: {name} is not a documented metric"
            assert name in SERIES, (
                f"{where}: {name} is not an exposed series (histograms only as "
                f"{'/'.join(HISTOGRAM_SUFFIXES)})"
            )


def test_every_documented_metric_is_on_the_dashboard() -> None:
    used = {_base(name) for _, expr in _exprs() for _, name in _names(expr)}
    missing = sorted(set(METRICS) - used)
    assert not missing, f"documented metrics with no panel: {missing}"


def test_selectors_use_documented_labels_and_the_dashboard_filters() -> None:
    for where, expr in _exprs():
        for m in _SELECTOR.finditer(_blank_strings(expr)):
            name = m.group(1)
            braces = expr[m.start(2) : m.end(2)] if m.group(2) else ""
            labels = SERIES.get(name, frozenset())
            matchers = {k: (op, v) for k, op, v in _MATCHER.findall(braces)}
            unknown = set(matchers) - labels - SCRAPE_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
            for var in ("route", "provider", "tenant"):
                if var in labels:
                    assert matchers.get(var) == ("=~", f"${var}"), (
                        f'{where}: {name} should be filtered with {var}=~"${var}"'
                    )


def test_histogram_quantile_reads_only_bucket_series_by_le() -> None:
    spans = [
        (where, span)
        for where, expr in _exprs()
        for span in _call_spans(expr, "histogram_quantile")
    ]
    assert spans, "no histogram_quantile on the dashboard"
    for where, span in spans:
        names = [n for _, n in _names(span)]
        assert names, f"{where}: histogram_quantile over no metric"
        for name in names:
            assert name in BUCKETS, (
                f"{where}: histogram_quantile over {name}, not a histogram's _bucket series"
            )
        assert re.search(r"\bby\s*\([^)]*\ble\b", span), f"{where}: buckets not kept by le"
    for where, expr in _exprs():
        for pos, name in _names(expr):
            if name in BUCKETS:
                calls = [c for c, _ in _enclosing(expr, pos)]
                assert "histogram_quantile" in calls, f"{where}: {name} outside histogram_quantile"


@pytest.mark.parametrize(
    ("gauges", "key"),
    [
        (SHARED_STATE_GAUGES, "provider"),
        (TENANT_STATE_GAUGES, "tenant"),
        (QUEUE_STATE_GAUGES, "priority"),
    ],
)
def test_shared_state_gauges_are_aggregated_with_max_by_their_key(
    gauges: dict[str, frozenset[str]], key: str
) -> None:
    for where, expr in _exprs():
        for pos, name in _names(expr):
            if name not in gauges:
                continue
            aggs = [(c, by) for c, by in _enclosing(expr, pos) if c in AGGREGATIONS]
            assert aggs, f"{where}: {name} must be aggregated with max by ({key})"
            agg, by = aggs[0]
            assert agg == "max", f"{where}: {name} is aggregated with {agg}, not max"
            assert key in (by or ()), f"{where}: {name}: max is not by ({key})"


def test_counters_are_read_through_rate_and_gauges_are_not() -> None:
    for where, expr in _exprs():
        for pos, name in _names(expr):
            calls = _enclosing(expr, pos)
            inner = calls[0][0] if calls else ""
            if name in MONOTONIC:
                assert inner in RANGE_COUNTER_FUNCTIONS, f"{where}: {name} read without rate()"
            else:
                assert inner not in RANGE_COUNTER_FUNCTIONS, f"{where}: {inner}() of gauge {name}"


# Where the code declares the names it exposes: a ``METRIC_NAMES`` set in any of these.
CODE_METRIC_MODULES = {
    "router": ("router.telemetry.tracing", "router.telemetry.metrics"),
    "healthd": ("healthd.telemetry", "healthd.metrics"),
}


@pytest.mark.parametrize("prefix", sorted(CODE_METRIC_MODULES))
def test_dashboard_metrics_are_registered_in_code(prefix: str) -> None:
    declared: set[str] = set()
    sources = []
    for module in CODE_METRIC_MODULES[prefix]:
        try:
            names = getattr(importlib.import_module(module), "METRIC_NAMES", None)
        except ImportError:
            continue
        if names is not None:
            declared |= {str(n).replace(".", "_") for n in names}
            sources.append(module)
    if not sources:
        pytest.skip(f"no METRIC_NAMES in {', '.join(CODE_METRIC_MODULES[prefix])} yet")
    used = {
        _base(name)
        for _, expr in _exprs()
        for _, name in _names(expr)
        if name.startswith(f"{prefix}_")
    }
    missing = sorted(
        n for n in used if n not in declared and n.removesuffix("_total") not in declared
    )
    assert not missing, f"on the dashboard but not in {' / '.join(sources)}.METRIC_NAMES: {missing}"


def test_dashboard_promql_parses_with_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = [
        {"record": f"dashboard:check_{i}", "expr": _as_promql(expr)}
        for i, (_, expr) in enumerate(_exprs() + _label_values_selectors())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- Prometheus scrape config
def test_prometheus_config_scrapes_both_jobs() -> None:
    config = _load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"router", "healthd"}

    def targets(job: str) -> list[str]:
        return [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]

    assert targets("router") == ["router-1:8080", "router-2:8080", "router-3:8080"]
    assert targets("healthd") == ["healthd-1:9090", "healthd-2:9090"]
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_config_documents_a_kubernetes_alternative() -> None:
    lines = PROMETHEUS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s+- job_name:", line))
    block = "\n".join(line[1:] for line in lines[start:] if line.startswith("#"))
    (job,) = yaml.safe_load(block)
    assert {"role": "pod"}.items() <= job["kubernetes_sd_configs"][0].items()
    keep = [
        r
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
        and r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    ]
    assert keep
    assert set(keep[0]["regex"].split("|")) == {"router", "healthd"}


def test_prometheus_config_passes_promtool() -> None:
    promtool = _promtool()
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- Grafana provisioning
def test_grafana_provisioning() -> None:
    datasources = _load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    assert any(d["type"] == "prometheus" and d["url"] for d in datasources["datasources"])
    dashboards = _load_yaml(PROVISIONING / "dashboards" / "router-cluster.yml")
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
