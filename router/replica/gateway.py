"""A replica's parts, wired together: store, upstream client, leases, health, heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from router.config import Config, masked_url
from router.errors import StoreError
from router.replica.degraded import SharedMode
from router.replica.dispatch import Dispatcher
from router.replica.healthview import HealthView
from router.replica.heartbeat import Heartbeat
from router.replica.leases import LeaseKeeper
from router.replica.local import LocalState
from router.replica.poller import StatePoller
from router.replica.tenants import TenantDirectory, TenantView
from router.state.health import HealthStore
from router.state.store import RoutePlan, Store
from router.state.tenants import TenantStore
from router.telemetry.metrics import RouterMetrics, SharedFigures
from router.telemetry.tracing import Telemetry
from router.upstream.client import Upstream

log = logging.getLogger("router.gateway")


class Gateway:
    """The parts of a replica, built from its config and started with the app."""

    def __init__(self, cfg: Config, store: Store | None = None) -> None:
        self.cfg = cfg
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = store or Store.from_config(cfg)
        self.upstream = Upstream(cfg.dns_ttl_s)
        self.mode = SharedMode(self.store, cfg.redis.degrade_after_ms / 1000)
        self.local = LocalState(cfg)
        self.telemetry = Telemetry("router", self.replica)
        self.shared = SharedFigures()
        self.metrics = RouterMetrics(
            self.telemetry, self.shared, lambda: self.mode.degraded, self.mode.seconds
        )
        self.store.on_error = self.metrics.redis_error
        self.poller = StatePoller(
            self.store,
            cfg,
            self.shared,
            self.mode,
            tenants=lambda: list(self.tenants.directory.plans.values()),  # the API's too
        )
        self.metrics.waiting = lambda: self.poller.waiting
        self.leases = LeaseKeeper(self.store, self.mode, self.local, self.metrics, self.telemetry)
        health = HealthStore(self.store)
        providers = [p.name for p in cfg.providers]
        self.view = HealthView(health, providers, cfg.replica.resync_s)
        self.tenants = TenantView(
            TenantStore(self.store),
            TenantDirectory.from_config(cfg, self.store.keys),
            cfg.replica.resync_s,
        )
        """Who each bearer key is: the config's tenants and keys, and the admin API's."""
        self.mode.on_recovery += [
            self.view.resync,
            self.tenants.resync,
            self.leases.flush_deferred,
        ]
        self.heartbeat = Heartbeat(
            health,
            self.replica,
            {"host": socket.gethostname(), "pid": str(os.getpid())},
            cfg.replica.heartbeat_s,
            self.local,
            self.mode,
        )
        self.dispatcher = Dispatcher(
            cfg,
            self.store,
            self.upstream,
            self.leases,
            self.replica,
            self.view,
            self.telemetry,
            self.metrics,
        )
        self.dispatcher.admission_rate = self._admission_rate
        self.loaded_at = int(time.time())
        """When this replica loaded its config (Unix time): the ``created`` of its models."""
        url = cfg.redis_url
        self.store_name = "embedded" if self.store.embedded or not url else masked_url(url)
        """The store as it may be printed: ``embedded``, or Redis's URL masked."""
        self.start_error = ""
        """Why ``start`` failed, if it did (the command line says it on exit)."""

    async def start(self) -> None:
        """Connect to the store and open the upstream session; raise ``StoreError`` when Redis
        does not answer within ``redis.startup_timeout_s`` (unless ``redis.start_degraded``)."""
        if self.store.embedded:
            log.warning(
                "no redis_url or REDIS_URL: running on the embedded in-process store, "
                "which serves this one replica only; run Redis for more than one"
            )
        await self.upstream.start()
        try:
            await self._connect()
        except StoreError as exc:
            self.start_error = str(exc)
            await self.upstream.close()
            await self.store.close()
            raise
        await self._read_tenants()
        self.leases.start()
        self.view.start()
        self.tenants.start()
        self.heartbeat.start()
        self.poller.start()
        self.dispatcher.room.start()
        fields = {"replica": self.replica, "store": self.store_name}
        log.info("replica started", extra={"fields": fields})

    async def _connect(self) -> None:
        """Reach Redis, or start degraded if the operator chose to: a replica that cannot
        reach Redis at start-up is most often misconfigured (a mistyped ``redis_url``), and
        one that reports ready while deciding alone hides it (a later outage is different:
        the replica had a working Redis, and goes degraded until it is back)."""
        settings = self.cfg.redis
        try:
            if settings.start_degraded:
                await self.store.start()
            else:
                await self.store.start_within(settings.startup_timeout_s, self._not_yet)
            await self.heartbeat.beat()
        except StoreError as exc:
            if not settings.start_degraded:
                raise StoreError(
                    f"Redis at {self.store_name} did not answer: {exc}. Check redis_url (or "
                    "REDIS_URL), or set redis.start_degraded: true to start without it"
                ) from exc
            self.mode.degrade(exc)  # the operator's choice: serve, deciding alone

    async def _read_tenants(self) -> None:
        """Read the issued keys before serving: a replica (re)started must honour them from its
        first request, not from its view's first read. Without Redis, the view reads them
        once it answers."""
        if self.mode.degraded:
            return
        try:
            await self.tenants.resync()
        except StoreError as exc:
            log.warning("cannot read the tenants yet", extra={"fields": {"error": str(exc)}})

    def _admission_rate(self, plan: RoutePlan) -> float:
        """Requests per second the route's targets admitted over the last window, from the
        shared figures the state poller read (a request waiting in the queue is told when its
        turn may come from this)."""
        figures = self.shared.providers
        used = sum(figures[p].rpm_used for p in plan.providers if p in figures)
        return used / 60

    def _not_yet(self, exc: StoreError) -> None:
        log.warning(
            "Redis does not answer yet: trying again",
            extra={
                "fields": {
                    "store": self.store_name,
                    "within_s": self.cfg.redis.startup_timeout_s,
                    "error": str(exc),
                }
            },
        )

    async def stop(self) -> None:
        """Finish pending releases, then close everything."""
        await self.dispatcher.room.stop()
        await self.poller.stop()
        await self.heartbeat.stop()
        await self.view.stop()
        await self.tenants.stop()
        await self.mode.stop()
        await self.leases.stop()
        await self.upstream.close()
        self.telemetry.shutdown()
        await self.store.close()
