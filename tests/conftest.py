"""Fixtures: a private redis-server for the session, flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.helpers import Cluster, redis_server


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a redis-server this test session started and will throw away."""
    with redis_server(tmp_path_factory.mktemp("redis")) as (port, _proc):
        yield port


@pytest.fixture
async def redis_url(redis_port: int) -> str:
    """URL of the private server, emptied for this test."""
    client = aioredis.Redis(port=redis_port)
    await client.flushall()
    await client.aclose()
    return f"redis://127.0.0.1:{redis_port}/0"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real processes for one test, all stopped at its end."""
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that starts processes or waits on real time (tests/integration and
    tests/faults) is ``slow``: ``pytest -m "not slow"`` is the developers' fast loop (the pure
    unit tests, a few seconds), the whole suite is what CI runs."""
    for item in items:
        parts = item.path.parts
        if "integration" in parts or "faults" in parts:
            item.add_marker(pytest.mark.slow)
