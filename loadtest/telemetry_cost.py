"""What metrics and traces cost per request: the calls one request makes, timed in a loop.

    python -m loadtest.telemetry_cost [--n 20000]

Prints microseconds per request for: metrics only (tracing off, the default), and metrics
plus traces (spans recorded, batched and exported over OTLP/HTTP to a sink on loopback, in
this process, so the exporter thread's share of the CPU is counted too).
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.trace import SpanKind

from router.telemetry.metrics import RouterMetrics, SharedFigures
from router.telemetry.tracing import Telemetry

HEADERS = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def one_request(tel: Telemetry, m: RouterMetrics) -> None:
    """The telemetry calls a served, non-streamed request makes."""
    span, ctx = tel.start_request("POST /v1/chat/completions", HEADERS, rid="x")
    with tel.attached(ctx):
        with tel.span("acquire", attempt=1):
            pass
        m.decision("chat", "shared", 0.0002)
        with tel.span("attempt p", SpanKind.CLIENT, provider="p", attempt=1):
            tel.inject({}, HEADERS["traceparent"])
        with tel.span("release", provider="p", outcome="ok"):
            pass
    m.request("chat", "p", 200, "ok", 0.01)
    tel.end_request(span, 200)


def cost_us(tel: Telemetry, n: int) -> float:
    """Mean microseconds of ``one_request`` over ``n`` runs."""
    m = RouterMetrics(tel, SharedFigures(), lambda: False, lambda: 0.0)
    for _ in range(1000):
        one_request(tel, m)
    started = time.perf_counter()
    for _ in range(n):
        one_request(tel, m)
    return (time.perf_counter() - started) / n * 1e6


class _Sink(BaseHTTPRequestHandler):
    """Accepts every OTLP export and drops it."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    """Print the cost with tracing off and on."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
    off = Telemetry("router", "bench", env={})
    on = Telemetry(
        "router", "bench", env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint + "/v1/traces"}
    )
    print(f"metrics, tracing off: {cost_us(off, n):6.1f} us per request")
    print(f"metrics and traces:   {cost_us(on, n):6.1f} us per request")
    off.shutdown()
    on.shutdown()
    sink.shutdown()


if __name__ == "__main__":
    main()
