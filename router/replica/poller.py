"""Reads the cluster's shared state every few seconds for the per-provider, per-tenant and
queue gauges: two script calls per ``INTERVAL_S`` (the providers' and queues', then the
tenants').

Metric callbacks cannot wait on Redis, so the figures are read in the background and the
callbacks report the latest reading. While the replica is degraded there is nothing to read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from router.config import Config
from router.errors import StoreError
from router.replica.background import Background
from router.replica.degraded import SharedMode
from router.state.cluster import ClusterState, read_state, waiting_counts
from router.state.store import Store, TenantPlan
from router.state.tenantstate import TenantState, config_plans, read_tenants
from router.telemetry.metrics import ProviderFigures, SharedFigures, TenantFigures

log = logging.getLogger("router.poller")

INTERVAL_S = 5.0


def figures(state: ClusterState) -> dict[str, ProviderFigures]:
    """The gauges' view of one cluster state reading."""
    return {
        p.name: ProviderFigures(
            in_flight=p.in_flight,
            rpm_used=p.rpm_used,
            rpm_limit=p.rpm_limit,
            tpm_used=p.tpm_used,
            tpm_limit=p.tpm_limit,
            healthy=p.health != "down",
            circuit_open=p.circuit != "closed",
            drained=p.drained,
            ttft_ewma_s=p.ttft_ewma_ms / 1000 if p.ttft_ewma_ms is not None else None,
            tpot_ewma_s=p.tpot_ewma_ms / 1000 if p.tpot_ewma_ms is not None else None,
        )
        for p in state.providers
    }


def tenant_figures(tenants: Sequence[TenantState]) -> dict[str, TenantFigures]:
    """The gauges' view of one tenants reading."""
    return {
        t.name: TenantFigures(
            in_flight=t.in_flight,
            rpm_used=t.rpm_used,
            tpm_used=t.tpm_used,
            spend_usd=t.spend_usd if t.budget_nano is not None else None,
            budget_usd=t.budget_usd,
        )
        for t in tenants
    }


class StatePoller(Background):
    """Keeps ``shared`` current from Redis, every ``interval_s``.

    ``tenants`` names the tenants to read, asked anew at each poll (the admin API's come
    and go): by default the config's (``config_plans``), ``default`` included."""

    name = "state-poller"

    def __init__(
        self,
        store: Store,
        cfg: Config,
        shared: SharedFigures,
        mode: SharedMode,
        interval_s: float = INTERVAL_S,
        tenants: Callable[[], Sequence[TenantPlan]] | None = None,
    ) -> None:
        self.store, self.cfg, self.shared, self.mode = store, cfg, shared, mode
        self.interval_s = interval_s
        plans = config_plans(cfg, store.keys)
        self.tenants = tenants or (lambda: plans)
        self.waiting: dict[tuple[str, str, int], int] = {}
        """Requests waiting per (route, tenant, priority), cluster-wide, as last read."""

    async def poll(self) -> None:
        """Read the shared state once (raises ``StoreError``)."""
        state = await read_state(self.store, self.cfg)
        self.shared.providers = figures(state)
        self.waiting = waiting_counts(state)
        self.shared.tenants = tenant_figures(await read_tenants(self.store, self.tenants()))

    async def run(self) -> None:
        """Poll until stopped."""
        while True:
            if not self.mode.degraded:
                try:
                    await self.poll()
                except StoreError as exc:
                    log.debug("state poll failed: %s", exc)  # counted as a Redis error
            await asyncio.sleep(self.interval_s)
