"""One replica of two checkouts, alternated in one rig: is a change slower?

    python -m loadtest.ab BASE_DIR [--rounds 4] [--duration 8] [--route round_robin ...]

Wall-clock figures on a shared VM drift by tens of percent between runs; a change is only
judged against its base measured in the same rig, alternately (base, new, base, new, ...),
against the same nginx upstream and Redis (``loadtest.bench``'s rig and placement: the
replica alone on core 0). ``BASE_DIR`` is a checkout of the base (``git worktree add``);
this checkout is the new one. Each round runs wrk at 32 connections on each route named
(round_robin by default; ``affinity`` is a route with a session pin on ``body:user``, which
only the new checkout has, if it knows affinity). Prints requests/s per round, the router's CPU
seconds per 1,000 requests, the Redis calls per request and the server time per script call,
then the means and the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

from loadtest.bench import (
    CLIENT_KEY,
    SUT_CPU,
    WRK_LUA,
    Load,
    Meter,
    Rig,
    Sut,
    free_port,
    router_config,
    run_wrk,
    start_router,
    start_upstreams,
)

AFFINITY_ROUTE = "affinity"


def config(rig: Rig, up: Any, name: str, affinity: bool) -> Path:
    cfg = router_config(up.redis_port, up.ports, up.mock_port, "OFF")
    if affinity:
        targets = cfg["routes"][0]["targets"]
        cfg["routes"].append(
            {"model": AFFINITY_ROUTE, "targets": targets, "affinity": {"key": "body:user"}}
        )
    path = rig.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def script(rig: Rig, route: str) -> Path:
    body: dict[str, Any] = {
        "model": route,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16,
    }
    if route == AFFINITY_ROUTE:
        body["user"] = "session-1"
    path = rig.dir / f"ab-{route}.lua"
    text = WRK_LUA.replace("__BODY__", orjson.dumps(body).decode()).replace("__KEY__", CLIENT_KEY)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="a checkout of the base")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--route", action="append", help="routes to load (round_robin)")
    args = parser.parse_args(argv)
    routes = args.route or ["round_robin"]
    new = Path(__file__).resolve().parent.parent
    results: dict[tuple[str, str], list[float]] = {}
    calls: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, Rig(Path(tmp)) as rig:
        up = start_upstreams(rig)
        for k in range(args.rounds):
            for label, tree in (("base", args.base.resolve()), ("new", new)):
                cfg = config(rig, up, label, affinity=label == "new")
                port = free_port()
                env_path = {"PYTHONPATH": str(tree)}
                proc = start_router_at(rig, cfg, port, label, env_path)
                for route in routes:
                    if route == AFFINITY_ROUTE and label == "base":
                        continue
                    load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", script(rig, route))
                    sut = Sut(label, route, load, up.stub_port, [proc.pid], up.redis_port,
                              up.redis_pid, "router core 0, wrk core 1")  # fmt: skip
                    run_wrk(load, 32, 1.0)
                    meter = Meter(sut)
                    res = run_wrk(load, 32, args.duration)
                    figures = meter.figures()
                    results.setdefault((label, route), []).append(res.rps)
                    calls.setdefault((label, route), []).append(figures["redis_calls_per_req"])
                    cpu.setdefault((label, route), []).append(figures["cpu_s_per_1k"])
                    per_req = figures["redis_calls_per_req"]
                    print(f"round {k + 1} {label:4} {route:12} {res.rps:8.0f} req/s  "
                          f"{figures['cpu_s_per_1k']:.4f} CPU s/1k  {per_req} Redis calls/req "
                          f"{figures['redis_usec_per_evalsha']} us/script", flush=True)  # fmt: skip
                rig.stop(proc)
    print()
    for (label, route), rps in sorted(results.items()):
        print(f"{label:4} {route:12} mean {statistics.mean(rps):8.0f} req/s "
              f"(min {min(rps):.0f}, max {max(rps):.0f}); router CPU s/1k "
              f"{statistics.mean(cpu[(label, route)]):.4f}; Redis calls/req "
              f"{statistics.mean(calls[(label, route)]):.3f}")  # fmt: skip
    for route in routes:
        if ("base", route) in results and ("new", route) in results:
            b, n = (
                statistics.mean(results[("base", route)]),
                statistics.mean(results[("new", route)]),
            )
            print(f"{route}: new/base {n / b:.3f}")
    return 0


def start_router_at(rig: Rig, cfg: Path, port: int, name: str, env: dict[str, str]) -> Any:
    """``start_router`` with the checkout on PYTHONPATH (its ``router`` package is imported)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    try:
        return start_router(rig, cfg, port, SUT_CPU, f"router-{name}")
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


if __name__ == "__main__":
    sys.exit(main())
