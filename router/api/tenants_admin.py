"""The admin API's tenants and keys, behind the admin token (``router.api.admin.AdminGuard``).

    GET    /admin/tenants                     every tenant, its keys' ids, its figures now
    GET    /admin/tenants/{name}              one of them
    POST   /admin/tenants                     create one (body: a tenant spec)       201
    PUT    /admin/tenants/{name}              replace the spec of one the API created
    DELETE /admin/tenants/{name}              remove one the API created, and its keys
    POST   /admin/tenants/{name}/keys         issue a key: the one answer holding it 201
    DELETE /admin/tenants/{name}/keys/{id}    revoke an issued key

A tenant named in the config, and ``default``, is config-owned: 403 ``config_owned`` to any
change of its spec (keys are not the spec: it may be issued keys). Bodies are JSON, at most
``MAX_BODY_BYTES``, validated as ``TenantSpec``; a problem is a 400 naming the field. Every
change is one script on Redis that also tells every replica (``router.state.tenants``); the
replica that made it re-reads at once, so its next request already sees it.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from router.api.admin import AdminGuard, shared
from router.api.auth import ClientKeys
from router.api.schemas import parse_json
from router.config import TenantSpec, field_path
from router.errors import BadRequest, PayloadTooLarge, StoreError, TenantNotFound
from router.replica.gateway import Gateway
from router.replica.tenants import TenantDirectory, TenantEntry
from router.state.tenants import IssuedKey, TenantStore
from router.state.tenantstate import TenantState, read_tenants

JSON = "application/json"
MAX_BODY_BYTES = 64 * 1024
"""The largest body the tenants' admin API reads (a spec with hundreds of routes fits)."""


async def read_body(request: Request) -> bytes:
    """The body, refusing more than ``MAX_BODY_BYTES`` before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is over the limit of {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_spec(data: dict[str, Any], routes: set[str]) -> TenantSpec:
    """``data`` as a tenant spec whose allow-list names only ``routes``, or a 400."""
    try:
        spec = TenantSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = field_path(tuple(p for p in err["loc"] if p not in ("int", "float")))
        raise BadRequest(f"invalid value for '{param}': {err['msg']}", param=param) from None
    for i, model in enumerate(spec.routes or ()):
        if model not in routes:
            raise BadRequest(f"no route serves model '{model[:200]}'", param=f"routes[{i}]")
    return spec


def _key(k: IssuedKey) -> dict[str, Any]:
    return {"id": k.id, "created": k.created_ms // 1000}


def _spec(gw: Gateway, directory: TenantDirectory, name: str) -> TenantSpec:
    spec = gw.cfg.tenant(name) or directory.snapshot.specs.get(name)
    return spec or TenantSpec(name=name)  # ``default`` without a tenants entry


def tenant_json(gw: Gateway, directory: TenantDirectory, entry: TenantEntry) -> dict[str, Any]:
    """A tenant as the admin API shows it: never a key, nor a key's hash."""
    spec = _spec(gw, directory, entry.plan.name)
    return {
        "name": spec.name,
        "owner": entry.plan.owner,
        "limits": spec.limits.model_dump(mode="json"),
        "budget": spec.budget.model_dump(mode="json") if spec.budget else None,
        "routes": spec.routes,
        "keys": [_key(k) for k in entry.issued],
        "config_keys": entry.config_keys,
    }


def _usage(state: TenantState) -> dict[str, Any]:
    """Its use now: requests and tokens in the window, in flight, spend this budget period."""
    return {
        "rpm": state.rpm_used,
        "tpm": state.tpm_used,
        "in_flight": state.in_flight,
        "spend_usd": state.spend_usd,
        "spend_nano": state.spend_nano,
        "period": state.period_label,
    }


def _answer(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type=JSON)


