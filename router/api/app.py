"""The HTTP API of one replica: the hot OpenAI endpoints (``router.api.endpoints``) in front of
FastAPI, which serves the rest (models, health, readiness, metrics, admin).

Errors of every kind reach one exception handler per path that answers in OpenAI's shape.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import __version__
from router.api.admin import admin_router
from router.api.auth import authorization
from router.api.endpoints import HotPath
from router.api.endpoints import request_id as request_id_of
from router.api.schemas import ChatBody, EmbeddingsBody
from router.config import Config
from router.errors import (
    INTERNAL_ERROR,
    RouterError,
    StoreError,
    to_openai_error,
)
from router.replica.gateway import Gateway
from router.state.store import Store
from router.telemetry.tracing import PROMETHEUS_CONTENT_TYPE

log = logging.getLogger("router.app")
JSON = "application/json"


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
        rid = request_id_of(raw)
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


def create_app(cfg: Config, store: Store | None = None) -> HotPath:
    """The ASGI application of one replica: the hot endpoints, then FastAPI for the rest."""
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
        return Response(orjson.dumps(INTERNAL_ERROR), 500, media_type=JSON)

    app.include_router(admin_router(gw))
    _add_openai_routes(app, gw)
    _add_health_routes(app, gw)
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return HotPath(app, gw)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the two endpoints the hot path serves outside FastAPI."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", ChatBody), ("/v1/embeddings", EmbeddingsBody)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        schema["paths"][path] = {"post": {
            "summary": f"OpenAI-compatible {path.rsplit('/', 1)[-1]}",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": {"200": {"description": "the provider's answer, OpenAI-shaped"},
                          "default": {"description": "an OpenAI-shaped error"}},
        }}  # fmt: skip
    components_security = schema["components"].setdefault("securitySchemes", {})
    components_security["bearer"] = {"type": "http", "scheme": "bearer"}
    app.openapi_schema = schema
    return schema


def _add_openai_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gw.authorize(authorization(request.headers.raw))
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
