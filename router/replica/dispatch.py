"""One client request from acquire to release: choose, send, fail over, account.

    acquire (Lua, one round trip) --> send to the chosen provider --> release (Lua)
        ^                                   | connect error, timeout, 5xx, 429
        +---------- next untried target <---+  (up to max_attempts, within timeout_s)

A stream fails over only until its first byte has gone to the client; after that a failure
ends it with an OpenAI-shaped error event. Every lease is released exactly once, on every
path, including a client that goes away mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from opentelemetry.trace import SpanKind

from router.budgets import cost_nano, period_id
from router.config import BudgetPeriod, Config, Price, Provider, Route, TpmAccounting
from router.errors import (
    AllAttemptsFailed,
    Attempt,
    BadRequest,
    ClientError,
    ClientGone,
    PinnedUnavailable,
    PreviousResponseNotFound,
    ProviderClientError,
    Saturated,
    StoreError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStatusError,
)
from router.replica.decisions import log_decision
from router.replica.healthview import HealthView
from router.replica.leases import LeaseKeeper
from router.replica.refusal import REASONS, refusal, tenant_refusal
from router.replica.waitroom import IDLE_LOOK_S, WaitRoom
from router.state.affinity import PinRequest
from router.state.store import (
    Decision,
    Lease,
    LostLease,
    Outcome,
    QueueState,
    RoutePlan,
    Store,
    TenantPlan,
    Ticket,
)
from router.strategies import CAPACITY, Code, PinOutcome, TenantCode
from router.telemetry.logs import decisions_logged
from router.telemetry.metrics import RouterMetrics
from router.telemetry.tracing import Telemetry
from router.tokens import (
    embedding_tokens,
    max_output,
    prompt_tokens,
    reservation,
)
from router.upstream.client import Upstream, UpstreamResponse
from router.upstream.codecs import Codec, Inbound, codec_for, serves
from router.upstream.providers import adapter_for, messages, responses
from router.upstream.providers.base import (
    Adapter,
    RateLimitInfo,
    StreamTranslator,
    Translated,
    Usage,
)

log = logging.getLogger("router.dispatch")

DEFAULT_COOLDOWN_S = 1.0
"""Cooldown after a 429 that named no Retry-After or reset time."""
POLL_S = 0.05
"""How often a queued request looks again when no release time is known."""
CLIENT_ERRORS = frozenset({400, 413, 414, 422, 431})
"""Provider statuses that are the request's fault: passed through, never failed over, never
counted against the provider (its circuit). 414 and 431 are here too: a request line or
headers too large for a provider are the request's doing, not a sign of the provider's health
(a client's 32 KiB ``traceparent``, when it was forwarded as it came, opened every circuit)."""
FIRST_EVENT = "no event within the route's timeout_s"
STREAM_IDLE = "no event within stream_idle_s"
STREAM_TOTAL = "the stream ran past stream_total_s"
"""Why a stream timed out: before its first event, between two, overall."""


class Operation(Enum):
    """The inbound API a request came in (its value names its codecs: router.upstream.codecs)."""

    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"
    RESPONSES = "responses"


PIN_OUTCOMES = {
    PinOutcome.HIT: "hit",
    PinOutcome.NEW: "new",
    PinOutcome.SPILLED: "spilled",
    PinOutcome.MOVED: "moved",
    PinOutcome.PIN_UNAVAILABLE: "unavailable",
    PinOutcome.FOREIGN: "foreign",
}
"""The metrics' and the decision log's word for each thing a pin did."""

_API_NAMES = {
    Operation.CHAT: "chat completions",
    Operation.EMBEDDINGS: "embeddings (anthropic targets do not)",
    Operation.MESSAGES: "the Messages API with server tools (only anthropic targets do)",
    Operation.RESPONSES: (
        "the Responses API (only openai targets do, and not those with responses: false)"
    ),
}
"""What a route none of whose targets can serve a request lacks, as its 400 says."""

_PROMPT_TOKENS: dict[Operation, Callable[[dict[str, Any]], int]] = {
    Operation.CHAT: prompt_tokens,
    Operation.EMBEDDINGS: embedding_tokens,
    Operation.MESSAGES: messages.prompt_estimate,
    Operation.RESPONSES: responses.prompt_estimate,
}
"""How each API's prompt is estimated (router.tokens), for its TPM reservations."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A served request: a whole JSON body or a stream, and who served it."""

    provider: str
    attempts: int
    body: bytes | None = None
    stream: AsyncGenerator[bytes, None] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    """For a stream: must be awaited once the response is over, however it ended."""
    outcome: Callable[[], str] | None = None
    """For a stream, once closed: how it ended (ok, client_cancelled, a provider failure)."""


@dataclass(slots=True)
class _Job:
    """One request's state across attempts."""

    op: Operation
    body: dict[str, Any]
    request_id: str
    inbound: Inbound
    plan: RoutePlan
    tokens: list[int]
    budgets: list[int]
    """Each target's completion budget: the body's, else the route's, else its adapter's."""
    excluded: list[bool]
    expected_output: int
    deadline: float
    attempts: list[Attempt]
    prompt: int = 0
    """The prompt's estimated tokens."""
    tenant: TenantPlan | None = None
    tenant_tokens: list[int] | None = None
    """Per target: what the request reserves in the tenant's TPM (prompt + completion
    budget, corrected to the reported usage on release)."""
    costs: list[int] | None = None
    """Per target: the request's worst-case cost there (nano-USD)."""
    counted: bool = False
    """The request has been counted in its tenant's RPM (by its first admission)."""
    ticket: Ticket | None = None
    """Its place in the route's wait queue, once it needed one."""
    priority: int | None = None
    """The priority the request asked for (``x-priority``), which may only lower its
    tenant's."""
    traceparent: str | None = None
    client_left: Callable[[], Awaitable[object]] | None = None
    """Returns when the client has closed its connection (watched while the request waits)."""
    retry_after_s: float = 0.0
    """The longest cooldown a provider's 429 asked for, for the client's Retry-After."""
    pin: PinRequest | None = None
    """The affinity pin its acquire reads (and writes), if any."""
    pin_response: bool = False
    """A Responses API answer that the provider stores: its id is pinned to the provider."""

    def tenant_reservation(self) -> tuple[int, int]:
        """Tokens and cost to reserve against the tenant: the most any target still open
        to the request could take (the target is chosen in the same call)."""
        if self.tenant_tokens is None or self.costs is None:
            return 0, 0
        open_ = [i for i, skip in enumerate(self.excluded) if not skip] or [0]
        return max(self.tenant_tokens[i] for i in open_), max(self.costs[i] for i in open_)


class Dispatcher:
    """Routes requests over the providers of each route, through the shared store."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        upstream: Upstream,
        leases: LeaseKeeper,
        replica: str,
        view: HealthView,
        tel: Telemetry,
        metrics: RouterMetrics,
    ) -> None:
        self.cfg = cfg
        self.tel = tel
        self.metrics = metrics
        self.store = store
        self.upstream = upstream
        self.leases = leases
        self.replica = replica
        self.view = view
        self.plans = {r.model: RoutePlan.build(cfg, r, store.keys) for r in cfg.routes}
        self.providers = {p.name: p for p in cfg.providers}
        self._rand = random.Random()
        routes_of: dict[str, list[str]] = {}
        for r in cfg.routes:
            for t in r.targets:
                routes_of.setdefault(t.provider, []).append(r.model)
        self.room = WaitRoom(store, leases.mode, routes_of)
        """Where this replica's requests wait for a saturated route."""
        self.admission_rate: Callable[[RoutePlan], float] = lambda plan: 0.0
        """Requests per second the route's targets admit, from the shared state (the
        gateway sets it from the state poller's figures)."""
        self._lease_prefix = f"{replica}:"
        self._lease_numbers = itertools.count(1)

    async def serve(
        self,
        op: Operation,
        route: Route,
        body: dict[str, Any],
        rid: str,
        traceparent: str | None = None,
        tenant: TenantPlan | None = None,
        priority: int | None = None,
        inbound: Inbound | None = None,
        *,
        affinity: str | None = None,
        previous_response: str | None = None,
        client_left: Callable[[], Awaitable[object]] | None = None,
    ) -> Reply:
        """Serve one request on ``route`` for ``tenant``; raise a ``RouterError`` when it
        cannot be. ``priority``: what the request asked for (it may only lower its
        tenant's); ``inbound``: what the codecs may need of the client's request besides its
        body (by default: the body's model, no headers). ``affinity``: the request's key under
        the route's affinity (its pin is honoured while the pinned target has room);
        ``previous_response``: the Responses API's ``previous_response_id`` (its pin must be:
        the provider that made that response is the only one that has it); ``client_left``:
        returns when the client has gone (a request that waits for room gives up then, its
        ticket with it, instead of being served to nobody)."""
        job = self._job(op, route, body, rid, tenant, inbound)
        job.client_left = client_left
        if all(job.excluded):
            raise BadRequest(
                f"the model '{route.model}' has no target that serves {_API_NAMES[op]}", "model"
            )
        job.pin = self._pin_request(route, affinity, previous_response, tenant)
        job.pin_response = op is Operation.RESPONSES and body.get("store") is not False
        job.traceparent = traceparent
        job.priority = priority
        loop = asyncio.get_running_loop()
        # once the route's time is spent, a further attempt could only time out, and that
        # timeout would be counted against a provider that did nothing wrong
        while len(job.attempts) < route.max_attempts and (
            not job.attempts or loop.time() < job.deadline
        ):
            lease, index = await self._acquire(job)
            provider = self.providers[lease.provider]
            try:
                n = len(job.attempts) + 1
                with self.tel.span(
                    f"attempt {provider.name}", SpanKind.CLIENT, provider=provider.name, attempt=n
                ):
                    return await self._attempt(job, provider, index, lease)
            except UpstreamError as exc:
                if isinstance(exc, UpstreamRateLimited):
                    job.retry_after_s = max(job.retry_after_s, exc.cooldown_s)
                self.metrics.failover(route.model, provider.name, exc.outcome)
                # released before the next acquire: the tenant's in-flight count and tokens
                # must not hold the failed attempt when the next one is checked against them
                await self.leases.release(lease, _failed(exc, lease))
                job.attempts.append(Attempt(provider.name, exc.outcome, str(exc)))
                job.excluded[index] = True
                log.info(
                    "attempt failed, failing over",
                    extra={
                        "fields": {
                            "request_id": rid,
                            "provider": provider.name,
                            "outcome": exc.outcome,
                            "error": str(exc),
                        }
                    },
                )
            except BaseException as exc:
                # the client's fault, a cancelled request or a bug: the lease must not outlive it
                outcome = "client_error" if isinstance(exc, ClientError) else "aborted"
                self.leases.release_soon(lease, _refund(Outcome(outcome), lease))
                raise
        raise _gave_up(job.attempts, job.retry_after_s)

    def _pin_request(
        self,
        route: Route,
        affinity: str | None,
        previous: str | None,
        tenant: TenantPlan | None,
    ) -> PinRequest | None:
        """The pin the request's acquire follows: its ``previous_response_id``'s (required:
        only that provider has the response), else its affinity key's on the route."""
        name = tenant.name if tenant is not None else ""
        if previous is not None:
            return PinRequest.response(previous, ttl_s=self.cfg.response_pin_ttl_s, tenant=name)
        if affinity is None or route.affinity is None:
            return None
        return PinRequest.preferred(
            route.model,
            affinity,
            self.plans[route.model].providers,
            ttl_s=route.affinity.ttl_s,
            load_factor=route.affinity.load_factor,
            tenant=name,
        )

    def _job(
        self,
        op: Operation,
        route: Route,
        body: dict[str, Any],
        rid: str,
        tenant: TenantPlan | None = None,
        inbound: Inbound | None = None,
    ) -> _Job:
        plan = self.plans[route.model]
        chat = op is not Operation.EMBEDDINGS
        prompt = _PROMPT_TOKENS[op](body)
        tokens, budgets, excluded = [], [], []
        inbound = inbound or Inbound(str(body.get("model", "")), {})
        for name, target in zip(plan.providers, route.targets, strict=True):
            p = self.providers[name]
            adapter = adapter_for(p.kind)
            budget = max_output(body, route.default_max_tokens or adapter.default_max_tokens)
            budgets.append(budget if chat else 0)
            tokens.append(reservation(prompt, budgets[-1], p.limits.tpm_accounting))
            excluded.append(not serves(op.value, p, target, inbound))
        deadline = asyncio.get_running_loop().time() + route.timeout_s
        expected = min(max(budgets), 512)
        job = _Job(op, body, rid, inbound, plan, tokens, budgets, excluded, expected, deadline, [])
        job.prompt = prompt
        if tenant is not None:
            job.tenant = tenant
            job.tenant_tokens = [prompt + b for b in budgets]
            job.costs = [
                cost_nano(prompt, b, t.price) for b, t in zip(budgets, route.targets, strict=True)
            ]
        return job

    async def _acquire(self, job: _Job) -> tuple[Lease, int]:
        """Lease a target, waiting up to the route's queue timeout for room: in the route's
        shared queue (fair, by priority band and tenant weight) while Redis is there."""
        watcher = _Watcher(job.client_left)
        try:
            got = await self._acquire_or_wait(job, watcher)
        except BaseException as exc:
            if job.ticket is not None and job.ticket.holds:  # its place goes to the next
                self.leases.dequeue_soon(job.plan.route.model, job.ticket.member)
                job.ticket = replace(job.ticket, holds=False)
            if watcher.saw_it_leave() and not isinstance(exc, ClientGone):
                raise watcher.gone() from None
            raise
        finally:
            await watcher.stop()
        if watcher.saw_it_leave():  # it left just as the request was admitted
            self.leases.release_soon(got[0], _refund(Outcome("client_error"), got[0]))
            raise watcher.gone()
        return got

    async def _acquire_or_wait(self, job: _Job, watcher: _Watcher) -> tuple[Lease, int]:
        loop = asyncio.get_running_loop()
        route = job.plan.route
        wait_until = min(loop.time() + route.queue_timeout_s, job.deadline)
        waited_from = 0.0
        while True:
            started = time.perf_counter_ns()
            left = wait_until - loop.time()
            heard = self.room.heard_of(route.model)
            with self.tel.span("acquire", attempt=len(job.attempts) + 1):
                d, lease_id, local = await self._decide(job, may_wait=left > 0)
            elapsed = (time.perf_counter_ns() - started) / 1e9
            # recorded once this request has gone on its way (a histogram record is not cheap)
            loop.call_soon(
                self.metrics.decision, route.model, "local" if local else "shared", elapsed
            )
            tenant = job.tenant.name if job.tenant is not None else None
            log_decision(job.request_id, route, d, len(job.attempts) + 1, started, tenant)
            if d.pin is not PinOutcome.NONE:
                self._pinned(job, d)
            if d.index is not None:
                if job.ticket is not None:
                    job.ticket = replace(job.ticket, holds=False)  # spent by the admission
                if waited_from:
                    self.metrics.queue_wait(route.model, tenant, loop.time() - waited_from)
                return self._leased(job, d, lease_id, local), d.index
            if d.tenant_code is not TenantCode.OK and job.tenant is not None:
                # the tenant's own limit: no queueing (its window frees on its own schedule,
                # and a queued request would only hold a client who can retry by Retry-After)
                err = tenant_refusal(job.tenant, d)
                self.metrics.tenant_rejected(job.tenant.name, err.code)
                raise err
            left = wait_until - loop.time()
            if d.queue_state is QueueState.WAITING and job.ticket is not None and left > 0:
                job.ticket = replace(job.ticket, holds=True)
                waited_from = waited_from or loop.time()
                # the head looks again when a window frees; any waiter when woken by a release
                # or an admission on any replica, or after IDLE_LOOK_S (a lost message)
                hint = d.wait_ms / 1000 if d.queue_rank == 0 and d.wait_ms > 0 else IDLE_LOOK_S
                watcher.start()
                await self.room.wait(
                    route.model, job.ticket.member, d.queue_place, min(left, hint), heard
                )
                continue
            if not local and (
                d.queue_state is not QueueState.NONE
                or (job.ticket is not None and job.ticket.holds)
            ):
                raise self._queue_refusal(job, d)
            # decided alone (Redis away): it waits for this replica's own share to free, in
            # no fair order (the shared queue's ticket, if any, expires within its TTL)
            if d.wait_ms == -2 or left <= 0:
                raise self._no_room(job, d)
            hint = d.wait_ms / 1000 if d.wait_ms > 0 else POLL_S
            watcher.start()
            await self.leases.changed(within=min(left, hint, 1.0) * self._rand.uniform(0.8, 1.0))

    def _pinned(self, job: _Job, d: Decision) -> None:
        """Count what the request's pin did; raise when it cannot be served elsewhere: a
        response of another tenant (as if unknown), or its provider out of service."""
        self.metrics.affinity(job.plan.route.model, PIN_OUTCOMES[d.pin])
        assert job.pin is not None
        if d.pin is PinOutcome.FOREIGN:
            raise PreviousResponseNotFound(job.pin.key)
        if d.pin is PinOutcome.PIN_UNAVAILABLE:
            code = next((c.code for c in d.candidates if c.provider == d.pinned), Code.EXCLUDED)
            if code not in CAPACITY:  # (waiting for room is the caller's, as for any request)
                why = "; ".join(f"{a.provider}: {a.outcome}" for a in job.attempts)
                raise PinnedUnavailable(
                    f"the provider holding response '{job.pin.key}' ({d.pinned}) is "
                    + (f"failing ({why})" if job.attempts else REASONS[code])
                    + ": it alone has the conversation, so the request goes nowhere else"
                )

    def _leased(self, job: _Job, d: Decision, lease_id: str, local: bool) -> Lease:
        """The lease an admitting decision took, held by this replica (with what it
        reserved against its tenant, if it has one)."""
        assert d.index is not None
        provider, tokens = job.plan.providers[d.index], job.tokens[d.index]
        lease = Lease(lease_id, provider, d.bucket, tokens, local)
        if job.tenant is not None:
            reserved, cost = job.tenant_reservation()
            period = period_id(job.tenant.period or BudgetPeriod.MONTH, d.bucket)
            lease = replace(
                lease,
                tenant=job.tenant.name,
                route=job.plan.route.model,
                tenant_tokens=reserved,
                cost_nano=cost,
                period=period,
                tracked=job.tenant.tracked,
            )
            job.counted = True
        self.leases.hold(lease)
        return lease

    def _queue_refusal(self, job: _Job, d: Decision) -> Saturated:
        """429 for a request that waited its queue time out, or could not wait: Retry-After
        from its place in the queue and the route's admission rate in the shared state."""
        place = max(d.queue_rank, 0) + 1 if d.queue_rank >= 0 else d.queue_length + 1
        rate = self.admission_rate(job.plan) or 1.0
        retry = min(max(place / rate, 1.0), 600.0)
        model = job.plan.route.model
        self.metrics.saturated(model)
        why = {
            QueueState.FULL: f"its queue is full ({job.plan.route.max_queue} waiting)",
            QueueState.BEHIND: f"{d.queue_length} requests wait before it",
        }.get(d.queue_state, f"it waited its turn for {job.plan.route.queue_timeout_s:g} s")
        return Saturated(f"route {model} is saturated: {why}", retry)

    async def _decide(self, job: _Job, may_wait: bool = False) -> tuple[Decision, str, bool]:
        """One decision, under a lease id of its own: in Redis, or locally while the shared
        state is away. Returns the decision, the lease id and whether it was local.

        The id is the router's, new for every decision: ``x-request-id`` is the client's
        choice, and requests sending the same one would otherwise share one lease (a second
        ZADD of a member adds nothing; the first release frees it for all)."""
        lease_id = self._lease_id(job)
        rand = self._rand.getrandbits(31)
        mode, local = self.leases.mode, self.leases.local
        tenant_tokens, cost = job.tenant_reservation()
        if not mode.degraded:
            not_after = self.store.not_after_ms()
            try:
                d = await self.store.acquire(
                    job.plan,
                    lease_id,
                    job.tokens,
                    job.excluded,
                    rand=rand,
                    expected_output=job.expected_output,
                    detail=decisions_logged(),
                    not_after_ms=not_after,
                    tenant=job.tenant,
                    tenant_tokens=tenant_tokens,
                    cost_nano=cost,
                    counted=not job.counted,
                    ticket=self._ticket(job, may_wait),
                    affinity=job.pin,
                )
            except StoreError as exc:
                self._lost(job, lease_id, not_after)
                mode.enter(exc)
            except asyncio.CancelledError:  # e.g. the client left: Redis may run it all the same
                self._lost(job, lease_id, not_after)
                raise
            else:
                if d.index is not None:
                    local.admitted(job.plan.providers[d.index], job.tokens[d.index])
                    if job.tenant is not None:
                        local.tenant_admitted(
                            job.tenant, tenant_tokens, not job.counted, d.spent_nano, cost
                        )
                return d, lease_id, False
        if job.tenant is not None:
            code = local.tenant_check(
                job.tenant,
                tenant_tokens,
                cost,
                counted=not job.counted,
                in_flight=self.leases.tenant_in_flight(job.tenant.name),
            )
            if code is not TenantCode.OK:
                return local.tenant_refused(job.tenant, code), lease_id, True
        d = local.acquire(
            job.plan,
            job.tokens,
            job.excluded,
            in_flight=self.leases.in_flight(),
            health=self.view.snapshot.providers,
            rand=rand,
            expected_output=job.expected_output,
        )
        if d.index is not None and job.tenant is not None:
            local.tenant_admitted(job.tenant, tenant_tokens, not job.counted, None, cost)
        return d, lease_id, True

    def _ticket(self, job: _Job, may_wait: bool) -> Ticket | None:
        """The request's ticket for its route's queue (routes with a ``queue_timeout_s``)."""
        route = job.plan.route
        if route.queue_timeout_s <= 0:
            return None
        if job.ticket is None:
            t = job.tenant
            name, weight = (t.name, t.weight) if t is not None else ("-", 1)
            priority = t.priority if t is not None else 0
            if job.priority is not None:
                priority = min(priority, job.priority)  # a request may only lower its own
            member = f"{self._lease_prefix}q{next(self._lease_numbers)}|{name}|{priority}"
            job.ticket = Ticket(member, False, priority, weight, name, may_wait)
        elif job.ticket.may_wait != may_wait:
            job.ticket = replace(job.ticket, may_wait=may_wait)
        return job.ticket

    def _lease_id(self, job: _Job) -> str:
        """A new lease id: ``<replica>:<n>``, and ``@<tenant>`` for a tenant with a
        max_in_flight (its in flight is a counter in Redis: whatever removes the lease, its
        release or its expiry, takes it off the count of the tenant this suffix names)."""
        lease_id = f"{self._lease_prefix}{next(self._lease_numbers)}"
        if job.tenant is not None and job.tenant.max_in_flight:
            lease_id += f"@{job.tenant.name}"
        return lease_id

    def _lost(self, job: _Job, lease_id: str, not_after_ms: int) -> None:
        """An acquire whose answer never came may still lease a target: release it then."""
        targets = tuple(
            p for p, skip in zip(job.plan.providers, job.excluded, strict=True) if not skip
        )
        tenant = job.tenant.name if job.tenant is not None else ""
        tokens, cost = job.tenant_reservation()
        period = job.tenant.period if job.tenant is not None else None
        pid = period_id(period or BudgetPeriod.MONTH, not_after_ms // 1000)
        lost = LostLease(lease_id, targets, not_after_ms, tenant, tokens, cost, pid)
        self.leases.lost(lost)

    def _no_room(self, job: _Job, d: Decision) -> Exception:
        """No target now: what failover found, else a lack of room (429) or an outage (503)."""
        if job.attempts:
            return _gave_up(job.attempts, job.retry_after_s)
        if d.pin is PinOutcome.PIN_UNAVAILABLE and job.pin is not None:
            self.metrics.saturated(job.plan.route.model)
            retry = d.wait_ms / 1000 if d.wait_ms > 0 else 1.0
            return Saturated(
                f"the provider holding response '{job.pin.key}' ({d.pinned}) has no room now",
                retry,
            )
        err = refusal(job.plan, job.tokens, d)
        if isinstance(err, Saturated):
            self.metrics.saturated(job.plan.route.model)
        return err

    async def _attempt(self, job: _Job, provider: Provider, index: int, lease: Lease) -> Reply:
        adapter = adapter_for(provider.kind)
        codec = codec_for(job.op.value, provider.kind)
        model = job.plan.route.targets[index].model
        req = codec.request(provider, model, job.body, job.budgets[index], job.inbound)
        self.tel.inject(req.headers, job.traceparent)
        started = asyncio.get_running_loop().time()
        resp = await self.upstream.send(
            req, provider.timeouts, job.deadline, provider.bounds, provider
        )
        streaming = job.op is not Operation.EMBEDDINGS and bool(job.body.get("stream"))
        handed_over = False
        try:
            if resp.status != 200:
                await self._refuse(resp, adapter, provider, job.deadline)
            if streaming:
                reply = await self._stream(
                    job, index, provider, adapter, codec, lease, resp, started
                )
                handed_over = True
                return reply
            payload = await resp.read(job.deadline)
        finally:
            if not handed_over:
                resp.close()
        answer = codec.response(payload, job.inbound)
        info = adapter.rate_limits(resp.headers)
        await self._finish(job, index, lease, provider, info, answer, started)
        return Reply(provider.name, len(job.attempts) + 1, body=answer.body)

    async def _refuse(
        self, resp: UpstreamResponse, adapter: Adapter, provider: Provider, deadline: float
    ) -> None:
        """Turn a non-200 answer into the error that decides failover."""
        try:
            message = adapter.error_message(await resp.read(deadline))
        except UpstreamError:
            message = "(no readable body)"
        if resp.status == 429:
            info = adapter.rate_limits(resp.headers)
            cooldown = info.retry_after_s or info.reset_requests_s or info.reset_tokens_s
            raise UpstreamRateLimited(f"429 {message}", cooldown or DEFAULT_COOLDOWN_S)
        if resp.status in CLIENT_ERRORS:
            raise ProviderClientError(resp.status, message, provider.name)
        raise UpstreamStatusError(f"{resp.status} {message}", resp.status)

    async def _finish(
        self,
        job: _Job,
        index: int,
        lease: Lease,
        provider: Provider,
        info: RateLimitInfo,
        answer: Translated,
        started: float,
    ) -> None:
        duration_ms = (asyncio.get_running_loop().time() - started) * 1000
        out = answer.usage.completion_tokens if answer.usage else 0
        tpot = duration_ms / out if out > 0 else -1
        result = _outcome(lease, provider, info, answer.usage, ttft_ms=-1, tpot_ms=tpot)
        result = _charged(result, job, index, lease, answer.usage)
        if job.pin_response and answer.response_id:
            # pinned before the answer goes out: a follow-up may come at once, anywhere
            await self.release_pinned(lease, self._pin_response(result, answer.response_id))
        else:
            self.release_charged(lease, result)

    def _pin_response(self, outcome: Outcome, response_id: str) -> Outcome:
        """``outcome`` with the Responses API answer's id to pin to its provider on release
        (for the store's ``response_pin_ttl_ms``)."""
        return replace(outcome, response_id=response_id)

    async def release_pinned(self, lease: Lease, outcome: Outcome) -> None:
        """Release a served attempt now, and wait for it: its release pins its response."""
        self._count_charge(lease, outcome)
        await self.leases.release(lease, outcome)

    def release_charged(
        self, lease: Lease, outcome: Outcome, context: contextvars.Context | None = None
    ) -> None:
        """Release a served attempt's lease, and count what its tenant was charged."""
        self._count_charge(lease, outcome)
        self.leases.release_soon(lease, outcome, context)

    def _count_charge(self, lease: Lease, outcome: Outcome) -> None:
        if outcome.served:
            self.metrics.tenant_served(
                lease.tenant,
                lease.route,
                lease.provider,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                outcome.cost_nano,
            )

    async def _stream(
        self,
        job: _Job,
        index: int,
        provider: Provider,
        adapter: Adapter,
        codec: Codec,
        lease: Lease,
        resp: UpstreamResponse,
        started: float,
    ) -> Reply:
        """Wait for the first frame (failover is still possible until then), then relay."""
        translator = codec.stream(job.body, provider.bounds.max_event_bytes, job.inbound)
        total = provider.timeouts.stream_total_s
        end = started + total if total is not None else math.inf
        # the route's time, not the bytes that trickle in, bounds the wait for the first event
        if end < job.deadline:
            resp.set_deadline(end, STREAM_TOTAL)
        else:
            resp.set_deadline(job.deadline, FIRST_EVENT)
        chunks = resp.chunks()
        first = b""
        async for data in chunks:
            first = translator.feed(data)
            if first or _holds_terminal(translator):
                break
        if not first and not _holds_terminal(translator):
            raise UpstreamProtocolError("the stream ended before any data")
        relay = _Relay(self, job, index, provider, adapter, codec, lease, resp, started, end)
        stream = relay.run(first, chunks, translator)
        return Reply(
            provider.name,
            len(job.attempts) + 1,
            stream=stream,
            close=relay.close,
            outcome=lambda: relay.outcome,
        )


class _Watcher:
    """While a request waits for room: watches for its client to leave, and then cancels the
    request's task (so that it gives up its place instead of being served to nobody). Started
    at the first wait only: a request that does not wait costs nothing."""

    __slots__ = ("_client_left", "_left", "_watch")

    def __init__(self, client_left: Callable[[], Awaitable[object]] | None) -> None:
        self._client_left = client_left
        self._watch: asyncio.Task[None] | None = None
        self._left = False

    def start(self) -> None:
        task = asyncio.current_task()
        if self._watch is None and self._client_left is not None and task is not None:
            self._watch = asyncio.create_task(self._run(self._client_left, task))

    async def _run(
        self, client_left: Callable[[], Awaitable[object]], task: asyncio.Task[Any]
    ) -> None:
        try:
            await client_left()
        except Exception:  # the connection's own trouble: its request will meet it too
            return
        self._left = True
        task.cancel()

    @staticmethod
    def gone() -> ClientGone:
        return ClientGone("the client left while its request waited for room")

    def saw_it_leave(self) -> bool:
        """True when the client has left; the watcher's cancel, if still counted, is taken
        back (the request ends as an answer to nobody, not as a cancelled task)."""
        task = asyncio.current_task()
        if self._left and task is not None and task.cancelling():
            task.uncancel()
        return self._left

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and not watch.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch


class _Relay:
    """Relays one stream to the client and releases its lease however the stream ends."""

    def __init__(
        self,
        d: Dispatcher,
        job: _Job,
        index: int,
        provider: Provider,
        adapter: Adapter,
        codec: Codec,
        lease: Lease,
        resp: UpstreamResponse,
        started: float,
        end: float,
    ) -> None:
        self.d, self.job, self.provider, self.adapter = d, job, provider, adapter
        self.codec = codec
        self.index = index
        self.lease, self.resp, self.started = lease, resp, started
        self.end = end
        """When the stream must be over (stream_total_s), or inf."""
        self.events = 0
        """The translator's event count when the deadline last moved."""
        self.ttft_ms = -1.0
        self.released = False
        self.outcome = "client_cancelled"
        """How the stream ended: ok, client_cancelled, or the provider's failure."""
        self.ended = False
        """The provider's stream is complete (what is left to send is its tail)."""
        self.context = contextvars.copy_context()  # the request's trace, for the release

    async def close(self) -> None:
        """Release the lease if the relay never ran to its end (the client went away early)."""
        if not self.released:
            self.resp.close()
            self.released = True
            # the provider has started answering: what it generated is charged (the
            # reservation, with no usage reported)
            result = _charged(Outcome("client_cancelled"), self.job, self.index, self.lease, None)
            self.d.release_charged(self.lease, result, self.context)

    async def run(
        self, first: bytes, chunks: AsyncIterator[bytes], tr: StreamTranslator
    ) -> AsyncGenerator[bytes, None]:
        """Yield the stream to the client; release the lease however it ends."""
        loop = asyncio.get_running_loop()
        outcome = "client_cancelled"
        frames = self._frames(first, chunks, tr)
        try:
            async for out in frames:
                if self.ended:
                    outcome = "ok"
                yield out
            outcome = "ok"
        except UpstreamError as exc:
            outcome = exc.outcome
            log.warning(
                "stream failed after its first byte",
                extra={
                    "fields": {
                        "request_id": self.job.request_id,
                        "provider": self.provider.name,
                        "error": str(exc),
                    }
                },
            )
            if not getattr(tr, "failed", None):  # (else the provider's own error event went)
                message = f"the provider failed mid-stream: {exc}"
                yield self.codec.error_event(message, exc.outcome, tr)
        finally:
            await frames.aclose()
            self.resp.close()
            self.outcome = outcome
            if not self.released:
                self.released = True
                self._release(outcome, tr.usage, loop.time())

    async def _frames(
        self, first: bytes, chunks: AsyncIterator[bytes], tr: StreamTranslator
    ) -> AsyncGenerator[bytes, None]:
        """The frames to send: the first, each translated chunk, the held-back last event
        once pinned, the tail; ``ended`` is set once the provider's stream is complete."""
        loop = asyncio.get_running_loop()
        first_at = loop.time()
        if first:
            yield first  # the first frame goes out before anything else is done
        self._mark(tr, first_at)
        self._pace(tr, first_at)
        if _holds_terminal(tr):
            yield await self._terminal(tr)
        async for data in chunks:
            out = tr.feed(data)
            now = loop.time()
            self._mark(tr, now)
            if tr.events != self.events:
                self._pace(tr, now)
            if out:
                yield out
            if _holds_terminal(tr):
                yield await self._terminal(tr)
        tail = tr.close()
        if not tr.finished:
            raise UpstreamProtocolError("the stream ended without its final event")
        self.ended = True
        if self.job.pin_response and not self.released:  # its end came with close()
            await self._settle(tr, "ok")
        if tail:
            yield tail

    async def _terminal(self, tr: StreamTranslator) -> bytes:
        """The stream's last event, which its translator held back: sent once the answer's
        response id is pinned (its lease released now, and awaited)."""
        if self.job.pin_response and not self.released:
            await self._settle(tr, "ok")
        terminal: bytes = tr.terminal()  # type: ignore[attr-defined]
        return terminal

    async def _settle(self, tr: StreamTranslator, outcome: str) -> None:
        """Release now, pinning the response id the stream named, and wait for it."""
        self.released = True
        result = self._result(outcome, tr.usage, asyncio.get_running_loop().time())
        response_id = getattr(tr, "response_id", None)
        if response_id:
            await self.d.release_pinned(self.lease, self.d._pin_response(result, response_id))
        else:
            self.d.release_charged(self.lease, result, self.context)

    def _pace(self, tr: StreamTranslator, now: float) -> None:
        """An event came: the next must come within stream_idle_s (and by the stream's end).

        Counted in events, not bytes: a provider dripping bytes that never finish an event
        is as idle as a silent one."""
        self.events = tr.events
        next_by = now + self.provider.timeouts.stream_idle_s
        if next_by < self.end:
            self.resp.set_deadline(next_by, STREAM_IDLE)
        else:
            self.resp.set_deadline(self.end, STREAM_TOTAL)

    def _mark(self, tr: StreamTranslator, now: float) -> None:
        if self.ttft_ms < 0 and tr.content_chunks > 0:
            self.ttft_ms = (now - self.started) * 1000
            route = self.job.plan.route.model
            self.d.metrics.first_token(route, self.provider.name, self.ttft_ms / 1000)

    def _release(self, outcome: str, usage: Usage | None, now: float) -> None:
        self.d.release_charged(self.lease, self._result(outcome, usage, now), self.context)

    def _result(self, outcome: str, usage: Usage | None, now: float) -> Outcome:
        """What the stream's release records: how it ended, its usage, its latencies."""
        duration_ms = (now - self.started) * 1000
        out = usage.completion_tokens if usage else 0
        tpot = (duration_ms - max(self.ttft_ms, 0)) / (out - 1) if out > 1 else -1
        info = self.adapter.rate_limits(self.resp.headers)
        result = _outcome(self.lease, self.provider, info, usage, self.ttft_ms, tpot)
        if outcome != "ok":
            result = Outcome(outcome, result.token_correction, -1, -1)
        return _charged(result, self.job, self.index, self.lease, usage)


def _outcome(
    lease: Lease,
    provider: Provider,
    info: RateLimitInfo,
    usage: Usage | None,
    ttft_ms: float,
    tpot_ms: float,
) -> Outcome:
    """A successful attempt's outcome: token correction, latencies, the provider's own view."""
    correction = 0
    if usage is not None and provider.limits.tpm_accounting is TpmAccounting.ACTUAL:
        correction = usage.total_tokens - lease.tokens
    lim = provider.limits
    return Outcome(
        "ok",
        token_correction=correction,
        ttft_ms=ttft_ms,
        tpot_ms=tpot_ms,
        provider_requests=_used(lim.rpm, info.remaining_requests),
        provider_tokens=_used(lim.tpm, info.remaining_tokens),
    )


def _used(limit: int | None, remaining: int | None) -> int:
    return limit - remaining if limit and remaining is not None else -1


def _failed(exc: UpstreamError, lease: Lease) -> Outcome:
    cooldown = int(exc.cooldown_s * 1000) if isinstance(exc, UpstreamRateLimited) else 0
    return _refund(Outcome(exc.outcome, cooldown_ms=cooldown), lease)


def _refund(outcome: Outcome, lease: Lease) -> Outcome:
    """``outcome`` of an attempt the provider did not serve: the tenant gets back the tokens
    and the cost reserved for it (its RPM keeps the request: it was made)."""
    return replace(
        outcome, tenant_token_correction=-lease.tenant_tokens, spend_correction=-lease.cost_nano
    )


def _charged(outcome: Outcome, job: _Job, index: int, lease: Lease, usage: Usage | None) -> Outcome:
    """``outcome`` of a served attempt with the tenant's charge: the provider's reported usage
    at the target's price, or with no usage reported, the reservation on this target (the
    prompt's estimate and the whole completion budget)."""
    if not lease.tenant:
        return outcome
    price: Price | None = job.plan.route.targets[index].price
    if usage is not None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
    else:
        prompt, completion = job.prompt, job.budgets[index]
    cost = cost_nano(prompt, completion, price)
    return replace(
        outcome,
        tenant_token_correction=prompt + completion - lease.tenant_tokens,
        spend_correction=cost - lease.cost_nano,
        served=True,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano=cost,
    )


def _gave_up(attempts: list[Attempt], retry_after_s: float = 0.0) -> AllAttemptsFailed:
    outcomes = {a.outcome for a in attempts}
    if outcomes == {"http_429"}:
        return AllAttemptsFailed(attempts, 429, retry_after_s or DEFAULT_COOLDOWN_S)
    if outcomes == {"timeout"}:
        return AllAttemptsFailed(attempts, 504)
    return AllAttemptsFailed(attempts, 502)


def _holds_terminal(tr: StreamTranslator) -> bool:
    """The translator holds the stream's last event back until it is asked for it (the
    Responses API's, sent once the response's id is pinned)."""
    return bool(getattr(tr, "terminal_pending", False))
