"""Lease ids are the router's own: requests that send the same ``x-request-id`` each hold a
lease of their own, so a provider's ``max_in_flight`` holds for them too, in Redis and in the
local lease table of a degraded replica."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, free_port, start_gateway

SAME_ID = "one-id-for-everyone"
REQUESTS = 10
MAX_IN_FLIGHT = 2


async def ten_at_once(url: str) -> list[int]:
    """``REQUESTS`` concurrent chat requests through the openai SDK, all with one request id;
    their HTTP statuses."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0,
                                timeout=30)  # fmt: skip

    async def one() -> int:
        r = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            extra_headers={"x-request-id": SAME_ID},
        )  # fmt: skip
        assert r.headers["x-request-id"] == SAME_ID  # the client's id still names its answer
        return r.status_code

    try:
        return list(await asyncio.gather(*(one() for _ in range(REQUESTS))))
    finally:
        await client.close()


def gateway(cluster: Cluster, tmp: Path, redis_url: str, **extra: Any) -> Gateway:
    slow = Mock("p", "--latency-ms", "300", limits={"max_in_flight": MAX_IN_FLIGHT})
    # the queue lets every request wait for a slot rather than be refused
    route = {"model": "chat", "queue_timeout_s": 20, "targets": [{"provider": "p", "model": "m"}]}
    return start_gateway(cluster, tmp, redis_url, [slow], [route], replicas=1, **extra)


@pytest.mark.parametrize("store", ["redis", "degraded"])
def test_one_request_id_sent_ten_times_still_gets_max_in_flight(
    cluster: Cluster, tmp_path: Path, redis_url: str, store: str
) -> None:
    # degraded: the configured Redis never answers (nothing listens there), so the replica
    # decides from its local lease table
    url = redis_url if store == "redis" else f"redis://127.0.0.1:{free_port()}/0"
    gw = gateway(cluster, tmp_path, url, redis={"start_degraded": store == "degraded"})
    statuses = asyncio.run(ten_at_once(gw.urls[0]))
    stats = gw.mocks["p"].stats()
    assert statuses == [200] * REQUESTS
    assert stats["received"] == REQUESTS
    assert stats["in_flight_peak"] <= MAX_IN_FLIGHT, stats
