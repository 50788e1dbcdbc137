"""The health daemon: the one leader among its peers probes every provider into Redis.

Its shape follows uvicorn's ``Server``: startup (store, HTTP API, one probe task per
provider), a main loop whose tick keeps or seeks the leader lease every ``lease_s / 3``,
and a graceful shutdown on SIGTERM/SIGINT that stops probing and resigns, so a standby
takes over at its next tick instead of when the lease runs out. Only the leader probes,
and every write carries its epoch: a paused old leader's writes are fenced off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import httpx
from aiohttp import web

from healthd.metrics import Metrics
from healthd.probe import ProbeClients, ProbeResult, probe
from healthd.server import make_app, start_server
from router.config import Config, Provider, masked_url
from router.errors import StoreError
from router.state.health import HealthStore
from router.state.store import Store

log = logging.getLogger("healthd")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JITTER = 0.1
"""Each probe interval is stretched or shrunk by up to 10 %, so the probes of many
providers spread out instead of firing in lockstep."""


def daemon_id() -> str:
    """``<hostname>-<pid>-<6 hex>``: the hex tells apart two lives of one reused PID."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": fields}


class HealthDaemon:
    """Keeps or seeks the leader lease and, while leading, probes every provider."""

    def __init__(self, cfg: Config, *, host: str = "127.0.0.1", port: int = 8081) -> None:
        self.cfg = cfg
        self.host, self.port = host, port
        self.id = daemon_id()
        self.leading = False
        self.epoch = 0
        self.failed = False
        """Set when a probe task died of a bug: the daemon stops and exits non-zero."""
        self.metrics = Metrics(
            (p.name for p in cfg.providers), self.id, lambda: self.leading, lambda: self.epoch
        )
        self._store = Store.from_config(cfg)
        self._health = HealthStore(self._store)
        self._lead = asyncio.Event()  # set while leading: the probe tasks wait on it
        self._stop = asyncio.Event()
        self._seen: dict[str, str] = {}  # provider -> the health state last seen
        self._store_ok = True
        self._standby_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT: startup, the leadership loop, graceful shutdown."""
        with self._capture_signals():
            runner, clients = await self._startup()
            try:
                await self._main_loop()
            finally:
                await self._shutdown(runner, clients)

    def stop(self) -> None:
        """Ask the daemon to shut down (call it in the loop's thread; signals hand over to it)."""
        self._stop.set()

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers: an embedding program calls stop()
            return
        loop = asyncio.get_running_loop()

        def handle(sig: int, frame: FrameType | None) -> None:
            # a signal handler may interrupt the loop mid-step: hand over, do nothing here
            loop.call_soon_threadsafe(self.stop)

        original = {sig: signal.signal(sig, handle) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            # Restored, not re-raised as uvicorn does: the signal asked for a clean exit
            # (status 0), which the shutdown just gave.
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def _startup(self) -> tuple[web.AppRunner, ProbeClients]:
        try:
            await self._reach_store()
            runner = await start_server(make_app(self), self.host, self.port)
        except (StoreError, OSError):
            await self._store.close()
            raise
        clients = ProbeClients()
        for p in self.cfg.providers:
            task = asyncio.create_task(self._probe_loop(clients.of(p), p), name=f"probe {p.name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        log.info(
            "started",
            extra=_fields(
                id=self.id,
                host=self.host,
                port=self.port,
                providers=len(self.cfg.providers),
                lease_s=self.cfg.healthd.lease_s,
                store=masked_url(self.cfg.redis_url or ""),
            ),
        )
        return runner, clients

    async def _reach_store(self) -> None:
        """Reach Redis within ``redis.startup_timeout_s``, as a replica does: past it the
        daemon does not start (a wrong URL fails loudly), unless ``redis.start_degraded``:
        then it starts standing by, and its ticks try Redis until it answers."""
        settings = self.cfg.redis
        if not settings.start_degraded:
            await self._store.start_within(settings.startup_timeout_s, self._not_yet)
            return
        try:
            await self._store.start()
        except StoreError as exc:
            self._store_health(False, str(exc))

    def _not_yet(self, exc: StoreError) -> None:
        log.warning(
            "shared store does not answer yet: trying again",
            extra=_fields(
                store=masked_url(self.cfg.redis_url or ""),
                within_s=self.cfg.redis.startup_timeout_s,
                error=str(exc),
            ),
        )

    async def _main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.cfg.healthd.lease_s / 3
        while not self._stop.is_set():
            next_tick = loop.time() + period
            await self._tick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_tick):
                    await self._stop.wait()

    async def _tick(self) -> None:
        """Take or keep the lease; any doubt (a store error) means standing by at once."""
        try:
            lead = await self._health.take_lead(self.id, int(self.cfg.healthd.lease_s * 1000))
            if lead.leading and not (self.leading and lead.epoch == self.epoch):
                await self._seed()
        except StoreError as exc:
            self._store_health(False, str(exc))
            self._stand_by(self.epoch, "shared store unavailable")
            return
        self._store_health(True, "")
        if lead.leading:
            self._take_over(lead.epoch)
        else:
            self._stand_by(lead.epoch, f"{lead.holder} leads")

    async def _seed(self) -> None:
        # A new leadership starts from the states in Redis, so the first probe's state is
        # compared with what the previous leader left, not with nothing.
        snap = await self._health.read([p.name for p in self.cfg.providers])
        self._seen = {name: h.health for name, h in snap.providers.items()}

    def _take_over(self, epoch: int) -> None:
        changed = not self.leading or epoch != self.epoch
        self.leading, self.epoch = True, epoch
        self._lead.set()
        if changed:
            log.info("leading", extra=_fields(id=self.id, epoch=epoch))

    def _stand_by(self, epoch: int, reason: str) -> None:
        was = self.leading
        self.leading, self.epoch = False, epoch
        self._lead.clear()
        if was or not self._standby_logged:
            self._standby_logged = True
            log.info("standing by", extra=_fields(id=self.id, epoch=epoch, reason=reason))

    def _store_health(self, ok: bool, error: str) -> None:
        if ok != self._store_ok:
            self._store_ok = ok
            if ok:
                log.info("shared store available again")
            else:
                log.warning("shared store unavailable", extra=_fields(error=error))

    async def _probe_loop(self, client: httpx.AsyncClient, provider: Provider) -> None:
        """Probe ``provider`` every ``interval_s`` (jittered) while leading; its own pace."""
        loop = asyncio.get_running_loop()
        interval = provider.health.interval_s
        while True:
            await self._lead.wait()
            started, epoch = loop.time(), self.epoch
            result = await probe(client, provider)
            self.metrics.probed(provider.name, result.ok, result.latency_ms)
            await self._record(provider, epoch, result)
            delay = interval * self._rng.uniform(1 - JITTER, 1 + JITTER)
            await asyncio.sleep(max(0.0, started + delay - loop.time()))

    async def _record(self, provider: Provider, epoch: int, result: ProbeResult) -> None:
        if not self.leading or epoch != self.epoch:
            return  # probed under a leadership this daemon no longer holds
        hc = provider.health
        try:
            write = await self._health.report_probe(
                provider.name,
                epoch,
                result.ok,
                result.latency_ms,
                result.error,
                hc.rise,
                hc.fall,
                real=hc.probe.real_request,
            )
        except StoreError as exc:
            # the next tick decides about leadership; this one result is lost
            log.warning("probe not recorded", extra=_fields(provider=provider.name, error=str(exc)))
            return
        if not write.recorded:
            self._stand_by(epoch, "fenced off: a newer leader has taken over")
            return
        self._note_state(provider.name, write.state, epoch, result)

    def _note_state(self, name: str, state: str, epoch: int, result: ProbeResult) -> None:
        previous = self._seen.get(name, "")
        self._seen[name] = state
        if not state or state == previous:
            return
        self.metrics.transitioned(name, state)
        log.info(
            "health transition",
            extra=_fields(
                provider=name,
                previous=previous or "unknown",
                health=state,
                epoch=epoch,
                error=result.error,
                latency_ms=round(result.latency_ms, 1),
            ),
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        # A probe task only ends by a bug: fail loudly rather than stop probing one provider.
        log.error("probe task died", exc_info=task.exception())
        self.failed = True
        self.stop()

    async def _shutdown(self, runner: web.AppRunner, clients: ProbeClients) -> None:
        log.info("shutting down", extra=_fields(id=self.id, leading=self.leading))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.leading = False
        self._lead.clear()
        try:
            resigned = await self._health.resign(self.id)
        except StoreError as exc:
            log.warning(
                "could not resign: the lease will run out instead", extra=_fields(error=str(exc))
            )
        else:
            if resigned:
                log.info("resigned", extra=_fields(id=self.id, epoch=self.epoch))
        await clients.close()
        await runner.cleanup()
        await self._store.close()
        log.info("stopped", extra=_fields(id=self.id))
