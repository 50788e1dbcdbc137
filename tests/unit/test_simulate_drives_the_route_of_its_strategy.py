"""``routerctl simulate --strategy S`` drives the route that uses S, and says which it drove.

Before, without ``--host`` it drove the config's first route with its strategy replaced
(``--strategy weighted`` on ``examples/simulate.yaml`` ran ``sim-round-robin``), and the chart
was titled "weighted on sim-round-robin".
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from loadtest.simulate import (
    UsageError,
    _received_plot,
    check_listening,
    pick_route,
    render,
    title,
)
from router.config import Strategy, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "simulate.yaml"
CFG = load_config(EXAMPLE, resolve=False)
ROUTES = {
    Strategy.ROUND_ROBIN: "sim-round-robin",
    Strategy.WEIGHTED: "sim-weighted",
    Strategy.LEAST_CONNECTIONS: "sim-least-connections",
    Strategy.LEAST_LATENCY: "sim-least-latency",
    Strategy.HEADROOM: "sim-headroom",
}


@pytest.mark.parametrize("fixed", [False, True], ids=["local", "host"])
@pytest.mark.parametrize("strategy", list(Strategy))
def test_the_strategy_picks_its_route(strategy: Strategy, fixed: bool) -> None:
    assert pick_route(CFG, strategy, None, fixed).model == ROUTES[strategy]


def test_the_route_alone_runs_its_own_strategy() -> None:
    assert pick_route(CFG, None, "sim-headroom", fixed=True).strategy is Strategy.HEADROOM


def test_a_route_and_another_strategy_only_without_host() -> None:
    route = pick_route(CFG, Strategy.WEIGHTED, "sim-round-robin", fixed=False)
    assert route.model == "sim-round-robin"
    with pytest.raises(UsageError, match="uses round_robin, not weighted"):
        pick_route(CFG, Strategy.WEIGHTED, "sim-round-robin", fixed=True)


def test_no_route_of_the_strategy_lists_the_routes() -> None:
    only = CFG.model_copy(update={"routes": CFG.routes[:2]})
    with pytest.raises(UsageError) as exc:
        pick_route(only, Strategy.HEADROOM, None, fixed=True)
    assert str(exc.value).startswith(
        "no route uses headroom; the config's routes: sim-round-robin (round_robin), "
        "sim-weighted (weighted)"
    )
    with pytest.raises(UsageError, match="no route 'nope' in the config; its routes: sim-round"):
        pick_route(CFG, None, "nope", fixed=False)
    with pytest.raises(UsageError, match="pass --strategy or --route"):
        pick_route(CFG, None, None, fixed=False)


def report(**changes: Any) -> dict[str, Any]:
    row = {
        "name": "alpha", "received": 25, "share": 0.1667, "expected": 25.0,
        "expected_share": 0.1667, "in_flight_peak": 2, "in_flight_limit": None,
        "rpm_peak": 25, "rpm_limit": 600, "tpm_peak": 600, "tpm_limit": 60000, "binding": "rpm",
        "rate_limited": 0,
    }  # fmt: skip
    return {
        "strategy": "weighted", "route": "sim-weighted", "replaced": False,
        "configured_strategy": "weighted", "host": "http://127.0.0.1:8080", "requests": 150,
        "concurrency": 8, "duration_s": 1.5, "statuses": {"200": 150}, "errors": [],
        "expectation": "weight shares 1:2:3", "state_samples": 3, "providers": [row],
        **changes,
    }  # fmt: skip


def test_the_table_and_the_chart_are_titled_by_the_route() -> None:
    assert title(report()) == "route sim-weighted (weighted)"
    assert render(report()).startswith("simulate route sim-weighted (weighted): 150 requests")
    replaced = report(route="sim-round-robin", replaced=True, configured_strategy="round_robin")
    assert title(replaced) == (
        "route sim-round-robin (weighted, in place of its round_robin in a copy of the config)"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    _received_plot(ax, report())
    assert ax.get_title().startswith("route sim-weighted (weighted): requests per provider")
    plt.close(fig)


def test_a_provider_where_nothing_listens_is_named_before_driving() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(
            UsageError, match=f"nothing listens for fast at http://127.0.0.1:{port}"
        ):
            check_listening({"fast": f"http://127.0.0.1:{port}"}, "sim.yaml")
