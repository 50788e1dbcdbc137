"""The same replica app behind two HTTP fronts, alternated in one rig: uvicorn or granian?

    python -m loadtest.front_ab [--rounds 4] [--duration 8] [--interfaces asgi]
                                [--granian-threads 1 [2 ...]] [--c1 3]
                                [--granian-tuning plain [rust-tasks st]]

Front (a) is the router as it runs today, ``python -m router.cli``: uvicorn (uvloop, httptools)
with our bounded protocol (``router.api.server``). Front (b) is the same ASGI app,
``router.api.app.create_app(cfg)``, served by granian (``loadtest.granian_front``): one worker,
``--runtime-threads N`` (``--granian-threads``; 0 = the flag left out, granian's default),
uvloop, HTTP/1.1 only, no access log, its request-head bounds set as close to ours as it has
(the header read timeout from ``read_timeout_s``, the HTTP/1 buffer from ``max_head_bytes``);
``--granian-tuning`` adds granian fronts with other settings (``TUNINGS``).

``loadtest.bench``'s rig and placement: nginx upstreams and Redis on core 1 with wrk, the
front's whole process tree pinned to core 0 (granian's main process and its worker), so the
CPU it spends per request is the figure. Each start is checked first (``/readyz`` ready: the
lifespan ran and the gateway is on Redis; then 30 chat requests, all 200 with the upstream's
answer, each one served by the upstream). Each round runs every front once (the order flips
from one round to the next), each one: 1 s of warm-up at 32 connections, ``--c1`` s at one
connection (its p50 less the upstream's own, measured in the same round: the latency the
front adds), then ``--duration`` s at 32 connections with the CPU of the process tree metered.
Prints each round's figures, the means, and the mean per-round ratio of each granian front to
uvicorn; writes ``loadtest/results/front-ab-<date>-<HHMM>.json`` (UTC).

RSGI is not measured: granian's RSGI interface calls an RSGI app (``__rsgi__(scope,
protocol)``), and ours is ASGI from the hot path down (``HotPath`` reads ``receive`` and
writes ``send``); an adapter from RSGI to our ASGI app would measure the adapter, and an RSGI
hot path is a rewrite of ``router.api.endpoints``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.bench import (
    CLIENT_KEY,
    KEY_ENV,
    RESULTS_DIR,
    SUT_CPU,
    Load,
    Meter,
    Peer,
    Rig,
    Sut,
    Upstreams,
    descendants,
    ready,
    require_tools,
    run_wrk,
    start_upstreams,
    verify_peer,
    wait_until,
    write_config,
    wrk_script,
)
from loadtest.procs import Proc, free_port
from router.config import Config, load_config

ROUTE = "round_robin"
UVICORN = "uvicorn"
INTERFACES = ("asgi",)
RSGI_SKIPPED = (
    "rsgi: not measured; granian's RSGI interface needs an RSGI app and ours is ASGI from the "
    "hot path down: an adapter would measure the adapter (see this module's doc)"
)
TUNINGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "rust-tasks": ("--task-impl", "rust"),
    "st": ("--runtime-mode", "st"),
}
"""granian's settings worth a try on one core, beside the defaults (``--granian-tuning``):
Python tasks run by granian's Rust task implementation (experimental, Python < 3.12), and the
single-threaded Rust runtime (``auto`` picks the multi-threaded one for ASGI)."""
GRANIAN_MIN_BUFFER = 8192
"""granian's smallest ``--http1-buffer-size``."""
GRANIAN_MAX_HEADER_MS = 60_000
"""granian's largest ``--http1-header-read-timeout``."""


@dataclass(frozen=True)
class Front:
    """One way to serve the replica: its name and the command that starts it on a port."""

    name: str
    interface: str = "asgi"
    runtime_threads: int | None = None
    """granian's ``--runtime-threads`` (None: the flag left out); None for uvicorn too."""
    tuning: str = "plain"
    """A key of ``TUNINGS``: granian's flags beside ours."""

    @property
    def is_granian(self) -> bool:
        return self.name != UVICORN

    def argv(self, config: Path, cfg: Config, port: int) -> list[str]:
        if not self.is_granian:
            argv = [sys.executable, "-m", "router.cli", "--config", str(config)]
            return [*argv, "--host", "127.0.0.1", "--port", str(port)]
        return granian_argv(port, cfg, self.interface, self.runtime_threads, self.tuning)


