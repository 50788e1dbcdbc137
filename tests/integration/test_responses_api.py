"""The official openai SDK's Responses API through two replicas: whole and streamed answers,
conversations continued with ``previous_response_id`` on the other replica reach the provider
that made the response, stored responses are read and deleted from any replica, and a
conversation whose provider is out of service gets a clear error, never another provider."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import ADMIN_TOKEN, CLIENT_KEY, Cluster, Gateway, Mock, start_gateway

TOKENS = 5
TEXT = "".join(f"tok{i} " for i in range(TOKENS))
PROVIDERS = ("a", "b", "c")


@pytest.fixture
def gw(cluster: Cluster, tmp_path: Path, redis_url: str) -> Gateway:
    mocks = [
        Mock(p, "--completion-tokens", str(TOKENS), "--chunk-interval-ms", "2") for p in PROVIDERS
    ]
    mocks.append(Mock("claude", "--completion-tokens", str(TOKENS), api="anthropic"))
    targets: list[dict[str, Any]] = [{"provider": p, "model": "gpt-5-codex"} for p in PROVIDERS]
    routes = [
        {"model": "codex", "strategy": "round_robin", "targets": targets},
        {  # an anthropic target and one that says it serves no Responses: both skipped
            "model": "mixed",
            "targets": [
                {"provider": "claude", "model": "claude-sonnet"},
                {"provider": "a", "model": "gpt-4o", "responses": False},
                {"provider": "b", "model": "gpt-4o"},
            ],
        },
        {
            "model": "no-responses",
            "targets": [
                {"provider": "claude", "model": "claude-sonnet"},
                {"provider": "a", "model": "gpt-4o", "responses": False},
            ],
        },
    ]
    tenants = [{"name": "other", "keys": [{"env": "OTHER_KEY"}]}]
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=0, tenants=tenants)
    for _ in range(2):
        gw.add_replica({"OTHER_KEY": OTHER_KEY})
    return gw


OTHER_KEY = "other-tenant-key-0123456789"


def client(url: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_create_whole_and_streamed(gw: Gateway) -> None:
    with client(gw.urls[0]) as c:
        raw = c.responses.with_raw_response.create(
            model="codex", input="hi", instructions="be brief"
        )
        whole = raw.parse()
        assert whole.status == "completed"
        assert whole.output_text == TEXT
        assert whole.usage is not None
        assert whole.usage.output_tokens == TOKENS
        assert raw.headers["x-router-provider"] in PROVIDERS
        with c.responses.stream(model="codex", input="count") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert "".join(deltas) == TEXT
    assert final.output_text == TEXT
    assert final.id.startswith("resp_")


@pytest.mark.parametrize("streamed", [False, True])
def test_a_follow_up_on_the_other_replica_reaches_the_same_provider(
    gw: Gateway, streamed: bool
) -> None:
    """20 conversations started on replica 0 (round robin spreads them over the three
    providers), each continued twice on replica 1 with previous_response_id: every follow-up
    lands where its conversation began, and no provider says it does not know the id."""
    first_c, second_c = client(gw.urls[0]), client(gw.urls[1])
    landed: list[tuple[str, str]] = []
    for k in range(20):
        raw = first_c.responses.with_raw_response.create(model="codex", input=f"task {k}")
        began, previous = raw.headers["x-router-provider"], raw.parse().id
        for turn in range(2):
            if streamed:
                with second_c.responses.stream(
                    model="codex", input=f"more {turn}", previous_response_id=previous
                ) as stream:
                    final = stream.get_final_response()
                # (the stream's provider: the one whose stats know the new id)
                previous = final.id
                landed.append((began, _holder(gw, previous)))
            else:
                raw = second_c.responses.with_raw_response.create(
                    model="codex", input=f"more {turn}", previous_response_id=previous
                )
                previous = raw.parse().id
                landed.append((began, raw.headers["x-router-provider"]))
    first_c.close()
    second_c.close()
    assert len({began for began, _ in landed}) == 3  # the conversations were spread
    assert all(began == went for began, went in landed)
    assert sum(gw.mocks[p].stats()["previous_not_found"] for p in PROVIDERS) == 0


def _holder(gw: Gateway, response_id: str) -> str:
    """The provider that stored ``response_id`` (asked through the gateway's GET)."""
    r = httpx.get(
        f"{gw.urls[1]}/v1/responses/{response_id}",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert r.status_code == 200, r.text
    return r.headers["x-router-provider"]


def test_stored_responses_are_read_and_deleted_from_any_replica(gw: Gateway) -> None:
    with client(gw.urls[0]) as c0, client(gw.urls[1]) as c1:
        made = c0.responses.create(model="codex", input="keep this")
        got = c1.responses.retrieve(made.id)
        assert got.id == made.id
        assert got.output_text == TEXT
        with client(gw.urls[1], OTHER_KEY) as other:  # another tenant cannot see it
            with pytest.raises(openai.NotFoundError):
                other.responses.retrieve(made.id)
            with pytest.raises(openai.BadRequestError) as foreign:
                other.responses.create(model="codex", input="x", previous_response_id=made.id)
            assert foreign.value.code == "previous_response_not_found"
        c1.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            c0.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            c0.responses.retrieve("resp_never_made_here")


def test_the_pinned_provider_out_of_service_is_a_clear_error(gw: Gateway) -> None:
    with client(gw.urls[0]) as c0, client(gw.urls[1]) as c1:
        raw = c0.responses.with_raw_response.create(model="codex", input="start")
        holder, previous = raw.headers["x-router-provider"], raw.parse().id
        drained = httpx.post(
            f"{gw.urls[0]}/admin/providers/{holder}/drain",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert drained.status_code == 200
        with pytest.raises(openai.InternalServerError) as err:
            c1.responses.create(model="codex", input="more", previous_response_id=previous)
        assert err.value.status_code == 503
        assert err.value.code == "pinned_provider_unavailable"
        assert holder in str(err.value.message)
        with pytest.raises(openai.InternalServerError):
            c1.responses.retrieve(previous)
        # a new conversation goes elsewhere
        fresh = c1.responses.with_raw_response.create(model="codex", input="new")
        assert fresh.headers["x-router-provider"] != holder


def test_targets_that_serve_no_responses_are_skipped(gw: Gateway) -> None:
    with client(gw.urls[0]) as c:
        for _ in range(4):
            raw = c.responses.with_raw_response.create(model="mixed", input="x")
            assert raw.headers["x-router-provider"] == "b"
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="no-responses", input="x")
    assert "Responses API" in str(err.value.message)


def test_bad_input_is_a_400_naming_the_field(gw: Gateway) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": "x"}, "model"),
        ({"model": "codex", "input": 5}, "input"),
        ({"model": "codex", "input": "x", "previous_response_id": "a b"}, "previous_response_id"),
        ({"model": "codex", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ]
    for body, param in cases:
        r = httpx.post(f"{gw.urls[0]}/v1/responses", headers=headers, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    counts = itertools.chain.from_iterable(gw.mocks[p].stats()["by_status"] for p in PROVIDERS)
    assert "400" not in set(counts)  # refused before any provider was asked
