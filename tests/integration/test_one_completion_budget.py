"""A request that names no completion budget is reserved what is sent: one figure, the
route's ``default_max_tokens`` or else the target's adapter's (the Anthropic adapter sent 4096
while 1024 was reserved)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import redis

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

PROVIDER_KEY = "rc:{default}:provider:claude"


@pytest.fixture
def gw(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    mocks = [Mock("claude", "--completion-tokens", "5", api="anthropic", limits={"tpm": 100_000})]
    routes = [
        {"model": "adapter-budget", "targets": [{"provider": "claude", "model": "c"}]},
        {"model": "route-budget", "default_max_tokens": 300,
         "targets": [{"provider": "claude", "model": "c"}]},
    ]  # fmt: skip
    return start_gateway(cluster, tmp_path, redis_url, mocks, routes)


@pytest.mark.parametrize(("route", "budget"), [("adapter-budget", 4096), ("route-budget", 300)])
def test_what_is_reserved_is_what_is_sent(
    gw: Gateway, redis_url: str, route: str, budget: int
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    before = int(r.hget(PROVIDER_KEY, "tpm") or 0)
    with openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        c.chat.completions.create(model=route, messages=[{"role": "user", "content": "hi"}])
    assert gw.mocks["claude"].stats()["last_max_tokens"] == budget
    # reserved accounting: the larger of the budget and the (tiny) prompt
    assert int(r.hget(PROVIDER_KEY, "tpm") or 0) - before == budget
