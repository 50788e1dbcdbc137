"""One active health probe of one provider, over httpx (probes are rare: speed does not matter).

    good   any 2xx, and 429: the provider is up, only rate-limited (the router's cooldown
           handles 429s; marking it down would take it out of rotation twice over)
    bad    any other status, a timeout, a transport error

The error text is short and never holds a URL, a header or a key: ``HTTP 503``,
``timed out after 2.0s``, ``connect failed (ConnectError)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx

from router.config import Provider, ProviderTLS
from router.errors import UpstreamConnectError
from router.upstream.providers import adapter_for, api_url
from router.upstream.tlsfiles import TLSContexts


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


class ProbeClients:
    """httpx clients that reach each provider the way the router's requests do: through its
    ``tls`` settings (CA, client certificate, verify) and its proxy (its own ``proxy``, else
    the environment's ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``); one client per distinct
    setting, made again when its TLS files change on disk (as the router's connections do)."""

    def __init__(self, tls: TLSContexts | None = None) -> None:
        self._clients: dict[
            tuple[ProviderTLS | None, str | None], tuple[int, httpx.AsyncClient]
        ] = {}
        self._retired: list[httpx.AsyncClient] = []
        """Clients made for older TLS files: closed with the rest (probes may still use them)."""
        self._tls = tls or TLSContexts()

    def of(self, provider: Provider) -> httpx.AsyncClient:
        """The client that probes ``provider``."""
        key = (provider.tls, provider.proxy)
        verify: ssl.SSLContext | bool = True
        generation = 0
        if provider.tls is not None:
            # unreadable files: the system's CAs, so the probes fail (and say why) as requests do
            with contextlib.suppress(UpstreamConnectError):
                verify, generation = self._tls.get(provider.tls)
        held = self._clients.get(key)
        if held is not None and held[0] == generation:
            return held[1]
        if held is not None:
            self._retired.append(held[1])
        client = _client(provider, verify)
        self._clients[key] = (generation, client)
        return client

    async def close(self) -> None:
        for client in [*self._retired, *(c for _, c in self._clients.values())]:
            await client.aclose()


def _client(provider: Provider, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
    headers = {"user-agent": "healthd"}
    if provider.proxy == "none":
        return httpx.AsyncClient(verify=verify, trust_env=False, headers=headers)
    if provider.proxy is not None:
        return httpx.AsyncClient(
            verify=verify, proxy=provider.proxy, trust_env=False, headers=headers
        )
    return httpx.AsyncClient(verify=verify, trust_env=True, headers=headers)
