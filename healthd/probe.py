"""One active health probe of one provider, over httpx (probes are rare: speed does not matter).

    good   any 2xx, and 429: the provider is up, only rate-limited (the router's cooldown
           handles 429s; marking it down would take it out of rotation twice over)
    bad    any other status, a timeout, a transport error

The error text is short and never holds a URL, a header or a key: ``HTTP 503``,
``timed out after 2.0s``, ``connect failed (ConnectError)``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx

from router.config import Provider
from router.upstream.providers import adapter_for, api_url


class ProbeResult(NamedTuple):
    """What one probe found: good or bad, how long it took, and why it was bad."""

    ok: bool
    latency_ms: float
    error: str


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """The request a provider is probed with."""

    method: str
    url: str
    headers: dict[str, str] = field(repr=False)  # holds the provider's key: never printed
    body: dict[str, Any] | None = None


def probe_request(provider: Provider) -> ProbeRequest:
    """The provider's configured probe, or ``GET`` of its kind's model list (the adapter's
    ``probe_path``), with the headers the adapter sends on every request."""
    configured = provider.health.probe
    adapter = adapter_for(provider.kind)
    path = configured.path or adapter.probe_path
    headers = adapter.headers(provider)
    return ProbeRequest(configured.method, api_url(provider, path), headers, configured.body)


def verdict(status: int) -> tuple[bool, str]:
    """Whether an HTTP status means the provider is up, and the error text if not."""
    if 200 <= status < 300:
        return True, ""
    if status == 429:
        return True, "HTTP 429 (rate-limited, counted as up)"
    return False, f"HTTP {status}"


async def probe(client: httpx.AsyncClient, provider: Provider) -> ProbeResult:
    """Probe ``provider`` once, within its ``health.timeout_s`` from start to last byte."""
    req = probe_request(provider)
    timeout = provider.health.timeout_s
    started = time.perf_counter()
    try:
        # httpx's timeout bounds each phase; asyncio's bounds the whole exchange, so a
        # provider trickling its answer byte by byte still fails in time.
        async with asyncio.timeout(timeout):
            resp = await client.request(
                req.method, req.url, headers=req.headers, json=req.body, timeout=timeout
            )
    except (TimeoutError, httpx.TimeoutException):
        return _result(started, False, f"timed out after {timeout}s")
    except httpx.ConnectError as exc:
        return _result(started, False, f"connect failed ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        # the class name only: httpx's messages may quote the URL
        return _result(started, False, f"request failed ({type(exc).__name__})")
    return _result(started, *verdict(resp.status_code))


def _result(started: float, ok: bool, error: str) -> ProbeResult:
    return ProbeResult(ok, (time.perf_counter() - started) * 1000, error)
