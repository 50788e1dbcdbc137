"""The admin API of a replica: the cluster state, usage, and drains, behind the admin token.

Only ``Authorization: Bearer <admin_token>`` passes, compared in constant time; a client key
(any tenant's, issued ones too) is recognised (403, not 401) so a misdirected call says what
is wrong. Without an ``admin_token`` in the config the admin API is off (403). Nothing here
shows a secret. The tenants and their keys are ``router.api.tenants_admin``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from router.api.auth import ClientKeys, KeyRing, authorization, bearer_token
from router.config import Config
from router.errors import Forbidden, ProviderNotFound, StoreError, Unauthorized
from router.replica.gateway import Gateway
from router.state.cluster import read_state, state_json
from router.state.health import HealthStore
from router.state.usage import read_usage, usage_json, usage_query

JSON = "application/json"
T = TypeVar("T")


class AdminGuard:
    """Checks the admin bearer token, telling a client key apart from a wrong token."""

    def __init__(self, cfg: Config, client_keys: ClientKeys) -> None:
        self._admin = KeyRing([cfg.admin_token]) if cfg.admin_token else None
        self._client_keys = client_keys

    def check(self, request: Request) -> None:
        """Raise ``Forbidden`` or ``Unauthorized`` unless the request carries the admin token."""
        if self._admin is None:
            raise Forbidden("the admin API is disabled: the config sets no admin_token")
        candidate = bearer_token(authorization(request.headers.raw))
        if not candidate:
            raise Unauthorized("missing admin token (send Authorization: Bearer <admin token>)")
        if self._admin.holds(candidate):
            return
        if self._client_keys.holds(candidate):
            raise Forbidden("a client key cannot use the admin API: send the admin token")
        raise Unauthorized("invalid admin token")


async def shared(gw: Gateway, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` on the shared store; a failure makes the replica degraded, as anywhere."""
    if gw.mode.degraded:
        raise StoreError(
            "the cluster state lives in Redis, which this replica cannot reach now "
            f"(degraded: {gw.mode.reason})"
        )
    try:
        return await call()
    except StoreError as exc:
        gw.mode.enter(exc)
        raise


def admin_router(gw: Gateway, keys: ClientKeys) -> APIRouter:
    """``GET /admin/state``, ``GET /admin/usage`` and
    ``POST /admin/providers/{name}/drain|enable``."""
    router = APIRouter(prefix="/admin")
    guard = AdminGuard(gw.cfg, keys)
    names = {p.name for p in gw.cfg.providers}

    @router.get("/state")
    async def state(request: Request) -> Response:
        guard.check(request)
        current = await shared(gw, lambda: read_state(gw.store, gw.cfg))
        return Response(orjson.dumps(state_json(current)), 200, media_type=JSON)

    @router.get("/usage")
    async def usage(
        request: Request, period: str = "day", at: str | None = None, tenant: str | None = None
    ) -> Response:
        """One day's or month's usage per tenant, route and provider (``at``: its label,
        ``YYYY-MM-DD`` or ``YYYY-MM``; the current one by default)."""
        guard.check(request)
        q = usage_query(period, at, tenant)
        report = await shared(gw, lambda: read_usage(gw.store, q.period, q.label, q.tenant))
        return Response(orjson.dumps(usage_json(report)), 200, media_type=JSON)

    async def set_drain(request: Request, name: str, drained: bool) -> Response:
        guard.check(request)
        if name not in names:
            raise ProviderNotFound(f"no provider named '{name[:100]}' in the config")
        version = await shared(gw, lambda: HealthStore(gw.store).set_drain(name, drained))
        body = {"provider": name, "drained": drained, "version": version}
        return Response(orjson.dumps(body), 200, media_type=JSON)

    @router.post("/providers/{name}/drain")
    async def drain(request: Request, name: str) -> Response:
        return await set_drain(request, name, True)

    @router.post("/providers/{name}/enable")
    async def enable(request: Request, name: str) -> Response:
        return await set_drain(request, name, False)

    return router
