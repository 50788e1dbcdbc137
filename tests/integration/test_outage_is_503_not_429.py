"""An outage is told as an outage: 503 naming why (circuits open, providers down, drained),
while a lack of room stays 429. Real router, mock providers and Redis; the official client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from router.config import load_config
from router.state.health import HealthStore
from router.state.keys import Keys
from router.state.store import Store
from tests.helpers import ADMIN_TOKEN, CLIENT_KEY, ENV, Cluster, Gateway, Mock, start_gateway

KEYS = Keys("rc", "default")
COOLDOWN_S = 30
BROKEN = {"circuit": {"failures": 1, "cooldown_s": COOLDOWN_S}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    tmp = tmp_path_factory.mktemp("outage")
    cluster = Cluster(tmp)
    broken = Mock("broken-1", **BROKEN)
    healthy = Mock("gone")
    mocks = [
        broken, Mock("broken-2", alias_of=broken, **BROKEN),
        Mock("broken-3", alias_of=broken, **BROKEN),
        healthy, Mock("off", alias_of=healthy), Mock("full", alias_of=healthy, limits={"rpm": 1}),
    ]  # fmt: skip

    def route(model: str, *providers: str) -> dict[str, object]:
        targets = [{"provider": p, "model": "m"} for p in providers]
        return {"model": model, "max_attempts": 2, "targets": targets}

    routes = [
        route("circuits", "broken-1", "broken-2"),
        route("outage", "gone", "off"),
        route("mixed", "full", "broken-3"),
    ]
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        gateway = start_gateway(cluster, Path(tmp), url, mocks, routes)
        gateway.mocks["broken-1"].fault("error", status=500)
        yield gateway
    finally:
        cluster.stop_all()


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0)


def chat(gw: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    return httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_every_circuit_open_is_a_503_with_the_trial_time(gw: Gateway) -> None:
    first = chat(gw, "circuits")  # both attempts fail, and each failure opens a circuit
    assert first.status_code == 502
    with client(gw) as c, pytest.raises(openai.InternalServerError) as caught:
        c.chat.completions.create(model="circuits", messages=[{"role": "user", "content": "hi"}])
    err = caught.value
    assert err.status_code == 503
    assert 1 <= int(err.response.headers["retry-after"]) <= COOLDOWN_S
    shape = err.response.json()["error"]
    assert (shape["type"], shape["code"]) == ("server_error", "no_provider_available")
    for words in ("route circuits", "broken-1: circuit open", "broken-2: circuit open"):
        assert words in shape["message"]


async def _take_out(config: Path) -> None:
    """gone fails a probe (healthd's write: down at once with fall 1)."""
    store = Store.from_config(load_config(config, dict(ENV)))
    await store.start()
    try:
        await HealthStore(store).report_probe("gone", 0, False, 1.0, "HTTP 503", 1, 1)
    finally:
        await store.close()


def test_down_and_drained_is_a_503_naming_both(gw: Gateway) -> None:
    drained = httpx.post(f"{gw.urls[0]}/admin/providers/off/drain",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
    assert drained.status_code == 200
    asyncio.run(_take_out(gw.config))
    r = chat(gw, "outage")
    assert r.status_code == 503
    assert "retry-after" not in r.headers  # nothing says when either comes back
    shape = r.json()["error"]
    assert shape["code"] == "no_provider_available"
    assert "gone: down" in shape["message"]
    assert "off: drained" in shape["message"]


def test_one_full_and_one_open_is_a_lack_of_room(gw: Gateway, redis_port: int) -> None:
    r = redis.Redis(port=redis_port)

    def settled() -> bool:
        full = r.hget(KEYS.provider("full"), "rpm")
        return r.hget(KEYS.provider("broken-3"), "circ") == b"open" and full == b"1"

    for _ in range(4):  # each request opens broken-3's circuit or uses full's one request
        if settled():
            break
        chat(gw, "mixed")
    assert settled()
    refused = chat(gw, "mixed")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    shape = refused.json()["error"]
    assert (shape["type"], shape["code"]) == ("rate_limit_error", "saturated")
    assert "full: at its RPM limit" in shape["message"]
    assert "broken-3: circuit open" in shape["message"]
