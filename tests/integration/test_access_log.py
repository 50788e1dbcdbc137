"""One access line per request on stderr (logger ``router.access``), for every endpoint, apart
from the decision log and set by ``log.access``; a stream's written when it ends; never a
secret."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from tests.helpers import (
    ADMIN_TOKEN,
    CLIENT_KEY,
    SECRETS,
    Cluster,
    Gateway,
    Mock,
    Proc,
    auth,
    start_gateway,
    wait_until,
)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
ROUTES = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
FIELDS = {"ts", "level", "logger", "msg", "method", "path", "status", "tenant", "route", "provider",
          "attempts", "duration_ms", "request_id", "outcome", "bytes"}  # fmt: skip


def lines(proc: Proc, logger: str) -> list[dict[str, Any]]:
    """The replica's JSON log lines of ``logger``."""
    out = [orjson.loads(x) for x in proc.output().splitlines() if x.startswith("{")]
    return [x for x in out if x["logger"] == logger]


def line_of(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The one access line of the request ``request_id`` (waited for: written at its end)."""
    proc = gw.replicas[0][0]

    def found() -> list[dict[str, Any]]:
        return [x for x in lines(proc, "router.access") if x["request_id"] == request_id]

    seen = wait_until(found, 10, f"the access line of {request_id}")
    assert len(seen) == 1, seen
    assert set(seen[0]) == FIELDS, seen[0]
    return dict(seen[0])


def rid(name: str) -> dict[str, str]:
    return {**auth(), "x-request-id": f"{name}-{time.monotonic_ns()}"}


@contextlib.contextmanager
def start(tmp: Path, redis_port: int, mock: Mock, log: dict[str, Any]) -> Iterator[Gateway]:
    redis.Redis(port=redis_port).flushall()
    cluster = Cluster(tmp)
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        yield start_gateway(cluster, tmp, url, [mock], ROUTES, log={"level": "INFO", **log})
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[Gateway]:
    # slow enough streams for a client to leave in the middle of one
    mock = Mock("p", "--chunk-interval-ms", "20", "--completion-tokens", "20")
    with start(tmp_path_factory.mktemp("access"), redis_port, mock, {}) as started:
        yield started


def test_a_served_request_has_one_line_saying_how_it_went(gw: Gateway) -> None:
    headers = rid("whole")
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 200
    line = line_of(gw, headers["x-request-id"])
    assert line["level"] == "info"
    assert line["msg"] == "access"
    want = {"method": "POST", "path": "/v1/chat/completions", "status": 200, "route": "chat",
            "provider": "p", "attempts": 1, "outcome": "ok", "bytes": len(r.content)}  # fmt: skip
    assert {k: line[k] for k in want} == want
    assert 0 < line["duration_ms"] < 10_000


def test_a_streams_line_is_written_when_it_ends(gw: Gateway) -> None:
    headers = rid("stream")
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{gw.urls[0]}/v1/chat/completions", json={**CHAT, "stream": True},
        headers=headers,
    ) as r:  # fmt: skip
        chunks = r.iter_raw()
        got = [next(chunks)]
        first_ms = (time.monotonic() - started) * 1000
        got += list(chunks)
    took_ms = (time.monotonic() - started) * 1000
    line = line_of(gw, headers["x-request-id"])
    assert (line["status"], line["outcome"]) == (200, "ok")
    assert line["bytes"] == sum(map(len, got))
    # the whole stream's time, not its first byte's: at least from the first chunk to the last
    assert took_ms - first_ms > 200
    assert took_ms - first_ms - 20 <= line["duration_ms"] <= took_ms  # (20 ms: two clocks)


def test_a_client_that_leaves_a_stream_is_logged_as_cancelled(gw: Gateway) -> None:
    headers = rid("left")
    with httpx.stream(
        "POST", f"{gw.urls[0]}/v1/chat/completions", json={**CHAT, "stream": True},
        headers=headers,
    ) as r:  # fmt: skip
        first = next(r.iter_raw())
    line = line_of(gw, headers["x-request-id"])
    assert (line["status"], line["outcome"]) == (200, "client_cancelled")
    assert len(first) <= line["bytes"]


def test_an_error_is_logged_with_its_code(gw: Gateway) -> None:
    headers = rid("unknown-model")
    r = httpx.post(
        f"{gw.urls[0]}/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=headers
    )
    assert r.status_code == 404
    line = line_of(gw, headers["x-request-id"])
    want = {"status": 404, "route": None, "provider": None, "outcome": "model_not_found"}
    assert {k: line[k] for k in want} == want


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "outcome"),
    [
        ("GET", "/v1/models", auth(), 200, "ok"),
        ("GET", "/v1/models/chat", auth(), 200, "ok"),
        ("GET", "/v1/models", {}, 401, "invalid_api_key"),
        ("GET", "/admin/state", {"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200, "ok"),
        ("POST", "/admin/providers/nope/drain", {"Authorization": f"Bearer {ADMIN_TOKEN}"},
         404, "provider_not_found"),
        ("GET", "/no/such/path", {}, 404, "unknown_url"),
        ("DELETE", "/v1/chat/completions", auth(), 405, "method_not_allowed"),
    ],
)  # fmt: skip
def test_every_other_endpoint_is_logged(
    gw: Gateway, method: str, path: str, headers: dict[str, str], status: int, outcome: str
) -> None:
    headers = {**headers, "x-request-id": f"other-{time.monotonic_ns()}"}
    r = httpx.request(method, f"{gw.urls[0]}{path}", headers=headers)
    assert r.status_code == status, r.text
    line = line_of(gw, headers["x-request-id"])
    want = {"method": method, "path": path, "status": status, "outcome": outcome,
            "bytes": len(r.content), "level": "info"}  # fmt: skip
    assert {k: line[k] for k in want} == want


def test_probes_and_scrapes_are_not_logged_at_info(gw: Gateway) -> None:
    ids = []
    for path in ("/healthz", "/readyz", "/metrics"):
        ids.append(f"probe-{time.monotonic_ns()}")
        assert httpx.get(f"{gw.urls[0]}{path}", headers={"x-request-id": ids[-1]}).is_success
    marker = rid("after-probes")  # logged after them: by then theirs would be there too
    httpx.get(f"{gw.urls[0]}/v1/models", headers=marker)
    line_of(gw, marker["x-request-id"])
    logged = {x["request_id"] for x in lines(gw.replicas[0][0], "router.access")}
    assert not logged & set(ids)


def test_no_secret_and_no_query_is_logged(gw: Gateway) -> None:
    headers = rid("secrets")
    query = "?api_key=query-secret-42&token=query-secret-43"
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions{query}", json=CHAT, headers=headers)
    assert r.status_code == 200
    httpx.get(f"{gw.urls[0]}/v1/models{query}", headers=auth())
    httpx.get(f"{gw.urls[0]}/admin/state{query}", headers={"Authorization": "Bearer wrong"})
    assert line_of(gw, headers["x-request-id"])["path"] == "/v1/chat/completions"
    text = "\n".join(str(x) for x in lines(gw.replicas[0][0], "router.access"))
    for secret in (*SECRETS, "query-secret", "wrong", "Bearer"):
        assert secret not in text
    assert CLIENT_KEY not in gw.replicas[0][0].output()


@pytest.mark.parametrize(
    ("log", "access", "decisions"),
    [
        ({"access": "OFF", "decisions": "INFO"}, False, True),
        ({"access": False, "decisions": "INFO"}, False, True),  # YAML's bare off is false
        ({"access": "INFO", "decisions": "OFF"}, True, False),
        ({"access": "DEBUG", "decisions": "OFF"}, True, False),
    ],
)
def test_the_access_log_is_set_apart_from_the_decision_log(
    tmp_path: Path, redis_port: int, log: dict[str, Any], access: bool, decisions: bool
) -> None:
    with start(tmp_path, redis_port, Mock("p"), log) as gw:
        r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=auth())
        assert r.status_code == 200
        probe = httpx.get(f"{gw.urls[0]}/healthz", headers={"x-request-id": "probe-1"})
        assert probe.status_code == 200
        proc = gw.replicas[0][0]
        wait_until(lambda: lines(proc, "router.access") or not access, 10, "an access line")
        assert bool(lines(proc, "router.decision")) == decisions
        paths = [(x["path"], x["level"]) for x in lines(proc, "router.access")]
        if log["access"] == "DEBUG":  # the probes too, at their level
            assert ("/healthz", "debug") in paths
        assert (("/v1/chat/completions", "info") in paths) == access


def test_a_path_is_logged_on_one_ascii_line(gw: Gateway) -> None:
    headers = rid("odd-path")
    path = "/v1/models/a\u2028b\x85c d\u00e9" + "x" * 1000  # U+2028 and NEL end a line for some
    assert httpx.get(f"{gw.urls[0]}{path}", headers=headers).status_code == 404
    line = line_of(gw, headers["x-request-id"])
    assert line["path"].startswith("/v1/models/a%E2%80%A8b%C2%85c%20d%C3%A9xxx")
    assert len(line["path"]) < 300
