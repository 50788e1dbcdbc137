"""``loadtest.front_ab``'s fronts and the commands it builds (no server started: granian's own
command line parses the argv, without running it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadtest.bench import router_config
from loadtest.front_ab import (
    GRANIAN_MIN_BUFFER,
    UVICORN,
    Front,
    fronts,
    granian_argv,
    order,
    parse_args,
    ratios,
)
from router.config import Config

granian_cli = pytest.importorskip("granian.cli")


def _cfg(**changes: object) -> Config:
    cfg = Config.model_validate(router_config(1, [2, 3, 4], 5, "OFF"))
    return cfg.model_copy(update=changes)


def _parsed(argv: list[str]) -> dict[str, object]:
    assert argv[:3] == [sys.executable, "-m", "granian"]
    ctx = granian_cli.cli.make_context("granian", argv[3:])
    return dict(ctx.params)


def test_granian_serves_our_app_factory_on_one_worker_http1_without_access_log() -> None:
    p = _parsed(granian_argv(18080, _cfg(), "asgi", 1))
    assert p["app"] == "loadtest.granian_front:app"
    assert p["factory"] is True
    assert (p["host"], p["port"], p["workers"], p["runtime_threads"]) == ("127.0.0.1", 18080, 1, 1)
    assert str(p["interface"]) in ("asgi", "Interfaces.ASGI")
    assert str(p["http"]) in ("1", "HTTPModes.http1")
    assert str(p["loop"]) in ("uvloop", "Loops.uvloop")
    assert p["log_access_enabled"] is False
    assert p["websockets"] is False


def test_granian_bounds_the_head_like_our_config_says() -> None:
    p = _parsed(granian_argv(1, _cfg(read_timeout_s=2.5, max_head_bytes=32 * 1024), "asgi", 1))
    assert p["http1_header_read_timeout"] == 2500
    assert p["http1_buffer_size"] == 32 * 1024


def test_granian_bounds_stay_in_its_ranges() -> None:
    p = _parsed(granian_argv(1, _cfg(read_timeout_s=600.0, max_head_bytes=1024), "asgi", None))
    assert p["http1_header_read_timeout"] == 60_000
    assert p["http1_buffer_size"] == GRANIAN_MIN_BUFFER


def test_no_thread_count_leaves_granians_default() -> None:
    argv = granian_argv(1, _cfg(), "asgi", None)
    assert "--runtime-threads" not in argv


def test_rsgi_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="RSGI app"):
        granian_argv(1, _cfg(), "rsgi", 1)
    assert parse_args(["--interfaces", "asgi", "rsgi"]).interfaces == ["asgi"]


def test_the_router_front_is_the_router_command() -> None:
    argv = Front(UVICORN).argv(Path("/c.yaml"), _cfg(), 9000)
    assert argv == [sys.executable, "-m", "router.cli", "--config", "/c.yaml",
                    "--host", "127.0.0.1", "--port", "9000"]  # fmt: skip


def test_fronts_are_uvicorn_then_one_granian_per_thread_count() -> None:
    names = [f.name for f in fronts(["asgi"], [1, 0])]
    assert names == ["uvicorn", "granian-asgi-t1", "granian-asgi-default"]
    assert [f.runtime_threads for f in fronts(["asgi"], [1, 0])] == [None, 1, None]


def test_tunings_add_granian_fronts_with_their_flags() -> None:
    got = fronts(["asgi"], [1], ["plain", "rust-tasks", "st"])
    names = ["uvicorn", "granian-asgi-t1", "granian-asgi-t1-rust-tasks", "granian-asgi-t1-st"]
    assert [f.name for f in got] == names
    assert str(_parsed(got[2].argv(Path("c"), _cfg(), 1))["task_impl"]) in ("rust", "TaskImpl.rust")
    assert str(_parsed(got[3].argv(Path("c"), _cfg(), 1))["runtime_mode"]) in (
        "st",
        "RuntimeModes.st",
    )
    assert "--task-impl" not in got[1].argv(Path("c"), _cfg(), 1)


def test_the_order_flips_every_round() -> None:
    assert [order(["a", "b"], k)[0] for k in range(4)] == ["a", "b", "a", "b"]


def test_ratios_are_the_mean_of_the_rounds() -> None:
    got = ratios({"uvicorn": [100.0, 200.0], "g": [110.0, 180.0]}, "uvicorn")
    assert got == {"g": pytest.approx((1.1 + 0.9) / 2)}


def test_defaults_and_nonsense() -> None:
    args = parse_args([])
    assert (args.rounds, args.duration, args.interfaces, args.granian_threads) == (
        4, 8.0, ["asgi"], [1])  # fmt: skip
    for bad in (["--rounds", "0"], ["--duration", "0"], ["--granian-threads", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
