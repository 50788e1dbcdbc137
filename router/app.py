"""The HTTP API of one replica: OpenAI's endpoints, health and readiness.

Handlers read the body themselves (orjson) instead of through FastAPI's models: the body
is forwarded as it came, and this path runs for every request. Errors of every kind reach
one exception handler that answers in OpenAI's shape.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import __version__
from router.admin import admin_router
from router.config import Config
from router.dispatch import Operation, Reply
from router.errors import (
    ClientGone,
    ModelNotFound,
    PayloadTooLarge,
    RouterError,
    StoreError,
    to_openai_error,
)
from router.gateway import Gateway
from router.schemas import ChatBody, EmbeddingsBody, check, parse_json
from router.store import Store
from router.telemetry import PROMETHEUS_CONTENT_TYPE

log = logging.getLogger("router.app")
JSON = "application/json"


class _Stream(StreamingResponse):
    """A relayed stream whose lease is released however the response ends."""

    def __init__(
        self,
        stream: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]] | None,
        headers: dict[str, str],
    ) -> None:
        super().__init__(stream, media_type="text/event-stream", headers=headers)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._close is not None:
                await self._close()


def _request_id(raw: bytes) -> str:
    """The client's ``x-request-id`` when sane, or a new one."""
    if 0 < len(raw) <= 128 and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode()
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every request an id (the client's, or a new one) and every response the header.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs far more per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = _request_id(raw)
        scope.setdefault("state", {})["rid"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    """The id ``RequestIdMiddleware`` gave this request."""
    return str(request.state.rid)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # the client left while sending: nobody to answer, nothing worth an error log
        raise ClientGone("the client closed the connection while sending its body") from None
    return b"".join(chunks)


def create_app(cfg: Config, store: Store | None = None) -> FastAPI:
    """The FastAPI application of one replica."""
    gw = Gateway(cfg, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="router-cluster", version=__version__, lifespan=lifespan)
    app.state.gateway = gw
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(RouterError)
    async def on_error(request: Request, exc: RouterError) -> Response:
        headers = exc.headers()
        attempts = getattr(exc, "attempts", None)
        if attempts is not None:
            headers["x-router-attempts"] = str(len(attempts))
        return Response(orjson.dumps(to_openai_error(exc)), exc.status, headers, JSON)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "code": f"http_{exc.status_code}", "param": None}}  # fmt: skip
        return Response(orjson.dumps(body), exc.status_code, exc.headers, JSON)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        # The one catch-all: a bug must still answer in OpenAI's shape, and be logged.
        log.exception("unhandled error", extra={"fields": {"rid": request_id(request)}})
        body = {"error": {"message": "internal error", "type": "server_error",
                          "code": "internal_error", "param": None}}  # fmt: skip
        return Response(orjson.dumps(body), 500, media_type=JSON)

    app.include_router(admin_router(gw))
    _add_openai_routes(app, gw)
    _add_health_routes(app, gw)
    return app


async def _served(request: Request, gw: Gateway, op: Operation) -> Response:
    """One OpenAI request: its span, its metrics, and the reply (whole or streamed)."""
    started = time.perf_counter()
    span, ctx = gw.telemetry.start_request(
        f"POST {request.url.path}", request.headers, **{"router.request_id": request_id(request)}
    )
    labels = ["unknown", "none"]  # route, provider: known once they are
    try:
        with gw.telemetry.attached(ctx):
            reply = await _dispatch(request, gw, op, labels)
    except RouterError as exc:
        outcome = "saturated" if exc.status == 429 else "client_error"
        outcome = "failed" if exc.status >= 500 else outcome
        gw.metrics.request(labels[0], labels[1], exc.status, outcome, _since(started))
        gw.telemetry.end_request(span, exc.status)
        raise
    labels[1] = reply.provider
    headers = {"x-router-provider": reply.provider, "x-router-attempts": str(reply.attempts)}
    if reply.stream is None:
        gw.metrics.request(labels[0], labels[1], 200, "ok", _since(started))
        gw.telemetry.end_request(span, 200)
        return Response(reply.body, 200, headers, JSON)

    async def finish() -> None:
        if reply.close is not None:
            await reply.close()
        ended = reply.outcome() if reply.outcome is not None else "ok"
        # the status (200) went out with the first byte; the outcome says how it ended
        outcome = {"ok": "ok", "client_cancelled": "cancelled"}.get(ended, "failed")
        gw.metrics.request(labels[0], labels[1], 200, outcome, _since(started))
        gw.telemetry.end_request(span, 200)

    headers["cache-control"] = "no-cache"
    return _Stream(reply.stream, finish, headers)


def _since(started: float) -> float:
    return time.perf_counter() - started


async def _dispatch(request: Request, gw: Gateway, op: Operation, labels: list[str]) -> Reply:
    gw.authorize(request)
    data = parse_json(await read_body(request, gw.cfg.max_body_bytes))
    if op is Operation.CHAT:
        model = check(ChatBody, data).model
    else:
        model = check(EmbeddingsBody, data).model
    route = gw.cfg.route(model)
    if route is None:
        raise ModelNotFound(f"the model '{model}' does not exist (see GET /v1/models)")
    labels[0] = route.model
    traceparent = request.headers.get("traceparent")
    return await gw.dispatcher.serve(op, route, data, request_id(request), traceparent)


def _add_openai_routes(app: FastAPI, gw: Gateway) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _served(request, gw, Operation.CHAT)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await _served(request, gw, Operation.EMBEDDINGS)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gw.authorize(request)
        data = [
            {"id": r.model, "object": "model", "created": 0, "owned_by": "router-cluster"}
            for r in gw.cfg.routes
        ]
        body = orjson.dumps({"object": "list", "data": data})
        return Response(body, 200, media_type=JSON)


def _add_health_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "replica": gw.replica, "version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.telemetry.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/readyz")
    async def readyz() -> Response:
        # degraded is still ready (200): the replica serves from local state, so a front
        # load balancer must keep it in rotation
        if not gw.mode.degraded:
            try:
                await gw.store.ping()
            except StoreError as exc:
                gw.mode.enter(exc)
        body: dict[str, Any] = {
            "status": "degraded" if gw.mode.degraded else "ready",
            "store": "embedded" if gw.store.embedded else "redis",
            "replica": gw.replica,
            "replicas_seen": gw.local.replicas,
            "health_version": gw.view.version,
            "degraded_episodes": gw.mode.episodes,
            "degraded_s": round(gw.mode.seconds(), 3),
        }
        if gw.mode.degraded:
            body["reason"] = gw.mode.reason
        body["providers"] = {
            name: {"health": h.health or "unknown", "drained": h.drained, "circuit": h.circuit}
            for name, h in gw.view.snapshot.providers.items()
        }
        return Response(orjson.dumps(body), 200, media_type=JSON)
