"""The request id and the access line of every request FastAPI serves (everything but the two
hot endpoints, which write their own: ``router.api.endpoints``).

A plain ASGI middleware outside the whole FastAPI app: Starlette's ``BaseHTTPMiddleware``
costs far more per request, and outside, it also sees the 500 that FastAPI's outermost
layer answers for a bug. Health probes and scrapes are logged at ``DEBUG``: a load balancer
probing every second, and Prometheus, would otherwise fill the log with lines nobody reads.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.api.endpoints import request_id as request_id_of
from router.telemetry.logs import access_logged, log_access

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Logged at ``DEBUG`` (``log.access: DEBUG`` shows them)."""


def set_outcome(scope: Scope, outcome: str) -> None:
    """Name how a request ended (an error's code) for its access line."""
    scope.setdefault("state", {})["outcome"] = outcome


class RequestLog:
    """Gives every request an id (the client's ``x-request-id`` when sane, or a new one) and
    every response that header, and writes the request's access line once it is answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = request_id_of(raw)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["rid"] = rid
        header = (b"x-request-id", rid.encode())
        answer = [500, 0]  # status, body bytes

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
                answer[0] = message["status"]
            elif message["type"] == "http.response.body":
                answer[1] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            state.setdefault("outcome", "internal_error")
            raise
        finally:
            _log(scope, state, answer[0], answer[1], started, rid)


def _log(
    scope: Scope, state: dict[str, Any], status: int, sent: int, started: float, rid: str
) -> None:
    level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    if not access_logged(level):
        return
    outcome = state.get("outcome") or ("ok" if status < 400 else f"http_{status}")
    log_access(
        scope["method"],
        scope["path"],
        status,
        None,
        None,
        None,
        perf_counter() - started,
        rid,
        outcome,
        sent,
        level,
    )
