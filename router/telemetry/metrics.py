"""A replica's metrics: what it served, and the cluster's shared state as it last read it.

Labels are bounded: route names and provider names come from the config (a model no route
serves is counted as ``route="unknown"``), never a request id or a client key. The
per-provider gauges read from Redis carry the same cluster-wide value on every replica:
aggregate them with ``max``, not ``sum``.

The tenant metrics carry a ``tenant`` label: a tenant's name, from the config or the admin
API, whose number is capped by ``max_tenants`` (256 by default, ``default`` included), so
``router_tenant_tokens_total`` has at most tenants x routes x providers x 2 series per
replica. A removed tenant's counters stay until the replica restarts. The per-tenant gauges,
like the per-provider ones, are cluster-wide: ``max by (tenant)``.

``router_queue_waiting`` (route, tenant, priority) is cluster-wide too, read by the state
poller from every route's queue (``max by (route, tenant, priority)``); its priority label is
bounded by the config's range (-100..100) and only the pairs that wait have a series.
``router_queue_wait_seconds`` (route, tenant) is this replica's admitted requests' waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry.metrics import CallbackOptions, Observation

from router.telemetry.tracing import Telemetry

METRIC_NAMES = frozenset(
    {
        "router_requests_total",
        "router_failovers_total",
        "router_saturation_rejections_total",
        "router_cooldowns_total",
        "router_circuit_openings_total",
        "router_request_duration_seconds",
        "router_time_to_first_token_seconds",
        "router_decision_duration_seconds",
        "router_queue_wait_seconds",
        "router_queue_waiting",
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
        "router_redis_errors_total",
        "router_degraded",
        "router_degraded_seconds_total",
        "router_tenant_requests_total",
        "router_tenant_tokens_total",
        "router_tenant_cost_usd_total",
        "router_tenant_rejections_total",
        "router_tenant_in_flight",
        "router_tenant_rpm_used",
        "router_tenant_tpm_used",
        "router_tenant_spend_usd",
        "router_tenant_budget_usd",
        "router_affinity_total",
    }
)
"""Every metric a replica exposes, by its Prometheus name (the dashboards' contract)."""


@dataclass(frozen=True, slots=True)
class ProviderFigures:
    """One provider's shared figures, as the state poller last read them."""

    in_flight: int = 0
    rpm_used: int = 0
    rpm_limit: int | None = None
    tpm_used: int = 0
    tpm_limit: int | None = None
    healthy: bool = True
    circuit_open: bool = False
    drained: bool = False
    ttft_ewma_s: float | None = None
    tpot_ewma_s: float | None = None


@dataclass(frozen=True, slots=True)
class TenantFigures:
    """One tenant's shared figures, as the state poller last read them."""

    in_flight: int = 0
    rpm_used: int = 0
    tpm_used: int = 0
    spend_usd: float | None = None
    """This budget period's spend; ``None`` without a budget."""
    budget_usd: float | None = None


@dataclass(slots=True)
class SharedFigures:
    """The latest shared figures per provider and tenant, each replaced whole by the poller."""

    providers: dict[str, ProviderFigures] = field(default_factory=dict)
    tenants: dict[str, TenantFigures] = field(default_factory=dict)


TENANT_OUTCOMES = ("ok", "failed", "refused")
"""``tenant_request``'s outcomes: answered by a provider, failed after its attempts, or
refused before any (a tenant limit, the budget, saturation, an unknown model)."""
TENANT_REJECTIONS = (
    "tenant_rpm_exceeded",
    "tenant_tpm_exceeded",
    "tenant_in_flight_exceeded",
    "insufficient_quota",
    "model_not_found",
)
"""``tenant_rejected``'s codes: the error codes of a refusal for the tenant's own sake."""


class RouterMetrics:
    """The replica's instruments, with one method per thing worth counting."""

    def __init__(
        self,
        tel: Telemetry,
        shared: SharedFigures,
        degraded: Callable[[], bool],
        degraded_s: Callable[[], float],
    ) -> None:
        m = tel.meter
        self.shared = shared
        self._requests = _Counter(tel, "router_requests", "Requests answered")
        self._failovers = _Counter(tel, "router_failovers", "Failed attempts, failed over")
        self._affinity = _Counter(
            tel,
            "router_affinity",
            "Decisions an affinity pin took part in, by outcome: hit (the pinned target took "
            "it), new (placed by consistent hashing and pinned), spilled (the pinned or hashed "
            "target was full or over its load bound), moved (the pinned target was out of "
            "service), unavailable (a required pin's target could not take it), foreign",
        )
        self._saturated = _Counter(
            tel, "router_saturation_rejections", "Requests refused: no target had room"
        )
        self._cooldowns = _Counter(tel, "router_cooldowns", "429 cooldowns set")
        self._circuits = _Counter(
            tel, "router_circuit_openings", "Circuits this replica's outcomes opened"
        )
        self._duration = m.create_histogram(
            "router_request_duration", unit="s", description="Request duration, to the last byte"
        )
        self._ttft = m.create_histogram(
            "router_time_to_first_token", unit="s", description="Time to the first streamed token"
        )
        self._decision = m.create_histogram(
            "router_decision_duration", unit="s", description="Acquire round trip (decision)"
        )
        self._queue_wait = m.create_histogram(
            "router_queue_wait",
            unit="s",
            description="How long admitted requests waited in their route's queue, per tenant",
        )
        self.waiting: Callable[[], dict[tuple[str, str, int], int]] = dict
        """Requests waiting per (route, tenant, priority), cluster-wide (the state poller's)."""
        m.create_observable_gauge(
            "router_queue_waiting",
            [self._observe_waiting],
            description="Requests waiting for a saturated route, cluster-wide",
        )
        self._redis_errors = _Counter(tel, "router_redis_errors", "Failed shared-store calls")
        m.create_observable_gauge(
            "router_degraded",
            [lambda _: [Observation(int(degraded()))]],
            description="1 while the replica serves from local state",
        )
        m.create_observable_counter(
            "router_degraded_seconds",
            [lambda _: [Observation(degraded_s())]],
            unit="s",
            description="Time spent in degraded mode",
        )
        self._shared_gauges(tel)
        self._tenant_instruments(tel)

    def _shared_gauges(self, tel: Telemetry) -> None:
        gauges: dict[str, tuple[str, Callable[[ProviderFigures], float | None]]] = {
            "router_provider_in_flight": ("In flight, cluster-wide", lambda f: f.in_flight),
            "router_provider_rpm_used": ("Requests in the RPM window", lambda f: f.rpm_used),
            "router_provider_rpm_limit": ("RPM limit", lambda f: f.rpm_limit),
            "router_provider_tpm_used": ("Tokens in the TPM window", lambda f: f.tpm_used),
            "router_provider_tpm_limit": ("TPM limit", lambda f: f.tpm_limit),
            "router_provider_healthy": ("1 up or unknown, 0 down", lambda f: int(f.healthy)),
            "router_provider_circuit_open": ("1 circuit open", lambda f: int(f.circuit_open)),
            "router_provider_drained": ("1 drained by an operator", lambda f: int(f.drained)),
            "router_provider_ttft_ewma_seconds": ("Peak EWMA TTFT", lambda f: f.ttft_ewma_s),
            "router_provider_tpot_ewma_seconds": ("Peak EWMA TPOT", lambda f: f.tpot_ewma_s),
        }
        for name, (text, read) in gauges.items():
            tel.meter.create_observable_gauge(name, [self._observe(read)], description=text)

    def _observe(
        self, read: Callable[[ProviderFigures], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for provider, figures in self.shared.providers.items():
                value = read(figures)
                if value is not None:
                    yield Observation(value, {"provider": provider})

        return callback

    def _tenant_instruments(self, tel: Telemetry) -> None:
        self._tenant_requests = _Counter(
            tel, "router_tenant_requests", "Requests per tenant, by outcome (ok, failed, refused)"
        )
        self._tenant_tokens = _Counter(
            tel, "router_tenant_tokens", "Tokens the providers reported, per tenant and kind"
        )
        self._tenant_cost = _Counter(
            tel, "router_tenant_cost_usd", "Cost of the served requests (USD)", scale=1e-9
        )
        self._tenant_rejections = _Counter(
            tel, "router_tenant_rejections", "Requests refused for a tenant's limit or budget"
        )
        gauges: dict[str, tuple[str, Callable[[TenantFigures], float | None]]] = {
            "router_tenant_in_flight": ("In flight, cluster-wide", lambda f: f.in_flight),
            "router_tenant_rpm_used": ("Requests in the RPM window", lambda f: f.rpm_used),
            "router_tenant_tpm_used": ("Tokens in the TPM window", lambda f: f.tpm_used),
            "router_tenant_spend_usd": ("Spend this budget period", lambda f: f.spend_usd),
            "router_tenant_budget_usd": ("Budget per period", lambda f: f.budget_usd),
        }
        for name, (text, read) in gauges.items():
            tel.meter.create_observable_gauge(name, [self._observe_tenants(read)], description=text)

    def _observe_tenants(
        self, read: Callable[[TenantFigures], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for tenant, figures in self.shared.tenants.items():
                value = read(figures)
                if value is not None:
                    yield Observation(value, {"tenant": tenant})

        return callback

    def tenant_request(self, tenant: str, route: str, outcome: str) -> None:
        """One request of ``tenant`` ended: ``outcome`` is one of ``TENANT_OUTCOMES``."""
        self._tenant_requests.add((("tenant", tenant), ("route", route), ("outcome", outcome)))

    def tenant_served(
        self,
        tenant: str,
        route: str,
        provider: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_nano: int,
    ) -> None:
        """What a provider reported it used for one of ``tenant``'s requests, and its cost."""
        where = (("tenant", tenant), ("route", route), ("provider", provider))
        self._tenant_tokens.add((*where, ("kind", "prompt")), prompt_tokens)
        self._tenant_tokens.add((*where, ("kind", "completion")), completion_tokens)
        self._tenant_cost.add(where, cost_nano)

    def tenant_rejected(self, tenant: str, code: str) -> None:
        """One request of ``tenant`` refused for its own limit or budget (``TENANT_REJECTIONS``)."""
        self._tenant_rejections.add((("tenant", tenant), ("code", code)))

    def request(self, route: str, provider: str, status: int, outcome: str, seconds: float) -> None:
        """One answered request."""
        self._requests.add(
            (
                ("route", route),
                ("provider", provider),
                ("status_class", f"{status // 100}xx"),
                ("outcome", outcome),
            )
        )
        if provider != "none":
            self._duration.record(seconds, {"route": route, "provider": provider})

    def first_token(self, route: str, provider: str, seconds: float) -> None:
        """A stream's time to first token."""
        self._ttft.record(seconds, {"route": route, "provider": provider})

    def failover(self, route: str, provider: str, reason: str) -> None:
        """One failed attempt that sent the request on."""
        self._failovers.add((("route", route), ("provider", provider), ("reason", reason)))

    def affinity(self, route: str, outcome: str) -> None:
        """One decision with an affinity pin, and what became of it."""
        self._affinity.add((("route", route), ("outcome", outcome)))

    def saturated(self, route: str) -> None:
        self._saturated.add((("route", route),))

    def queue_wait(self, route: str, tenant: str | None, seconds: float) -> None:
        """An admitted request waited ``seconds`` in the route's queue."""
        self._queue_wait.record(seconds, {"route": route, "tenant": tenant or "-"})

    def _observe_waiting(self, _: CallbackOptions) -> Iterable[Observation]:
        for (route, tenant, priority), n in self.waiting().items():
            attrs = {"route": route, "tenant": tenant, "priority": str(priority)}
            yield Observation(n, attrs)

    def decision(self, route: str, mode: str, seconds: float) -> None:
        self._decision.record(seconds, {"route": route, "mode": mode})

    def cooldown(self, provider: str) -> None:
        self._cooldowns.add((("provider", provider),))

    def circuit_opened(self, provider: str) -> None:
        self._circuits.add((("provider", provider),))

    def redis_error(self, operation: str) -> None:
        self._redis_errors.add((("operation", operation),))


class _Counter:
    """A counter kept in a plain dict and reported through an observable counter.

    The SDK's ``Counter.add`` costs about 8 us a call on this machine type; a dict increment
    costs a fraction of one, and the exporter reads the totals only when scraped.
    """

    def __init__(self, tel: Telemetry, name: str, description: str, scale: float = 1) -> None:
        self.counts: dict[tuple[tuple[str, str], ...], int] = {}
        self.scale = scale
        """Reported as ``count x scale``: an exact integer count (nano-dollars) shown in a
        unit people read (dollars)."""
        tel.meter.create_observable_counter(name, [self._observe], description=description)

    def add(self, labels: tuple[tuple[str, str], ...], n: int = 1) -> None:
        self.counts[labels] = self.counts.get(labels, 0) + n

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        for labels, n in list(self.counts.items()):
            yield Observation(n * self.scale if self.scale != 1 else n, dict(labels))
