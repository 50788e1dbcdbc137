"""``GET`` and ``DELETE /v1/responses/{id}``: a stored Responses API answer lives on the
provider that made it, so the request goes there, found by the id's pin in Redis (written
when the answer was served, from any replica); and ``POST /v1/messages/count_tokens``.

An id without a pin, or pinned for another tenant, is a 404 like an id nobody made. The
provider's answer (its 200 or its 4xx) is passed on as it came; a DELETE that it confirmed
drops the pin. Not here: ``GET ...?stream=true`` (resuming a background response's stream)
and the input-items listing (``GET /v1/responses/{id}/input_items``).
"""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
from fastapi import FastAPI, Request, Response

from router.api.auth import ClientKeys, api_key, authorization
from router.api.endpoints import model_not_found
from router.api.schemas import parse_json
from router.errors import (
    PinnedUnavailable,
    ResponseNotFound,
    RouterError,
    UpstreamStatusError,
    error_response,
)
from router.replica.gateway import Gateway
from router.upstream.providers import responses
from router.upstream.providers.messages import anthropic_error, check_count_tokens, count_tokens

JSON = "application/json"
STORED_TIMEOUT_S = 60.0
"""The most a GET or DELETE of a stored response may take, the provider's answer included."""
MAX_QUERY = 1024
"""A longer query string is not passed on (``include[]`` and the like are short)."""


def add_stored_response_routes(app: FastAPI, gw: Gateway, keys: ClientKeys) -> None:
    """Mount the stored-response endpoints and ``count_tokens`` on ``app``."""

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        return await _forward(gw, keys, request, response_id, "GET")

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> Response:
        return await _forward(gw, keys, request, response_id, "DELETE")

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request) -> Response:
        try:
            header = authorization(request.headers.raw)
            if not header:
                key = api_key(request.headers.raw)
                header = f"Bearer {key}" if key else ""
            tenant = keys.tenant(header)
            data = parse_json(await request.body())
            model = check_count_tokens(data)
            route = gw.cfg.route(model)
            if route is None or not tenant.allows(route.model):
                raise model_not_found(model, tenant)
            body = {"input_tokens": count_tokens(data)}
        except RouterError as exc:  # in Anthropic's shape on its API
            status, headers, _ = error_response(exc)
            return Response(anthropic_error(status, str(exc)), status, headers, JSON)
        return Response(orjson.dumps(body), 200, media_type=JSON)


async def _forward(
    gw: Gateway, keys: ClientKeys, request: Request, response_id: str, method: str
) -> Response:
    tenant = keys.tenant(authorization(request.headers.raw))
    if not responses.response_id_ok(response_id):
        raise ResponseNotFound(f"No response found with id '{response_id[:128]}'.")
    pin = await gw.store.response_pin(response_id)
    if pin is None or pin[1] != tenant.name:
        raise ResponseNotFound(f"No response found with id '{response_id}'.")
    provider = gw.cfg.provider(pin[0])
    health = gw.view.snapshot.providers.get(provider.name)
    if health is not None and (health.health == "down" or health.drained):
        raise PinnedUnavailable(
            f"the provider holding response '{response_id}' ({provider.name}) is out of service"
        )
    if method == "GET":
        req = responses.get_request(provider, response_id)
    else:
        req = responses.delete_request(provider, response_id)
    query = request.url.query
    if query and len(query) <= MAX_QUERY:
        req = dataclasses.replace(req, url=f"{req.url}?{query}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORED_TIMEOUT_S
    resp = await gw.upstream.send(req, provider.timeouts, deadline, provider.bounds, provider)
    try:
        payload = await resp.read(deadline)
    finally:
        resp.close()
    if resp.status >= 500:
        raise UpstreamStatusError(f"{resp.status} from {provider.name}", resp.status)
    if method == "DELETE" and resp.status == 200:
        await gw.store.drop_response_pin(response_id)
    return Response(payload, resp.status, {"x-router-provider": provider.name}, JSON)
