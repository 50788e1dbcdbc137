"""A client cannot make providers fail: no client header reaches a provider unchecked, and a
provider's refusal of the request itself (431, 414) is not held against the provider.

Before: with tracing off, the client's ``traceparent`` was forwarded as it came; a 32 KiB one
made providers answer 431, each counted as a provider failure, and five such requests opened
every provider's circuit, cluster-wide: everyone got 429/503 for the cooldown.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import orjson
import pytest
import redis

from router.state.keys import Keys
from tests.helpers import CLIENT_KEY, Cluster, Gateway, write_config

FAILURES = 5  # the default circuit.failures: this many failures in a row open it
HEADER_LIMIT = 8192
"""What the scripted provider accepts of one header, as nginx's default buffers do."""
VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
COMPLETION = orjson.dumps({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
})  # fmt: skip


@dataclass
class Script:
    """What the provider does, and what it saw."""

    status: int = 200
    """Answer this status to every request (200: answer normally)."""
    seen: list[dict[str, str]] = field(default_factory=list)
    """The headers of every request, lower-case names."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Script

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.script.seen.append(headers)
        status = self.script.status
        if status == 200 and any(len(v) > HEADER_LIMIT for v in headers.values()):
            status = 431
        body = COMPLETION
        if status != 200:
            body = orjson.dumps({"error": {"message": f"refused with {status}", "type": "x"}})
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Rig:
    gw: Gateway
    script: Script
    redis: redis.Redis

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gw.urls[0]}/v1", api_key=CLIENT_KEY, max_retries=0)

    def chat(self, **headers: str) -> str | None:
        """One chat request; the answer's content (or raises the SDK's error)."""
        with self.client() as c:
            answer = c.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
            )
        return answer.choices[0].message.content

    def provider_state(self) -> dict[str, str]:
        raw = self.redis.hgetall(Keys("rc", "default").provider("p"))
        return {k.decode(): v.decode() for k, v in raw.items()}


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Rig]:
    r = redis.Redis(port=redis_port)
    r.flushall()
    tmp = tmp_path_factory.mktemp("circuits")
    script = Script()
    handler = type("Handler", (_Handler,), {"script": script})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    provider = {"name": "p", "kind": "openai", "api_key": {"env": "P_KEY"},
                "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"}  # fmt: skip
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    config = write_config(tmp / "router.yaml", f"redis://127.0.0.1:{redis_port}/0", [], routes,
                          providers=[provider])  # fmt: skip
    cluster = Cluster(tmp)
    gw = Gateway(cluster, config, [])
    try:
        gw.add_replica()
        yield Rig(gw, script, r)
    finally:
        cluster.stop_all()
        server.shutdown()
        server.server_close()


@pytest.fixture
def rig(module_rig: Rig) -> Iterator[Rig]:
    module_rig.script.status = 200
    module_rig.script.seen.clear()
    yield module_rig
    key = Keys("rc", "default").provider("p")  # the next test starts with a closed circuit
    module_rig.redis.hdel(key, "cool", "circ", "circ_until", "circ_trial", "circ_opens", "fails")


def test_an_oversized_traceparent_is_dropped_and_opens_no_circuit(rig: Rig) -> None:
    huge = "00-" + "a" * 32 * 1024
    for _ in range(2 * FAILURES):
        assert rig.chat(traceparent=huge) == "hello"
    assert [h.get("traceparent") for h in rig.script.seen] == [None] * 2 * FAILURES
    state = rig.provider_state()
    assert int(state.get("fails", 0)) == 0
    assert "circ" not in state, state


def test_a_valid_traceparent_is_passed_on_as_it_came(rig: Rig) -> None:
    assert rig.chat(traceparent=VALID) == "hello"
    assert rig.script.seen[-1]["traceparent"] == VALID


@pytest.mark.parametrize(
    "value",
    [
        VALID.upper(),
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
        "ff" + VALID[2:],  # the one invalid version
        VALID + "-extra",  # a future version's extra field, on version 00
        VALID[:-1],
        VALID.replace("-", "_"),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
    ],
    ids=["upper", "zero-trace", "zero-parent", "version-ff", "extra", "short", "sep", "hex"],
)
def test_an_invalid_traceparent_is_not_passed_on(rig: Rig, value: str) -> None:
    assert rig.chat(traceparent=value) == "hello"
    assert "traceparent" not in rig.script.seen[-1]


@pytest.mark.parametrize("status", [431, 414])
def test_a_providers_refusal_of_the_request_itself_is_not_its_failure(
    rig: Rig, status: int
) -> None:
    rig.script.status = status
    for _ in range(2 * FAILURES):
        with pytest.raises(openai.APIStatusError) as caught:
            rig.chat()
        assert caught.value.status_code == status  # passed through, as a 400 is
        assert f"refused with {status}" in caught.value.message
    assert len(rig.script.seen) == 2 * FAILURES  # one attempt each: never failed over
    assert int(rig.provider_state().get("fails", 0)) == 0
    rig.script.status = 200
    assert rig.chat() == "hello"  # the circuit is closed: served at once
