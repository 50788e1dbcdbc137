"""``routerctl state`` in a pipe or a log is 80 columns wide: nothing is cut to an ellipsis.

Long provider names, replica ids and hosts as a real deployment has them, and figures in the
millions: at 80 columns every header and every figure is there in full (a name may fold
onto more lines); where the console is wide, one table per route as before.
"""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console, RenderableType

from router.ctl.tables import render_keys, render_state
from router.state.cluster import (
    ClusterState,
    HealthdState,
    KeyInfo,
    ProviderState,
    ReplicaState,
    RouteState,
    TargetState,
)

NOW = 1_795_000_000_000
AZURE = ProviderState(
    name="azure-openai-eastus2-gpt-4o-prod", kind="openai", weight=500, health="up",
    health_since_ms=NOW - 180_000, last_error=None, probe_latency_ms=12.5, circuit="closed",
    circuit_until_ms=None, cooldown_until_ms=0, drained=False, in_flight=512,
    max_in_flight=1024, rpm_used=12345, rpm_limit=20000, tpm_used=1987654,
    tpm_limit=2000000, ttft_ewma_ms=1234.5, tpot_ewma_ms=12.25, outcomes={"ok": 3},
)  # fmt: skip
CLAUDE = replace(
    AZURE, name="anthropic-claude-3-5-sonnet-backup", kind="anthropic", weight=1,
    health="down", health_since_ms=NOW - 7_200_000, circuit="half",
    circuit_until_ms=NOW + 12_000, cooldown_until_ms=NOW + 4_000, drained=True, in_flight=0,
    max_in_flight=None, rpm_used=99999, rpm_limit=None, tpm_used=123456789, tpm_limit=None,
    ttft_ewma_ms=None, tpot_ewma_ms=None,
)  # fmt: skip
SPARE = replace(AZURE, name="openai-spare-capacity-us-west-3", weight=7)
STATE = ClusterState(
    schema=1, taken_at_ms=NOW, pool="production-eu", key_prefix="router-cluster",
    health_version=123456, providers=(AZURE, CLAUDE, SPARE),
    routes=(RouteState("gpt-4o-mini-2024-07-18-with-a-long-alias", "least_connections",
                       (TargetState(AZURE.name, "gpt-4o", 500),
                        TargetState(CLAUDE.name, "claude-3-5-sonnet", 1))),),
    replicas=(ReplicaState("router-7d9f8c6b5-x2x7k-1a2b3c4d",
                           "ip-10-0-12-34.eu-west-1.compute.internal", 1234567,
                           "0.1.0+g1234abc.dirty", NOW // 1000 - 3600, NOW - 400, 0.4),),
    healthd=HealthdState("healthd-5f6d7c8b9-abcde-9f8e7d6c", 42),
)  # fmt: skip
FIGURES = (
    "512/1024", "12345/20000", "1987654/2000000", "1234", "12", "500",
    "0/∞", "99999/∞", "123456789/∞", "1234567", "up 3m", "down 2h", "half 12s, cooling 4.0s",
    "DRAINED", "0.4s ago",
)  # fmt: skip
HEADERS = ("provider", "weight", "health", "drained", "in flight", "RPM", "TPM", "TTFT ms")
HEADERS += ("TPOT ms", "replica", "host", "pid", "version", "last heartbeat")


def text_at(width: int, renderable: RenderableType) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


def first_column(out: str) -> str:
    """The first column's cells, joined: a name folded onto several lines is whole again."""
    return "".join(line.split("│")[1].strip() for line in out.splitlines() if line[:1] == "│")


def test_at_80_columns_nothing_is_cut() -> None:
    out = text_at(80, render_state(STATE, "redis://user:pw@redis.internal.example.com:6379/0"))
    print(out)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for figure in FIGURES:
        assert figure in out, figure
    for header in HEADERS:
        assert header in out, header
    names = first_column(out)
    for name in (AZURE.name, CLAUDE.name, SPARE.name, "router-7d9f8c6b5-x2x7k-1a2b3c4d"):
        assert name in names, name


def test_narrow_splits_each_route_in_two_wide_keeps_one_table() -> None:
    narrow = text_at(80, render_state(STATE))
    title = "route gpt-4o-mini-2024-07-18-with-a-long-alias (least_connections)"
    assert f"{title}: status" in narrow
    assert f"{title}: load" in narrow
    assert "providers no route uses: load" in narrow
    wide = text_at(220, render_state(STATE))
    assert f"{title}: status" not in wide
    row = next(line for line in wide.splitlines() if AZURE.name in line)
    for cell in ("500", "up 3m", "closed", "no", "512/1024", "12345/20000", "1987654/2000000"):
        assert f" {cell} " in row


def test_the_keys_table_fits_80_columns() -> None:
    name = "router-cluster:{production-eu}:provider:azure-openai-eastus2-gpt-4o-prod:leases"
    keys = [KeyInfo(name, "zset", 86_400_000, "leases in flight, by expiry (ms)")]
    out = text_at(80, render_keys(keys))
    assert "…" not in out
    assert name in first_column(out)
    assert "1d" in out
