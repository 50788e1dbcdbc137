"""The two hot endpoints, ``POST /v1/chat/completions`` and ``POST /v1/embeddings``, as a
plain ASGI application in front of FastAPI.

Every request a gateway serves goes through here, so it skips FastAPI's and Starlette's
middleware, routing and dependency layers (they measured about a quarter of a replica's
CPU under load); everything else (models, health, metrics, admin) stays in FastAPI. The
body is read, checked and forwarded as it came; a stream is relayed chunk by chunk, and a
client that goes away cancels the relay, which releases its lease. Each request ends with
its access line (``router.telemetry.logs.log_access``; a stream's when it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from router.api.auth import ClientKeys, api_key, authorization
from router.api.schemas import ChatBody, EmbeddingsBody, check, parse_json
from router.config import PRIORITY_MAX, PRIORITY_MIN
from router.errors import (
    INTERNAL_ERROR,
    BadRequest,
    ClientGone,
    ModelNotFound,
    PayloadTooLarge,
    RequestTimeout,
    RouterError,
    error_response,
)
from router.replica import affinity_keys
from router.replica.dispatch import Operation, Reply
from router.replica.gateway import Gateway
from router.state.store import TenantPlan
from router.telemetry.logs import access_logged, log_access
from router.telemetry.tracing import client_traceparent
from router.upstream.codecs import Inbound
from router.upstream.providers.messages import anthropic_error, check_messages
from router.upstream.providers.responses import check_responses

log = logging.getLogger("router.endpoints")

PATHS = {
    "/v1/chat/completions": Operation.CHAT,
    "/v1/embeddings": Operation.EMBEDDINGS,
    "/v1/messages": Operation.MESSAGES,
    "/v1/responses": Operation.RESPONSES,
}
FORWARDED = {Operation.MESSAGES: (b"anthropic-version", b"anthropic-beta")}
"""The client's headers each API passes on to the codecs (which check and forward them)."""
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_INTERNAL_BODY = orjson.dumps(INTERNAL_ERROR)
_OUTCOMES = {"ok": "ok", "client_cancelled": "cancelled"}
"""The metrics' outcome of a stream's ending; any other ending (a provider's failure after the
first byte) is ``failed``, and an error answer's is told by its status."""
_BUG = INTERNAL_ERROR["error"]["code"]


def request_id(raw: bytes) -> str:
    """The client's ``x-request-id`` when sane (printable, at most 128 bytes), or a new one."""
    if 0 < len(raw) <= 128 and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode()
    return uuid.uuid4().hex


async def read_body(
    headers: dict[bytes, bytes], receive: Receive, limit: int, within: float
) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them all, or one that has
    not all come ``within`` seconds (a client trickling it in would hold a slot forever)."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    try:
        async with asyncio.timeout(within):
            return await _read_all(receive, limit)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {within:g} s") from None


