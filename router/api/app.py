"""The HTTP API of one replica: the hot OpenAI endpoints (``router.api.endpoints``) in front of
FastAPI, which serves the rest (models, health, readiness, metrics, admin, and with
``api_docs`` its own ``/docs``, ``/redoc`` and ``/openapi.json``).

Errors of every kind reach one exception handler per path that answers in OpenAI's shape;
so do an unknown path (404) and a wrong method (405).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from router import __version__
from router.api.access import RequestLog, set_outcome
from router.api.admin import admin_router
from router.api.auth import ClientKeys, authorization
from router.api.endpoints import PATHS, HotPath, model_not_found
from router.api.schemas import ChatBody, EmbeddingsBody
from router.api.stored_responses import add_stored_response_routes
from router.api.tenants_admin import tenants_router
from router.config import Config
from router.errors import (
    INTERNAL_ERROR,
    RouterError,
    StoreError,
    error_response,
)
from router.replica.gateway import Gateway
from router.state.store import Store
from router.telemetry.tracing import PROMETHEUS_CONTENT_TYPE

log = logging.getLogger("router.app")
JSON = "application/json"
OWNER = "router-cluster"
"""The ``owned_by`` of every model a replica lists."""


class Lifespan:
    """Starts the gateway before the server listens and stops it after; when it cannot
    start (Redis away, see ``Gateway.start``) tells the server so with a logged reason, not
    a traceback, and the server exits (``router.cli`` then says why, exit status 1)."""

    def __init__(self, app: ASGIApp, gw: Gateway) -> None:
        self.app = app
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        try:
            await self.gw.start()
        except StoreError as exc:
            log.error("cannot start", extra={"fields": {"error": str(exc)}})
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.gw.stop()
        await send({"type": "lifespan.shutdown.complete"})


def request_id(request: Request) -> str:
    """The id ``RequestLog`` gave this request."""
    return str(request.state.rid)


def create_app(cfg: Config, store: Store | None = None) -> HotPath:
    """The ASGI application of one replica: the hot endpoints, then FastAPI for the rest."""
    gw = Gateway(cfg, store)
    keys = ClientKeys(gw.tenants)
    docs = cfg.api_docs
    app = FastAPI(
        title="router-cluster",
        version=__version__,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.gateway = gw
    _add_error_handlers(app)
    app.include_router(admin_router(gw, keys))
    app.include_router(tenants_router(gw, keys))
    _add_openai_routes(app, gw, keys)
    add_stored_response_routes(app, gw, keys)
    _add_health_routes(app, gw)
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return HotPath(Lifespan(RequestLog(app), gw), gw, keys)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def on_error(request: Request, exc: RouterError) -> Response:
        set_outcome(request.scope, exc.code)
        status, headers, body = error_response(exc)
        return Response(body, status, headers, JSON)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        code, message = _http_error(request, exc)
        set_outcome(request.scope, code)
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": None,
            }
        }
        return Response(orjson.dumps(body), exc.status_code, exc.headers, JSON)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        # The one catch-all: a bug must still answer in OpenAI's shape, and be logged.
        log.exception("unhandled error", extra={"fields": {"rid": request_id(request)}})
        return Response(orjson.dumps(INTERNAL_ERROR), 500, media_type=JSON)


def _http_error(request: Request, exc: HTTPException) -> tuple[str, str]:
    """The code and message of an error Starlette raised: no route for the path (404), or
    not for the method (405), as OpenAI words them; any other keeps Starlette's words."""
    # (cut short: a path may be as long as the request head)
    method, path = request.method, request.url.path[:200]
    if exc.status_code == 404:
        return "unknown_url", f"Invalid URL ({method} {path})"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return "method_not_allowed", f"{method} is not allowed on {path} (only {allowed})"
    return f"http_{exc.status_code}", str(exc.detail)


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
        schema["paths"][path] = {
            "post": {
                "summary": f"OpenAI-compatible {path.rsplit('/', 1)[-1]}",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
                "responses": {
                    "200": {"description": "the provider's answer, OpenAI-shaped"},
                    "default": {"description": "an OpenAI-shaped error"},
                },
            }
        }
    components_security = schema["components"].setdefault("securitySchemes", {})
    components_security["bearer"] = {"type": "http", "scheme": "bearer"}
    app.openapi_schema = schema
    return schema


def _model(name: str, gw: Gateway) -> dict[str, Any]:
    """A route as OpenAI describes a model; ``created`` is when this replica loaded its config
    (a route has no other date: replicas loaded at other times tell other dates)."""
    return {"id": name, "object": "model", "created": gw.loaded_at, "owned_by": OWNER}


def _add_openai_routes(app: FastAPI, gw: Gateway, keys: ClientKeys) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        tenant = keys.tenant(authorization(request.headers.raw))
        data = [_model(r.model, gw) for r in gw.cfg.routes if tenant.allows(r.model)]
        body = orjson.dumps({"object": "list", "data": data})
        return Response(body, 200, media_type=JSON)

    @app.get("/v1/models/{model:path}")  # (a model's name may hold a "/": org/model)
    async def model(request: Request, model: str) -> Response:
        tenant = keys.tenant(authorization(request.headers.raw))
        if gw.cfg.route(model) is None or not tenant.allows(model):
            raise model_not_found(model, tenant)
        return Response(orjson.dumps(_model(model, gw)), 200, media_type=JSON)

    async def hot_path_only() -> Response:
        raise RuntimeError("POST on this path is served by router.api.endpoints.HotPath")

    # The hot path serves POST on these paths before FastAPI sees it; routed here too, another
    # method is a 405 that names POST (else a 404, as if the path did not exist).
    for path in PATHS:
        app.add_api_route(path, hot_path_only, methods=["POST"], include_in_schema=False)


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