def granian_argv(
    port: int, cfg: Config, interface: str, runtime_threads: int | None, tuning: str = "plain"
) -> list[str]:
    """granian serving ``loadtest.granian_front:app`` (the config comes in ``ROUTER_CONFIG``)."""
    if interface not in INTERFACES:
        raise ValueError(f"interface {interface!r}: only {', '.join(INTERFACES)} ({RSGI_SKIPPED})")
    header_ms = min(max(round(cfg.read_timeout_s * 1000), 1), GRANIAN_MAX_HEADER_MS)
    argv = [sys.executable, "-m", "granian", "--interface", interface, "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if runtime_threads is not None:
        argv += ["--runtime-threads", str(runtime_threads)]
    argv += ["--loop", "uvloop", "--http", "1", "--no-ws", "--no-access-log"]
    argv += ["--log-level", "warning"]
    argv += ["--http1-header-read-timeout", str(header_ms)]
    argv += ["--http1-buffer-size", str(max(cfg.max_head_bytes, GRANIAN_MIN_BUFFER))]
    return [*argv, *TUNINGS[tuning], "loadtest.granian_front:app"]


def fronts(
    interfaces: list[str], threads: list[int], tunings: list[str] | None = None
) -> list[Front]:
    """uvicorn, then one granian front per interface, runtime-thread count (0: granian's
    default) and tuning."""
    out = [Front(UVICORN, interface="asgi")]
    for interface in interfaces:
        for n in threads:
            for tuning in tunings or ["plain"]:
                name = f"granian-{interface}-" + ("default" if n == 0 else f"t{n}")
                name += "" if tuning == "plain" else f"-{tuning}"
                out.append(Front(name, interface, n or None, tuning))
    return out


def order(names: list[str], round_no: int) -> list[str]:
    """The fronts in the given order on even rounds, reversed on odd ones (drift cancels)."""
    return list(names) if round_no % 2 == 0 else list(reversed(names))


def ratios(figures: dict[str, list[float]], base: str) -> dict[str, float]:
    """Each front's mean per-round ratio to ``base`` (rounds paired by index)."""
    out = {}
    for name, values in figures.items():
        if name != base:
            pairs = zip(values, figures[base], strict=True)
            out[name] = statistics.mean(v / b for v, b in pairs if b)
    return out


def start_front(
    rig: Rig, front: Front, config: Path, cfg: Config, up: Upstreams
) -> tuple[Proc, int]:
    """Start ``front`` pinned to the SUT core on a free port; wait until ready and verified."""
    port = free_port()
    env = {KEY_ENV: CLIENT_KEY, "ROUTER_CONFIG": str(config)}
    proc = rig.start(front.name, front.argv(config, cfg, port), SUT_CPU, env)
    wait_until(lambda: ready(f"http://127.0.0.1:{port}"), f"{front.name} to be ready", proc)
    peer = Peer(front.name, front.name, [], port, {}, ROUTE, CLIENT_KEY,
                spread_header="x-router-provider")  # fmt: skip
    verify_peer(peer, proc, up.stub_port)
    return proc, port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0, help="s at 32 connections")
    parser.add_argument("--c1", type=float, default=3.0, help="s at 1 connection (0: skip)")
    parser.add_argument("--interfaces", nargs="+", default=["asgi"], choices=["asgi", "rsgi"])
    parser.add_argument("--granian-threads", nargs="+", type=int, default=[1],
                        help="granian --runtime-threads values (0: granian's default)")  # fmt: skip
    parser.add_argument("--granian-tuning", nargs="+", default=["plain"], choices=list(TUNINGS),
                        help="granian fronts with these settings too (see TUNINGS)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.c1 < 0:
        parser.error("--rounds must be >= 1, --duration > 0 and --c1 >= 0")
    if any(n < 0 for n in args.granian_threads):
        parser.error("--granian-threads: a count, or 0 for granian's default")
    if "rsgi" in args.interfaces:
        print(RSGI_SKIPPED)
        args.interfaces = [i for i in args.interfaces if i != "rsgi"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools(["nginx", "wrk", "redis-server", "taskset"])
    import granian

    all_fronts = {
        f.name: f for f in fronts(args.interfaces, args.granian_threads, args.granian_tuning)
    }
    names = list(all_fronts)
    rps: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    p50: dict[str, list[float]] = {n: [] for n in names}
    rows: list[dict[str, Any]] = []
    print(f"granian {granian.__version__}; fronts: {', '.join(names)}; route {ROUTE}; "
          f"front on core {SUT_CPU}, wrk, nginx and Redis on the other", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, Rig(Path(tmp)) as rig:
        up = start_upstreams(rig)
        config = write_config(rig, "front-ab.yaml", up, "OFF")
        cfg = load_config(config, {KEY_ENV: CLIENT_KEY})
        script = wrk_script(rig.dir, ROUTE)
        direct = Load(f"http://127.0.0.1:{up.ports[0]}/v1/chat/completions", script)
        for k in range(args.rounds):
            base_p50 = run_wrk(direct, 1, args.c1).p50_ms if args.c1 else 0.0
            for name in order(names, k):
                proc, port = start_front(rig, all_fronts[name], config, cfg, up)
                load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", script)
                pids = descendants(proc.pid)
                sut = Sut(name, name, load, up.stub_port, pids, up.redis_port, up.redis_pid,
                          f"{name} core {SUT_CPU} ({len(pids)} processes), wrk core 1")  # fmt: skip
                run_wrk(load, 32, 1.0)
                added = run_wrk(load, 1, args.c1).p50_ms - base_p50 if args.c1 else 0.0
                meter = Meter(sut)
                res = run_wrk(load, 32, args.duration)
                figures = meter.figures()
                rig.stop(proc)
                rps[name].append(res.rps)
                cpu[name].append(figures["cpu_s_per_1k"])
                p50[name].append(added)
                rows.append({"round": k + 1, "front": name, "processes": len(pids),
                             "c32": res.summary(), "added_p50_c1_ms": round(added, 3),
                             **figures})  # fmt: skip
                print(f"round {k + 1} {name:24} {res.rps:8.0f} req/s @32  "
                      f"{figures['cpu_s_per_1k']:.4f} CPU s/1k  +{added:.3f} ms p50 @1  "
                      f"non-2xx {res.non2xx} errors {res.socket_errors}  "
                      f"others' CPU {figures['foreign_cpu_pct']}%", flush=True)  # fmt: skip
    print()
    for name in names:
        print(f"{name:24} mean {statistics.mean(rps[name]):8.0f} req/s "
              f"(min {min(rps[name]):.0f}, max {max(rps[name]):.0f}); CPU s/1k "
              f"{statistics.mean(cpu[name]):.4f}; added p50 @1 "
              f"{statistics.mean(p50[name]):+.3f} ms")  # fmt: skip
    rps_ratio, cpu_ratio = ratios(rps, UVICORN), ratios(cpu, UVICORN)
    for name in rps_ratio:
        print(f"{name}/uvicorn: req/s {rps_ratio[name]:.3f}, CPU per request "
              f"{cpu_ratio[name]:.3f} (mean of the per-round ratios)")  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"front-ab-{dt.datetime.now(dt.UTC):%Y-%m-%d-%H%M}.json"
    report = {
        "granian": granian.__version__,
        "argv": sys.argv[1:] if argv is None else argv,
        "rounds": rows,
        "ratios_rps": rps_ratio,
        "ratios_cpu": cpu_ratio,
        "fronts": {n: all_fronts[n].argv(Path("CONFIG"), cfg, 0) for n in names},
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
