"""OpenTelemetry set-up shared by replicas and healthd: metrics always, traces when asked.

Metrics go to a private Prometheus registry served on ``GET /metrics``, and also over OTLP
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._METRICS_ENDPOINT``) is set. Traces exist only
when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``):
otherwise ``span`` hands out a shared no-op context and nothing is recorded, so tracing
switched off costs a function call per span.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest

from router import __version__

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)
LATENCY_HISTOGRAMS = (
    "router_request_duration",
    "router_time_to_first_token",
    "healthd_probe_duration",
)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TRACEPARENT = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


def client_traceparent(raw: bytes) -> str | None:
    """The client's ``traceparent`` if it is a valid W3C one, else ``None``: the only client
    header ever passed on to a provider, so only that shape is (a 32 KiB value, forwarded as
    it came, made providers answer 431 and so open their circuits for everyone).

    Valid: version, trace id, parent id and flags in lower-case hex, 55 characters; not
    version ``ff``, no all-zero id. A longer header of a future version is dropped too, as is
    ``tracestate`` (never passed on).
    """
    return raw.decode() if len(raw) == 55 and _TRACEPARENT.fullmatch(raw) else None


def _endpoint(signal: str, env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP URL of one signal: its own variable as is, or the base one + /v1/..."""
    own = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    if own:
        return own
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return f"{base.rstrip('/')}/v1/{signal.lower()}" if base else None


class Telemetry:
    """A meter (Prometheus + optional OTLP) and an optional tracer for one process."""

    def __init__(self, service: str, instance: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        resource = Resource.create(
            {
                "service.name": service,
                "service.instance.id": instance,
                "service.version": __version__,
            }
        )
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [
            PrometheusMetricReader(
                registry=self.registry, disable_target_info=True, scope_info_enabled=False
            )
        ]
        if metrics_url := _endpoint("METRICS", env):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=metrics_url)
            readers.append(PeriodicExportingMetricReader(exporter))
        views = [
            View(instrument_name=name, aggregation=_buckets(LATENCY_BUCKETS))
            for name in LATENCY_HISTOGRAMS
        ]
        views.append(
            View(instrument_name="router_decision_duration", aggregation=_buckets(DECISION_BUCKETS))
        )
        self.meters = MeterProvider(metric_readers=readers, resource=resource, views=views)
        self.meter = self.meters.get_meter(service, __version__)
        self.tracers: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        if traces_url := _endpoint("TRACES", env):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.tracers = TracerProvider(resource=resource)
            spans = OTLPSpanExporter(endpoint=traces_url)
            self.tracers.add_span_processor(BatchSpanProcessor(spans))
            self.tracer = self.tracers.get_tracer(service, __version__)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        self.meters.shutdown()
        if self.tracers is not None:
            self.tracers.shutdown()

    def span(
        self, name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attrs: Any
    ) -> contextlib.AbstractContextManager[trace.Span | None]:
        """A child span of the current one, or nothing at all when tracing is off (one shared
        no-op: the hot path enters three of these per request)."""
        if self.tracer is None:
            return _NOTHING
        return self.tracer.start_as_current_span(name, kind=kind, attributes=attrs)

    def start_request(
        self, name: str, headers: Mapping[str, str], **attrs: Any
    ) -> tuple[trace.Span | None, Context | None]:
        """Start the server span of a request, continuing the client's ``traceparent``."""
        if self.tracer is None:
            return None, None
        parent = propagate.extract(headers)
        s = self.tracer.start_span(name, parent, trace.SpanKind.SERVER, attributes=attrs)
        return s, trace.set_span_in_context(s, parent)

    @staticmethod
    def attached(ctx: Context | None) -> contextlib.AbstractContextManager[None]:
        """Make ``ctx`` current for the block (same task in and out)."""
        return _NOTHING if ctx is None else _attached(ctx)

    @staticmethod
    def end_request(s: trace.Span | None, status: int) -> None:
        """End a request's server span (from ``start_request``)."""
        if s is None:
            return
        s.set_attribute("http.response.status_code", status)
        if status >= 500:
            s.set_status(trace.Status(trace.StatusCode.ERROR))
        s.end()

    def inject(self, headers: dict[str, str], client_traceparent: str | None) -> None:
        """Pass the trace on to a provider: ours when tracing, else the client's (checked by
        ``client_traceparent`` at the boundary)."""
        if self.tracer is not None:
            propagate.inject(headers)
        elif client_traceparent:
            headers["traceparent"] = client_traceparent


_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()
"""Reusable: entering it does nothing and gives ``None``."""


@contextlib.contextmanager
def _attached(ctx: Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def _buckets(bounds: tuple[float, ...]) -> ExplicitBucketHistogramAggregation:
    return ExplicitBucketHistogramAggregation(boundaries=bounds)
