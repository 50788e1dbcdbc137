"""Rendering a hand-made cluster state, and the stable keys of its JSON form."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rich.console import Console, RenderableType

from router.ctl.tables import humanize, render_keys, render_state
from router.state.cluster import (
    ClusterState,
    HealthdState,
    KeyInfo,
    ProviderState,
    QueueState,
    ReplicaState,
    RouteState,
    TargetState,
    WaitingState,
    state_json,
    waiting_counts,
)

NOW = 1_795_000_000_000

IDLE = ProviderState(
    name="fast", kind="openai", weight=1, health="up", health_since_ms=NOW - 180_000,
    last_error=None, probe_latency_ms=12.5, circuit="closed", circuit_until_ms=None,
    cooldown_until_ms=0, drained=False, in_flight=1, max_in_flight=4, rpm_used=3,
    rpm_limit=100, tpm_used=250, tpm_limit=None, ttft_ewma_ms=42.5, tpot_ewma_ms=2.25,
    outcomes={"ok": 3},
)  # fmt: skip
BROKEN = replace(
    IDLE, name="claude", kind="anthropic", health="down", health_since_ms=NOW - 7_200_000,
    last_error="connect error", circuit="open", circuit_until_ms=NOW + 12_000,
    cooldown_until_ms=NOW + 4_000, drained=True, in_flight=0, max_in_flight=None, rpm_used=0,
    rpm_limit=None, ttft_ewma_ms=None, tpot_ewma_ms=None, outcomes={"ok": 1, "timeout": 5},
)  # fmt: skip
ODD = replace(IDLE, name="[bold]x:a:", health="unknown", health_since_ms=None)
STATE = ClusterState(
    schema=1, taken_at_ms=NOW, pool="default", key_prefix="rc", health_version=9,
    providers=(IDLE, BROKEN, ODD),
    routes=(RouteState("chat", "weighted", (TargetState("fast", "m", 5),
                                            TargetState("claude", "c", 1))),
            RouteState("batch", "least_connections", (TargetState("fast", "m", 1),),
                       QueueState(5.0, 100, 0)),
            RouteState("queued", "round_robin", (TargetState("fast", "m", 1),),
                       QueueState(30.0, 10_000, 4, (WaitingState("urgent", 1, 1),
                                                    WaitingState("team-a", 0, 2),
                                                    WaitingState("team-b", -1, 1))))),
    replicas=(ReplicaState("host-1-abc", "host", 11, "0.1.0", NOW // 1000 - 3600, NOW - 400,
                           0.4),),
    healthd=HealthdState("hd-1", 7),
)  # fmt: skip


def text_of(renderable: RenderableType) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def test_the_table_shows_every_figure_of_a_route() -> None:
    out = text_of(render_state(STATE))
    assert "route chat (weighted)" in out
    assert "pool default · prefix rc · health version 9" in out
    row = next(line for line in out.splitlines() if " fast " in line)
    for cell in ("5", "up 3m", "closed", "no", "1/4", "3/100", "250/∞", "42", "2.2"):
        assert f" {cell} " in row
    row = next(line for line in out.splitlines() if " claude " in line)
    for cell in ("down 2h", "open 12s, cooling 4.0s", "DRAINED", "0/∞", "0/∞", " - "):
        assert cell in row


def test_replicas_healthd_and_unrouted_providers() -> None:
    out = text_of(render_state(STATE))
    assert "1 live replicas" in out
    row = next(line for line in out.splitlines() if "host-1-abc" in line)
    assert " 1h " in row
    assert "0.4s ago" in row
    assert "healthd: leader hd-1, epoch 7" in out
    assert "providers no route uses" in out
    assert "[bold]x:a:" in out  # names are shown as they are: no markup, no emoji
    no_leader = replace(STATE, healthd=HealthdState(None, 0), replicas=())
    assert "healthd: no leader, epoch 0" in text_of(render_state(no_leader))


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-1, "0.0s"), (0.42, "0.4s"), (9.96, "10s"), (42, "42s"), (180, "3m"), (7300, "2h"),
     (3 * 86400, "3d")],
)  # fmt: skip
def test_humanize(seconds: float, shown: str) -> None:
    assert humanize(seconds) == shown


def test_keys_table_shows_type_ttl_and_absence() -> None:
    keys = [
        KeyInfo("rc:{default}:provider:a", "hash", None, "provider a"),
        KeyInfo("rc:{default}:provider:a:leases", "none", None, "leases of a"),
        KeyInfo("rc:{default}:replica:r1", "hash", 14_200, "replica r1"),
    ]
    out = text_of(render_keys(keys))
    assert "2 keys present" in out
    rows = {line.split()[1]: line.split()[3:6:2] for line in out.splitlines() if " rc:" in line}
    assert rows["rc:{default}:provider:a"] == ["hash", "none"]
    assert rows["rc:{default}:provider:a:leases"] == ["none", "-"]
    assert rows["rc:{default}:replica:r1"] == ["hash", "14s"]


def test_the_json_schema_is_stable() -> None:
    data = state_json(STATE)
    assert json.loads(json.dumps(data)) == data  # plain JSON: lists, not tuples
    assert list(data) == [
        "schema", "taken_at_ms", "pool", "key_prefix", "health_version", "providers",
        "routes", "replicas", "healthd", "shard",
    ]  # fmt: skip
    assert list(data["providers"][0]) == [
        "name", "kind", "weight", "health", "health_since_ms", "last_error",
        "probe_latency_ms", "circuit", "circuit_until_ms", "cooldown_until_ms", "drained",
        "in_flight", "max_in_flight", "rpm_used", "rpm_limit", "tpm_used", "tpm_limit",
        "ttft_ewma_ms", "tpot_ewma_ms", "outcomes", "pins",
    ]  # fmt: skip
    assert data["routes"][0] == {
        "model": "chat", "strategy": "weighted",
        "targets": [{"provider": "fast", "model": "m", "weight": 5},
                    {"provider": "claude", "model": "c", "weight": 1}],
        "queue": None,
    }  # fmt: skip
    assert data["routes"][2]["queue"] == {
        "timeout_s": 30.0, "max_queue": 10_000, "waiting": 4,
        "by_tenant": [{"tenant": "urgent", "priority": 1, "count": 1},
                      {"tenant": "team-a", "priority": 0, "count": 2},
                      {"tenant": "team-b", "priority": -1, "count": 1}],
    }  # fmt: skip
    assert list(data["replicas"][0]) == [
        "id", "host", "pid", "version", "started", "last_seen_ms", "age_s",
    ]  # fmt: skip
    assert data["healthd"] == {"leader": "hd-1", "epoch": 7}
    assert data["providers"][1]["outcomes"] == {"ok": 1, "timeout": 5}


def test_each_queued_route_shows_who_waits_per_tenant_and_priority() -> None:
    lines = text_of(render_state(STATE)).splitlines()
    title = next(i for i, x in enumerate(lines) if "route queued: waiting 4/10000" in x)
    assert title > next(i for i, x in enumerate(lines) if "route queued (round_robin)" in x)
    rows = [line.split()[1:6:2] for line in lines[title + 4 : title + 7]]
    assert rows == [["urgent", "1", "1"], ["team-a", "0", "2"], ["team-b", "-1", "1"]]
    assert "route batch: waiting 0/100" in lines
    assert not any(x.startswith("route chat:") for x in lines)  # it never waits


def test_the_waiting_gauge_reads_every_route_tenant_and_priority() -> None:
    assert waiting_counts(STATE) == {
        ("queued", "urgent", 1): 1, ("queued", "team-a", 0): 2, ("queued", "team-b", -1): 1,
    }  # fmt: skip
