"""The router's error tree, and the one place that knows each error's HTTP face.

    RouterError                      every error we raise on purpose
    ├── ConfigError                  a bad config file; carries (path, message) pairs
    ├── StoreError                   Redis failed or timed out (translated in store.py)
    ├── ClientError                  the client's fault: answered with a 4xx
    │   ├── BadRequest               400 malformed or invalid body
    │   │   └── PreviousResponseNotFound 400 previous_response_id is another tenant's
    │   ├── Unauthorized             401 missing or wrong bearer key
    │   ├── Forbidden                403 a valid key without the right to do this
    │   │   └── ConfigOwned          403 the config names this tenant: the admin API
    │   │                            cannot change it
    │   ├── ModelNotFound            404 no route serves this model
    │   ├── ProviderNotFound         404 the config names no such provider (admin API)
    │   ├── TenantNotFound           404 no such tenant (admin API)
    │   ├── KeyNotFound              404 the tenant has no issued key of that id (admin API)
    │   ├── ResponseNotFound         404 no pin for that Responses API id (for this tenant)
    │   ├── Conflict                 409 the change clashes with what exists: the tenant
    │   │                            exists, or max_tenants / max_tenant_keys is reached
    │   ├── PayloadTooLarge          413 body over the configured limit
    │   ├── HeadersTooLarge          431 request line and headers over the configured limits
    │   ├── RequestTimeout           408 the body did not arrive within read_timeout_s
    │   ├── ClientGone               499 the client left mid-request (answered to nobody)
    │   └── ProviderClientError      4xx answered by a provider, passed through
    ├── Saturated                    429 no target has room; carries retry_after_s
    ├── TenantLimited                429 the tenant is at one of its own limits (its code says
    │                                which: tenant_rpm_exceeded, tenant_tpm_exceeded,
    │                                tenant_in_flight_exceeded); retry_after_s
    ├── QuotaExceeded                429 insufficient_quota: the tenant's budget is spent until
    │                                its period ends (Retry-After: then)
    ├── Unavailable                  503 every target is out of service (down, drained,
    │   │                            circuit open); retry_after_s when a circuit's trial is due
    │   └── PinnedUnavailable        503 the one provider holding a continued response is out
    │                                of service
    ├── UpstreamError                one provider attempt failed (translated in upstream.py)
    │   ├── UpstreamConnectError     could not connect
    │   ├── UpstreamTimeout          connect or read timed out
    │   ├── UpstreamStatusError      5xx (or 429, see UpstreamRateLimited)
    │   │   └── UpstreamRateLimited  429, with the cooldown it asked for
    │   └── UpstreamProtocolError    the answer could not be understood
    └── AllAttemptsFailed            502/503/504 after failover gave up; names each attempt

Every error that reaches a client is rendered by ``to_openai_error`` as
``{"error": {"message", "type", "code"}}``. Messages never contain a secret: upstream
bodies are cut short and provider keys never enter an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson


class RouterError(Exception):
    """Base of every error the router raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers the error's response carries."""
        return {}


