"""Fixtures shared by integration tests: the upstream client's, and the in-process mock
providers' (``inproc``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router.upstream.client import Upstream
from tests.integration.inproc import http, start_mock
from tests.topologies import ClusterSet, redis_cluster

__all__ = ["http", "start_mock", "upstream"]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = Upstream()
    await u.start()
    yield u
    await u.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[ClusterSet]:
    """A Redis Cluster on loopback (3 primaries, 3 replicas), stopped after the test."""
    d = tmp_path / "cluster"
    d.mkdir()
    with redis_cluster(d) as c:
        yield c
