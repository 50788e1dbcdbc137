"""Fixtures shared by integration tests: the upstream client's, and the in-process mock
providers' (``inproc``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from router.upstream.client import Upstream
from tests.integration.inproc import http, start_mock

__all__ = ["http", "start_mock", "upstream"]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = Upstream()
    await u.start()
    yield u
    await u.close()
