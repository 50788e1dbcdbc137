"""healthd's metrics, through OpenTelemetry and its Prometheus exporter (as the replicas').

Label values are provider names and fixed words only: never a URL, a header or a key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import Observation

from router.telemetry.tracing import PROMETHEUS_CONTENT_TYPE, Telemetry

CONTENT_TYPE = PROMETHEUS_CONTENT_TYPE
RESULTS = ("ok", "fail")
STATES = ("up", "down")
METRIC_NAMES = frozenset(
    {
        "healthd_leader",
        "healthd_epoch",
        "healthd_probes_total",
        "healthd_probe_duration_seconds",
        "healthd_health_transitions_total",
    }
)
"""Every metric healthd exposes, by its Prometheus name (the dashboards' contract)."""


class Metrics:
    """Probe counts and latencies, transitions, and leadership."""

    def __init__(
        self,
        providers: Iterable[str],
        instance: str,
        leading: Callable[[], bool],
        epoch: Callable[[], int],
    ) -> None:
        self.tel = Telemetry("healthd", instance)
        m = self.tel.meter
        self._probes = m.create_counter("healthd_probes", description="Probes sent, by result")
        self._latency = m.create_histogram(
            "healthd_probe_duration", unit="s", description="Probe latency"
        )
        self._transitions = m.create_counter(
            "healthd_health_transitions", description="Health transitions recorded, by new state"
        )
        m.create_observable_gauge(
            "healthd_leader",
            [lambda _: [Observation(int(leading()))]],
            description="1 while this daemon holds the leader lease",
        )
        m.create_observable_gauge(
            "healthd_epoch",
            [lambda _: [Observation(epoch())]],
            description="The healthd epoch (fencing token) last seen",
        )
        for p in providers:  # every series starts at 0, so a rate() over the first scrape is right
            for r in RESULTS:
                self._probes.add(0, {"provider": p, "result": r})
            for s in STATES:
                self._transitions.add(0, {"provider": p, "to": s})

    def probed(self, provider: str, ok: bool, latency_ms: float) -> None:
        """Count one probe and its latency."""
        self._probes.add(1, {"provider": provider, "result": "ok" if ok else "fail"})
        self._latency.record(latency_ms / 1000, {"provider": provider})

    def transitioned(self, provider: str, to: str) -> None:
        """Count one health transition of ``provider`` to ``to`` (up or down)."""
        if to in STATES:
            self._transitions.add(1, {"provider": provider, "to": to})

    def render(self) -> bytes:
        """The exposition served on ``GET /metrics``."""
        return self.tel.render()
