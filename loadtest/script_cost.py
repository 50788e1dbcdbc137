"""What one acquire costs Redis, in CPU instructions: deterministic, unlike timings.

    python -m loadtest.script_cost [--n 2000] [--shape NAME ...]

For each shape (a strategy, a number of targets, with or without an affinity pin) it runs a
redis-server under ``valgrind --tool=callgrind`` (``--hz 1``: its timer's work, which grows with
the slowed run's length, out of the way), loads every script as a replica does, makes 300
warm-up calls, then N calls of that shape in one pipeline, and shuts the server down; then the
same with no measured call. The difference of the two runs' instruction counts (callgrind's Ir)
over N is one call's cost: the script, Redis reading the command and writing the answer, and
its share of Lua's garbage collection (Redis steps the collector every 50 calls, and a step
walks every loaded script's prototypes: a script's size costs each call a little, run or not).
Two runs of a shape agree within about 0.5 %. Needs valgrind (``apt-get install -y valgrind``).

Every call takes the same lease (the target's lease count stays at one) and no target has a
limit, so each call of a shape does the same work. The shapes with a pin write give each call
its own key (a pin made, or moved off a drained target, every time).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from loadtest.procs import free_port
from router.config import Config, TenantSpec, parse_config
from router.state.affinity import PinRequest
from router.state.keys import Keys
from router.state.store import SCRIPTS, RoutePlan, Store, TenantPlan, _script

WARM = 300
TENANT = TenantSpec.model_validate({
    "name": "bench", "budget": {"usd": 1_000_000, "period": "month"},
    "limits": {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6},
})  # fmt: skip
KEYS = Keys("rc", "default")


@dataclass(frozen=True)
class Shape:
    """One kind of acquire call: its route, and the pin each call carries (by call number)."""

    name: str
    strategy: str
    targets: int
    pin: Callable[[int], PinRequest | None] = lambda i: None
    drained_first: bool = False
    """The first target is drained (its pins move off it)."""
    tenant: bool = False
    """Each call also checks and charges a tenant with an RPM, TPM and in-flight limit and a
    budget (none of which binds)."""


def _preferred(value: str, n: int) -> PinRequest:
    names = [f"p{j}" for j in range(n)]
    return PinRequest.preferred("m", value, names, ttl_s=3600, load_factor=1.25)


SHAPES = (
    Shape("no blocks, round_robin, 2 targets", "round_robin", 2),
    Shape("no blocks, round_robin, 10 targets", "round_robin", 10),
    Shape("tenant, round_robin, 10 targets", "round_robin", 10, tenant=True),
    Shape("tenant, headroom, 10 targets", "headroom", 10, tenant=True),
    Shape("no blocks, headroom, 10 targets", "headroom", 10),
    Shape("tenant, least_connections, 10 targets", "least_connections", 10, tenant=True),
    Shape("no blocks, weighted, 10 targets", "weighted", 10),
    Shape("tenant, weighted, 10 targets", "weighted", 10, tenant=True),
    Shape("no blocks, least_latency, 10 targets", "least_latency", 10),
    Shape("tenant, least_latency, 10 targets", "least_latency", 10, tenant=True),
    Shape("no blocks, least_connections, 2 targets", "least_connections", 2),
    Shape("no blocks, least_connections, 10 targets", "least_connections", 10),
    Shape("pin hit, round_robin, 2 targets", "round_robin", 2, lambda i: _preferred("hot", 2)),
    Shape("pin hit, round_robin, 10 targets", "round_robin", 10, lambda i: _preferred("hot", 10)),
    Shape(
        "pin hit, least_connections, 10 targets",
        "least_connections",
        10,
        lambda i: _preferred("hot", 10),
    ),
    Shape("pin new, round_robin, 2 targets", "round_robin", 2, lambda i: _preferred(f"k{i}", 2)),
    Shape(
        "pin new, least_connections, 10 targets",
        "least_connections",
        10,
        lambda i: _preferred(f"k{i}", 10),
    ),
    Shape(
        "pin moved, round_robin, 2 targets",
        "round_robin",
        2,
        lambda i: _preferred(f"k{i}", 2),
        drained_first=True,
    ),
)


def _config(shape: Shape) -> Config:
    data = {
        "client_keys": [{"env": "K"}],
        "providers": [
            {"name": f"p{j}", "kind": "openai", "base_url": "http://x/v1"}
            for j in range(shape.targets)
        ],
        "routes": [
            {
                "model": "m",
                "strategy": shape.strategy,
                "targets": [{"provider": f"p{j}", "model": "x"} for j in range(shape.targets)],
            }
        ],
    }
    return parse_config(data, {"K": "k"})


def _calls(store: Store, shape: Shape, first: int, count: int) -> list[tuple[Any, ...]]:
    cfg = _config(shape)
    plan = RoutePlan.build(cfg, cfg.routes[0], KEYS)
    n = shape.targets
    tenant = TenantPlan.build(TENANT, KEYS) if shape.tenant else None
    out = []
    for i in range(first, first + count):
        keys, args = store.acquire_layout(
            plan, "lease-1", [32] * n, [False] * n, rand=i, expected_output=16, detail=False,
            not_after_ms=(int(time.time()) + 3600) * 1000, affinity=shape.pin(i),
            tenant=tenant, tenant_tokens=48, cost_nano=1000, sent_ms=int(time.time() * 1000),
        )  # fmt: skip
        out.append((len(keys), *keys, *args))
    return out


def _started(port: int, out: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    """A redis-server on ``port`` under callgrind, once it answers."""
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
         "--port", str(port), "--save", "", "--appendonly", "no", "--hz", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def _seed(client: redis.Redis, store: Store, shape: Shape, calls: int) -> None:
    """Every script loaded; for ``drained_first``, every call's key pinned to that target."""
    for name in SCRIPTS:
        client.script_load(_script(name))
    if not shape.drained_first:
        return
    client.hset(KEYS.provider("p0"), mapping={"drain": "1", "gate": 1})
    for i in range(calls):
        pin = shape.pin(i)
        if pin is not None:
            client.set(store.pin_key("m", pin), "p0|99999999999999|", px=3_600_000)


def _totals(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def instructions(shape: Shape, measured: int, work: Path) -> int:
    """Instructions a redis-server ran for the warm-up calls and ``measured`` more."""
    port = free_port()
    out = work / f"cg.{port}"
    proc, client = _started(port, out)
    store = Store(client, KEYS, 30_000, embedded=False)
    _seed(client, store, shape, WARM + measured)
    sha = client.script_load(_script("acquire"))
    for first, count in ((0, WARM), (WARM, measured)):
        pipe = client.pipeline(transaction=False)
        for call in _calls(store, shape, first, count):
            pipe.evalsha(sha, *call)
        for answer in pipe.execute():
            if int(answer[0]) == 0:
                raise RuntimeError(f"{shape.name}: a call chose no target: {answer}")
    client.shutdown(nosave=True)
    proc.wait()
    return _totals(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="measured calls per shape")
    parser.add_argument("--shape", action="append", help="only shapes whose name has this")
    opts = parser.parse_args()
    shapes = [s for s in SHAPES if not opts.shape or any(w in s.name for w in opts.shape)]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            cost = instructions(shape, opts.n, Path(tmp)) - instructions(shape, 0, Path(tmp))
            print(f"{shape.name:45s} {cost / opts.n:>10,.0f} instructions per call", flush=True)


if __name__ == "__main__":
    main()
