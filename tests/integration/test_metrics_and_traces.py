"""Metrics parse as Prometheus text and move with traffic; traces continue the client's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from router.telemetry.metrics import METRIC_NAMES
from tests.helpers import (
    SECRETS,
    Cluster,
    Gateway,
    Mock,
    auth,
    free_port,
    start_gateway,
    wait_until,
)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


class Collector:
    """A stand-in OTLP/HTTP collector that keeps every trace export it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (trace id, span name)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    req = ExportTraceServiceRequest.FromString(body)
                    for rs in req.resource_spans:
                        for ss in rs.scope_spans:
                            collector.spans += [(s.trace_id.hex(), s.name) for s in ss.spans]
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass  # quiet

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()
    c.server.server_close()


def gateway(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    mocks = [Mock("a"), Mock("b")]
    targets = [{"provider": m.name, "model": "m"} for m in mocks]
    routes = [{"model": "chat", "max_attempts": 2, "targets": targets}]
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=0)


def metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def total(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for lab, v in samples if all(lab.get(k) == x for k, x in labels.items()))


def test_metrics_move_with_traffic(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    url = gw.add_replica()
    gw.mocks["b"].fault("error", status=500)
    for _ in range(10):
        assert (
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200
        )
    httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth())

    m = metrics(url)
    ok = total(m["router_requests_total"], route="chat", status_class="2xx", outcome="ok")
    assert ok == 10
    assert total(m["router_requests_total"], route="unknown", status_class="4xx") == 1
    assert total(m["router_failovers_total"], provider="b", reason="http_5xx") >= 1
    assert total(m["router_decision_duration_seconds_count"], mode="shared") >= 10
    assert total(m["router_request_duration_seconds_count"], route="chat") == 10
    assert total(m["router_degraded"]) == 0

    def rpm_used() -> float:
        return total(metrics(url).get("router_provider_rpm_used", []), provider="a")

    wait_until(lambda: rpm_used() == 10, 15, "the shared gauges to show a's window")
    m = metrics(url)
    families = {name.removesuffix(sfx) for name in m for sfx in ("_bucket", "_sum", "_count")
                if name.endswith(sfx)} | set(m)  # fmt: skip
    optional = {  # series that appear only once something happened to them
        "router_provider_rpm_limit", "router_provider_tpm_limit", "router_cooldowns_total",
        "router_provider_ttft_ewma_seconds", "router_provider_tpot_ewma_seconds",
        "router_time_to_first_token_seconds", "router_saturation_rejections_total",
        "router_circuit_openings_total", "router_redis_errors_total",
        # a budget's gauges need a tenant with a budget, a rejection a tenant at its limit
        "router_tenant_spend_usd", "router_tenant_budget_usd", "router_tenant_rejections_total",
        # the queue's only once a request waited (a series per tenant and priority waiting)
        "router_queue_wait_seconds", "router_queue_waiting",
        "router_affinity_total",  # a route with affinity, once a request used it
    }  # fmt: skip
    assert METRIC_NAMES - optional <= families
    text = httpx.get(f"{url}/metrics").text
    assert not any(secret in text for secret in SECRETS)
    assert "request_id" not in text


def test_traces_continue_the_clients_and_reach_the_provider(
    cluster: Cluster, tmp_path: Path, redis_url: str, collector: Collector
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_METRIC_EXPORT_INTERVAL": "60000"}  # fmt: skip
    url = gw.add_replica(env)
    headers = {**auth(), "traceparent": TRACEPARENT}
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers)
    provider = r.headers["x-router-provider"]
    passed_on = gw.mocks[provider].stats()["last_traceparent"]
    assert passed_on.split("-")[1] == TRACE_ID  # the same trace, continued...
    assert passed_on != TRACEPARENT  # ...from our attempt span, not the client's
    names = {f"attempt {provider}", "acquire", "release", "POST /v1/chat/completions"}
    wait_until(lambda: names <= {n for t, n in collector.spans if t == TRACE_ID}, 10,
               "the spans to be exported")  # fmt: skip


def test_without_tracing_the_clients_traceparent_is_passed_on_as_is(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url)
    url = gw.add_replica({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    headers = {**auth(), "traceparent": TRACEPARENT}
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers)
    assert gw.mocks[r.headers["x-router-provider"]].stats()["last_traceparent"] == TRACEPARENT