class ConfigError(RouterError):
    """The configuration file is invalid; ``problems`` holds ``(field_path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {msg}" if path else msg for path, msg in problems))


class StoreError(RouterError):
    """The shared store (Redis) failed or did not answer in time."""

    status = 503
    code = "shared_state_unavailable"


class ClientError(RouterError):
    """The request is wrong; answered with a 4xx and never retried."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadRequest(ClientError):
    """The body is malformed or fails validation."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ConfigOwned(Forbidden):
    """The tenant is named in the config (or is ``default``): only the file changes it."""

    code = "config_owned"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"


class ProviderNotFound(ClientError):
    status = 404
    code = "provider_not_found"


class TenantNotFound(ClientError):
    status = 404
    code = "tenant_not_found"


class KeyNotFound(ClientError):
    status = 404
    code = "key_not_found"


class ResponseNotFound(ClientError):
    """A Responses API id this gateway has no pin for (never made here, expired, deleted, or
    another tenant's: told the same, so a tenant cannot learn of another's responses)."""

    status = 404
    code = "response_not_found"


class PreviousResponseNotFound(BadRequest):
    """``previous_response_id`` names another tenant's response: answered as the provider
    answers an id it does not have."""

    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(
            f"Previous response with id '{response_id}' not found.", "previous_response_id"
        )


class Conflict(ClientError):
    """The change clashes with the shared state; ``code`` says how: ``tenant_exists``,
    ``too_many_tenants`` (``max_tenants``) or ``too_many_keys`` (``max_tenant_keys``)."""

    status = 409

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"

    def headers(self) -> dict[str, str]:
        # the rest of the body may still come: read and thrown away (router.api.server), then
        # the connection is closed rather than reading an unbounded body for nobody
        return {"Connection": "close"}


class HeadersTooLarge(ClientError):
    """The request line and headers are over ``max_head_bytes`` or ``max_header_count``;
    answered by the HTTP server itself (``router.api.server``), before any application."""

    status = 431
    code = "request_header_fields_too_large"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class RequestTimeout(ClientError):
    """The client did not send its whole body within ``read_timeout_s``."""

    status = 408
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the rest of the body may still come: not reusable


class ClientGone(ClientError):
    """The client closed its connection before we could answer (nginx's 499)."""

    status = 499
    code = "client_closed_request"


class ProviderClientError(ClientError):
    """A provider rejected the request as the client's fault (4xx other than 429)."""

    def __init__(self, status: int, message: str, provider: str) -> None:
        super().__init__(f"provider {provider} rejected the request: {message}")
        self.status = status
        self.provider = provider


class Saturated(RouterError):
    """No target of the route has room now; the client should retry later."""

    status = 429
    type = "rate_limit_error"
    code = "saturated"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class TenantLimited(RouterError):
    """The tenant is at one of its own limits (not the providers': they may have room)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, code: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
        """When a request may succeed again; ``None``: never by waiting (it is too large)."""

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class QuotaExceeded(TenantLimited):
    """The tenant's budget for the period is spent (OpenAI's ``insufficient_quota``)."""

    type = "insufficient_quota"

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message, "insufficient_quota", retry_after_s)


class Unavailable(RouterError):
    """No target of the route is in service: each is down, drained or its circuit open (an
    outage, not a lack of capacity: that is ``Saturated``)."""

    status = 503
    code = "no_provider_available"

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """When an open circuit lets its trial go (0: no such time is known)."""

    def headers(self) -> dict[str, str]:
        if self.retry_after_s > 0:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return {}


class PinnedUnavailable(Unavailable):
    """The one provider that holds what a request continues (a Responses API conversation) is
    out of service: another would not have it, so the request is not sent elsewhere."""

    code = "pinned_provider_unavailable"


class UpstreamError(RouterError):
    """One attempt at one provider failed; the dispatcher may fail over."""

    status = 502
    code = "upstream_error"
    outcome = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UpstreamConnectError(UpstreamError):
    outcome = "connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    outcome = "timeout"


class UpstreamStatusError(UpstreamError):
    outcome = "http_5xx"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.upstream_status = status


class UpstreamRateLimited(UpstreamStatusError):
    outcome = "http_429"

    def __init__(self, message: str, cooldown_s: float) -> None:
        super().__init__(message, 429)
        self.cooldown_s = cooldown_s


class UpstreamProtocolError(UpstreamError):
    outcome = "bad_response"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one failed attempt was: which provider, and why (no secrets)."""

    provider: str
    outcome: str
    message: str


class AllAttemptsFailed(RouterError):
    """Failover gave up; the status says why (502 bad answers, 503 none usable, 504 timeouts)."""

    code = "all_attempts_failed"

    def __init__(
        self,
        attempts: list[Attempt],
        status: int,
        retry_after_s: float = 0,
        message: str | None = None,
    ) -> None:
        tried = "; ".join(f"{a.provider}: {a.outcome} ({a.message})" for a in attempts)
        super().__init__(message or f"every attempt failed: {tried}")
        self.attempts = attempts
        self.status = status
        self.retry_after_s = retry_after_s
        if status == 429:
            self.type = "rate_limit_error"

    def headers(self) -> dict[str, str]:
        if self.retry_after_s > 0:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return {}


def to_openai_error(err: RouterError) -> dict[str, Any]:
    """The OpenAI-shaped body for ``err``."""
    body: dict[str, Any] = {"message": str(err), "type": err.type, "code": err.code}
    body["param"] = getattr(err, "param", None)
    return {"error": body}


def error_response(err: RouterError) -> tuple[int, dict[str, str], bytes]:
    """``err`` as every endpoint answers it: its status; its headers (``Retry-After``,
    ``Connection``) and, once providers were tried, ``x-router-attempts``; its JSON body."""
    headers = err.headers()
    attempts = getattr(err, "attempts", None)
    if attempts is not None:
        headers["x-router-attempts"] = str(len(attempts))
    return err.status, headers, orjson.dumps(to_openai_error(err))


INTERNAL_ERROR = to_openai_error(RouterError("internal error"))
"""The body of a 500 from a bug: it says nothing of the bug itself."""