class TenantsAdmin:
    """The endpoints above, on a gateway's shared store."""

    def __init__(self, gw: Gateway, keys: ClientKeys) -> None:
        self.gw = gw
        self.guard = AdminGuard(gw.cfg, keys)
        self.store = TenantStore(gw.store)
        self.routes = {r.model for r in gw.cfg.routes}

    @property
    def config_names(self) -> frozenset[str]:
        return self.gw.tenants.directory.config_names

    async def _read(self) -> TenantDirectory:
        """The directory as Redis holds it now (fresher than the view's, by a moment)."""
        return self.gw.tenants.directory.with_snapshot(await self.store.read())

    async def _changed(self) -> None:
        """Re-read at once, so this replica's next request sees the change. A failure is
        not the change's (it is made): the view catches up when Redis answers again."""
        try:
            await self.gw.tenants.resync()
        except StoreError as exc:
            self.gw.mode.enter(exc)

    async def _body(self, request: Request) -> dict[str, Any]:
        self.guard.check(request)
        return parse_json(await read_body(request))

    async def list_tenants(self, request: Request) -> Response:
        self.guard.check(request)
        directory = await shared(self.gw, self._read)
        entries = directory.entries()
        plans = [e.plan for e in entries]
        states = await shared(self.gw, lambda: read_tenants(self.gw.store, plans))
        out = [
            {**tenant_json(self.gw, directory, e), "usage": _usage(state)}
            for e, state in zip(entries, states, strict=True)
        ]
        return _answer({"version": directory.version, "tenants": out})

    async def one(self, request: Request, name: str) -> Response:
        self.guard.check(request)
        directory = await shared(self.gw, self._read)
        entry = next((e for e in directory.entries() if e.plan.name == name), None)
        if entry is None:
            raise TenantNotFound(f"no tenant named '{name[:64]}'")
        [state] = await shared(self.gw, lambda: read_tenants(self.gw.store, [entry.plan]))
        return _answer({**tenant_json(self.gw, directory, entry), "usage": _usage(state)})

    async def create(self, request: Request) -> Response:
        spec = parse_spec(await self._body(request), self.routes)
        most = self.gw.cfg.max_tenants
        version = await shared(self.gw, lambda: self.store.create(spec, self.config_names, most))
        await self._changed()
        return _answer({**spec.model_dump(mode="json"), "owner": "api", "version": version}, 201)

    async def update(self, request: Request, name: str) -> Response:
        data = await self._body(request)
        if data.setdefault("name", name) != name:
            raise BadRequest("the body's name differs from the path's", param="name")
        spec = parse_spec(data, self.routes)
        version = await shared(self.gw, lambda: self.store.update(spec, self.config_names))
        await self._changed()
        return _answer({**spec.model_dump(mode="json"), "owner": "api", "version": version})

    async def delete(self, request: Request, name: str) -> Response:
        self.guard.check(request)
        version, revoked = await shared(self.gw, lambda: self.store.delete(name, self.config_names))
        await self._changed()
        return _answer({"name": name, "deleted": True, "keys_revoked": revoked, "version": version})

    async def issue(self, request: Request, name: str) -> Response:
        self.guard.check(request)
        known, most = self.config_names, self.gw.cfg.max_tenant_keys
        issued, key = await shared(self.gw, lambda: self.store.issue_key(name, known, most))
        await self._changed()
        return _answer({"tenant": name, **_key(issued), "key": key}, 201)

    async def revoke(self, request: Request, name: str, key_id: str) -> Response:
        self.guard.check(request)
        version = await shared(self.gw, lambda: self.store.revoke_key(name, key_id))
        await self._changed()
        return _answer({"tenant": name, "id": key_id, "revoked": True, "version": version})


def tenants_router(gw: Gateway, keys: ClientKeys) -> APIRouter:
    """``/admin/tenants`` and its keys (see the module's docstring)."""
    api = TenantsAdmin(gw, keys)
    router = APIRouter(prefix="/admin/tenants")
    router.add_api_route("", api.list_tenants, methods=["GET"])
    router.add_api_route("", api.create, methods=["POST"])
    router.add_api_route("/{name}", api.one, methods=["GET"])
    router.add_api_route("/{name}", api.update, methods=["PUT"])
    router.add_api_route("/{name}", api.delete, methods=["DELETE"])
    router.add_api_route("/{name}/keys", api.issue, methods=["POST"])
    router.add_api_route("/{name}/keys/{key_id}", api.revoke, methods=["DELETE"])
    return router
