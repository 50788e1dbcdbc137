"""Fixtures shared by the integration tests of the upstream client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from router.upstream.client import Upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = Upstream()
    await u.start()
    yield u
    await u.close()
