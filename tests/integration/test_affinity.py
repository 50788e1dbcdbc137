"""Affinity across two replicas on a real Redis: requests sharing a key (a session header, a
prompt prefix, Claude Code's metadata.user_id) land on the target that served the first of
them while it has room; with that target full they spill, and none is refused for affinity's
sake; pins are visible in ``routerctl state`` and counted in the metrics."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CLIENT_KEY, Cluster, Gateway, Mock, ctl, start_gateway

PROVIDERS = ("a", "b", "c")
HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}


def gateway(
    cluster: Cluster, tmp: Path, redis_url: str, key: str, strategy: str = "round_robin",
    limits: dict[str, Any] | None = None, latency_ms: int = 0,
) -> Gateway:  # fmt: skip
    extra = {"limits": limits} if limits else {}
    mocks = [
        Mock(p, "--completion-tokens", "3", "--latency-ms", str(latency_ms), **extra)
        for p in PROVIDERS
    ]
    targets = [{"provider": p, "model": "m"} for p in PROVIDERS]
    routes = [{"model": "chat", "strategy": strategy, "targets": targets, "affinity": {"key": key}}]
    return start_gateway(cluster, tmp, redis_url, mocks, routes, replicas=2)


def chat(
    url: str, content: str, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload = {"model": "chat", "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=payload,
        headers={**HEADERS, **(headers or {})},
        timeout=30,
    )


def test_sessions_stay_on_their_target_over_both_replicas(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """200 requests of 20 sessions, alternating replicas, round robin underneath (which alone
    would rotate every session over all three targets)."""
    gw = gateway(cluster, tmp_path, redis_url, "header:x-session-id")
    landed: dict[str, list[str]] = collections.defaultdict(list)
    for k in range(200):
        session = f"session-{k % 20}"
        r = chat(gw.urls[k % 2], "hi", {"x-session-id": session})
        assert r.status_code == 200, r.text
        landed[session].append(r.headers["x-router-provider"])
    on_pin = sum(went.count(went[0]) for went in landed.values())
    print(f"\n{on_pin}/200 on the session's pinned target; sessions per target "
          f"{collections.Counter(went[0] for went in landed.values())}")  # fmt: skip
    assert on_pin >= 198
    assert len({went[0] for went in landed.values()}) == 3  # spread by consistent hashing
    # a request without the key is placed by the strategy alone
    assert {chat(gw.urls[0], "hi").headers["x-router-provider"] for _ in range(6)} == set(PROVIDERS)
    counts = affinity_counts(gw.urls[0]) + affinity_counts(gw.urls[1])
    assert counts["new"] == 20
    assert counts["hit"] >= 178
    # the decision log says when a pin decided (and the key's value never shows)
    logged = "".join(proc.output() for proc, _ in gw.replicas)
    assert '"pin":"hit"' in logged
    assert '"pin":"new"' in logged
    assert "its affinity pin" in logged
    assert "session-1" not in logged
    state = json.loads(ctl(gw, "state", "--json"))
    pins = {p["name"]: p["pins"] for p in state["providers"]}
    assert sum(pins.values()) == 20
    assert "pins" in ctl(gw, "state")


def test_a_full_pinned_target_spills_and_nothing_is_refused(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    """One session sends 12 requests at once to targets that take 2 each: its pinned target
    takes 2, the rest go elsewhere while it is full; none is refused."""
    gw = gateway(
        cluster, tmp_path, redis_url, "header:x-session-id",
        limits={"max_in_flight": 2}, latency_ms=400,
    )  # fmt: skip
    pinned = chat(gw.urls[0], "hi", {"x-session-id": "s1"}).headers["x-router-provider"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={**HEADERS, "x-session-id": "s1"}, timeout=30) as c:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(
                *(c.post(f"{gw.urls[k % 2]}/v1/chat/completions", json=body) for k in range(6))
            )

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 6
    went = collections.Counter(r.headers["x-router-provider"] for r in answers)
    assert went[pinned] == 2
    assert sum(went.values()) == 6
    counts = affinity_counts(gw.urls[0]) + affinity_counts(gw.urls[1])
    assert counts["spilled"] >= 2  # the pin moves with a spill: 2 spills, 2 hits each
    assert all(gw.mocks[p].stats()["rate_limited"] == 0 for p in PROVIDERS)


def test_prefix_affinity_keeps_identical_prompts_together(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    gw = gateway(cluster, tmp_path, redis_url, "prefix")
    system = {"role": "system", "content": "You are a coding agent. " * 50}
    landed: dict[int, set[str]] = collections.defaultdict(set)
    for k in range(60):
        prompt = k % 6
        messages = [
            system,
            {"role": "user", "content": f"project {prompt}: read the repository"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": f"turn {k}"},  # later turns differ: not in the prefix
        ]
        r = httpx.post(
            f"{gw.urls[k % 2]}/v1/chat/completions",
            json={"model": "chat", "messages": messages},
            headers=HEADERS,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        landed[prompt].add(r.headers["x-router-provider"])
    assert all(len(went) == 1 for went in landed.values()), landed
    assert len(set.union(*landed.values())) >= 2  # distinct prefixes spread


def test_claude_codes_user_id_pins_its_session(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    mocks = [Mock(p, "--completion-tokens", "3", api="anthropic") for p in PROVIDERS]
    targets = [{"provider": p, "model": "claude-sonnet"} for p in PROVIDERS]
    routes = [{"model": "claude", "targets": targets,
               "affinity": {"key": "body:metadata.user_id", "ttl_s": 3600}}]  # fmt: skip
    gw = start_gateway(cluster, tmp_path, redis_url, mocks, routes, replicas=2)
    landed: dict[str, set[str]] = collections.defaultdict(set)
    for k in range(40):
        user = f"user_abc_account__session_{k % 4}"
        with anthropic.Anthropic(base_url=gw.urls[k % 2], api_key=CLIENT_KEY, max_retries=0) as c:
            raw = c.messages.with_raw_response.create(
                model="claude",
                max_tokens=50,
                messages=[{"role": "user", "content": "hi"}],
                metadata={"user_id": user},
            )
        landed[user].add(raw.headers["x-router-provider"])
    assert all(len(went) == 1 for went in landed.values()), landed


def affinity_counts(url: str) -> collections.Counter[str]:
    """``router_affinity_total`` by outcome."""
    out: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "router_affinity_total":
                out[s.labels["outcome"]] += int(s.value)
    return out
