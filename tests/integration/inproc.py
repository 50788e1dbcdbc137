"""Mock providers run inside the test's event loop (the mock's own tests): a factory fixture
that starts them on free ports and stops them at the end, a plain HTTP client, and the
official SDK pointed at one. The fixtures are made available by ``conftest.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from loadtest.mock_provider import PROVIDER_KEY, MockConfig, MockProvider, start_server


@dataclass
class Mock:
    """A running in-process mock provider."""

    url: str
    provider: MockProvider
    port: int


Start = Callable[..., Awaitable[Mock]]


@pytest.fixture
async def start_mock() -> AsyncIterator[Start]:
    """Factory starting mock providers (``MockConfig`` options, TLS ones included) on free
    ports; all are stopped at the end of the test. ``url`` is the plain-HTTP one."""
    runners: list[web.AppRunner] = []

    async def start(**options: Any) -> Mock:
        runner, port = await start_server(MockConfig(**{"port": 0, **options}))
        runners.append(runner)
        assert runner.app is not None
        return Mock(f"http://127.0.0.1:{port}", runner.app[PROVIDER_KEY], port)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


def sdk(mock: Mock, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    """The official OpenAI client pointed at the mock, without retries hiding failures."""
    return openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key=api_key, max_retries=0)


async def stats(http: httpx.AsyncClient, mock: Mock) -> dict[str, Any]:
    """GET /stats."""
    return dict((await http.get(f"{mock.url}/stats")).json())
