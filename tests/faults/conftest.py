"""Fixtures of the fault suite: fault-injecting proxies and a Redis that tests may break."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.proxy import ProxyPool, proxies
from tests.faults.support import RedisServer
from tests.helpers import Cluster


@pytest.fixture
def proxy_factory() -> Iterator[ProxyPool]:
    """Call it with a target port to get a started ``Proxy``; all are stopped at test end."""
    with proxies() as pool:
        yield pool


@pytest.fixture
def own_redis(cluster: Cluster, tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server, started, that this test alone may kill, restart or pause."""
    server = RedisServer(cluster, tmp_path).start()
    yield server
    server.resume()  # a paused server would ignore the SIGTERM that stops it