async def _read_all(receive: Receive, limit: int) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            # the client left while sending: nobody to answer, nothing worth an error log
            raise ClientGone("the client closed the connection while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def model_not_found(model: str, tenant: TenantPlan) -> ModelNotFound:
    """No route serves ``model``, or ``tenant`` may not use it: a tenant with an allow-list
    is told the same in both cases, so it cannot learn which routes exist."""
    name = model[:200]  # (cut short: the name is the client's, up to max_body_bytes long)
    if tenant.routes is None:
        return ModelNotFound(f"the model '{name}' does not exist (see GET /v1/models)")
    return ModelNotFound(f"The model '{name}' does not exist or you do not have access to it")


class HotPath:
    """Serves the OpenAI request endpoints itself; hands everything else to ``app``."""

    def __init__(self, app: ASGIApp, gw: Gateway, keys: ClientKeys) -> None:
        self.app = app
        self.gw = gw
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        op = PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if op is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        await _Exchange(self.gw, self.keys, op, scope, receive, send).run()


class _Exchange:
    """One request on the hot path: its span, its metrics, its answer."""

    def __init__(
        self,
        gw: Gateway,
        keys: ClientKeys,
        op: Operation,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self.gw, self.keys, self.op = gw, keys, op
        self.scope, self.receive, self.send = scope, receive, send
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.rid = request_id(self.headers.get(b"x-request-id", b""))
        traceparent = self.headers.get(b"traceparent")
        self.traceparent = client_traceparent(traceparent) if traceparent else None
        self.started = time.perf_counter()
        self.route: str | None = None
        self.provider: str | None = None
        self.attempts: int | None = None
        self.tenant: TenantPlan | None = None
        """Whose request it is, once its key is checked."""
        self.sent = 0
        """Body bytes sent to the client."""
        self.responded = False

    async def run(self) -> None:
        carrier = {"traceparent": self.traceparent or ""}
        span, ctx = self.gw.telemetry.start_request(
            f"POST {self.scope['path']}", carrier, **{"router.request_id": self.rid}
        )
        status = 200
        try:
            with self.gw.telemetry.attached(ctx):
                reply = await self._dispatch()
            self.provider, self.attempts = reply.provider, reply.attempts
            ended = await self._answer(reply)
        except RouterError as exc:
            status, ended = exc.status, exc.code
            await self._error(exc)
        except Exception:  # the hot path's one catch-all: a bug still answers, and is logged
            log.exception("unhandled error", extra={"fields": {"request_id": self.rid}})
            status, ended = 500, _BUG
            if not self.responded:
                await self._start(500, [_JSON])
                bug = _INTERNAL_BODY
                if self.op is Operation.MESSAGES:
                    bug = anthropic_error(500, "internal error")
                await self._body(bug)
        elapsed = time.perf_counter() - self.started
        outcome = _OUTCOMES.get(ended, "failed") if status == 200 else _error_outcome(status)
        self.gw.metrics.request(
            self.route or "unknown", self.provider or "none", status, outcome, elapsed
        )
        if self.tenant is not None:
            ended_as = "ok" if status == 200 else "failed" if self.attempts else "refused"
            self.gw.metrics.tenant_request(self.tenant.name, self.route or "unknown", ended_as)
        self.gw.telemetry.end_request(span, status)
        if access_logged():
            log_access(
                "POST",
                self.scope["path"],
                status,
                self.route,
                self.provider,
                self.attempts,
                elapsed,
                self.rid,
                ended,
                self.sent,
                tenant=self.tenant.name if self.tenant is not None else None,
            )

    async def _dispatch(self) -> Reply:
        raw = self.scope["headers"]
        if len(raw) != len(self.headers):  # some field repeats (rare): the key must not
            authorization(raw)
            if self.op is Operation.MESSAGES:
                api_key(raw)
        tenant = self.keys.tenant(self._authorization())
        self.tenant = tenant
        cfg = self.gw.cfg
        body = await read_body(self.headers, self.receive, cfg.max_body_bytes, cfg.read_timeout_s)
        data = parse_json(body)
        model, previous, same_kind = self._check(data)
        route = self.gw.cfg.route(model)
        if route is None or not tenant.allows(route.model):
            if route is not None:  # a route the tenant may not use: its refusal, counted
                self.gw.metrics.tenant_rejected(tenant.name, "model_not_found")
            raise model_not_found(model, tenant)
        self.route = route.model
        forwarded = {}
        for name in FORWARDED.get(self.op, ()):  # a repeated one: its values, comma-joined
            values = [v.decode("latin-1") for n, v in raw if n == name]
            if values:
                forwarded[name.decode()] = ",".join(values)
        key = None
        if route.affinity is not None and self.op is not Operation.EMBEDDINGS:
            key = affinity_keys.affinity_value(route.affinity, self.op.value, self.headers, data)
        return await self.gw.dispatcher.serve(
            self.op,
            route,
            data,
            self.rid,
            self.traceparent,
            self.tenant,
            self._priority(),
            Inbound(model, forwarded, same_kind),
            affinity=key,
            client_left=self._client_left,
            previous_response=previous,
        )

    def _check(self, data: Any) -> tuple[str, str | None, bool]:
        """The body checked for its API: its model, the response it continues (Responses),
        and whether only targets of the API's own kind can serve it (Messages)."""
        if self.op is Operation.CHAT:
            return check(ChatBody, data).model, None, False
        if self.op is Operation.EMBEDDINGS:
            return check(EmbeddingsBody, data).model, None, False
        if self.op is Operation.MESSAGES:
            request = check_messages(data)
            return request.model, None, bool(request.server_tools)
        checked = check_responses(data)
        return checked.model, checked.previous_response_id, False

    def _authorization(self) -> str:
        """The request's ``Authorization`` header; on the Messages API, Anthropic's
        ``x-api-key`` stands for a bearer token when there is no Authorization."""
        header = self.headers.get(b"authorization", b"").decode("latin-1")
        if not header and self.op is Operation.MESSAGES:
            key = self.headers.get(b"x-api-key", b"").decode("latin-1")
            return f"Bearer {key}" if key else ""
        return header

    def _priority(self) -> int | None:
        """The request's ``x-priority`` (it can only lower its tenant's), if it sent one."""
        raw = self.headers.get(b"x-priority")
        if raw is None:
            return None
        try:
            value = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            value = PRIORITY_MAX + 1
        if not PRIORITY_MIN <= value <= PRIORITY_MAX:
            raise BadRequest(
                f"x-priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} "
                "(it can only lower the tenant's own priority)"
            )
        return value

    async def _client_left(self) -> None:
        """Returns when the client has closed its connection (its body is read by then)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        all_headers = [(b"x-request-id", self.rid.encode()), *headers]
        self.responded = True
        await self.send({"type": "http.response.start", "status": status, "headers": all_headers})

    async def _body(self, body: bytes, more: bool = False) -> None:
        self.sent += len(body)
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def _error(self, exc: RouterError) -> None:
        status, fields, body = error_response(exc)
        if self.op is Operation.MESSAGES:  # in Anthropic's shape on its API
            body = anthropic_error(status, str(exc))
        attempts = getattr(exc, "attempts", None)
        if attempts is not None:  # for the access line
            self.attempts = len(attempts)
            self.provider = attempts[-1].provider if attempts else None  # the last one tried
        self.provider = getattr(exc, "provider", self.provider)  # a provider's own 4xx
        headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in fields.items())]
        await self._start(status, headers)
        await self._body(body)

    async def _answer(self, reply: Reply) -> str:
        served = [
            (b"x-router-provider", reply.provider.encode()),
            (b"x-router-attempts", str(reply.attempts).encode()),
        ]
        if reply.stream is None:
            await self._start(200, [_JSON, *served])
            await self._body(reply.body or b"")
            return "ok"
        await self._start(200, [*_SSE, *served])
        return await self._relay(reply.stream, reply)

    async def _relay(self, stream: AsyncGenerator[bytes, None], reply: Reply) -> str:
        """Send the stream as it comes; a client that leaves cancels it (and so releases)."""
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        try:
            async for chunk in stream:
                self.sent += len(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None:  # after the first frame: it goes out before anything else
                    watcher = asyncio.create_task(_watch_disconnect(self.receive, gone, task))
            await self._body(b"")
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await stream.aclose()
            if reply.close is not None:
                await reply.close()
        # the status (200) went out with the first byte; the outcome says how it ended
        return reply.outcome() if reply.outcome is not None else "ok"


async def _watch_disconnect(receive: Receive, gone: asyncio.Event, task: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    if task is not None:
        task.cancel()


def _error_outcome(status: int) -> str:
    if status >= 500:
        return "failed"
    return "saturated" if status == 429 else "client_error"
