"""``routerctl simulate``: drive chat requests through one route and check its strategy's split.

It sends ``--requests`` chat completions, ``--concurrency`` at a time, through one route:
``--route MODEL``, or the config's first route using ``--strategy`` (none: an error that lists
the routes and their strategies). The cluster is one already up (``--host``), or a local one
it starts with ``routerctl up``; only there may ``--route`` and a different ``--strategy`` go
together: the route's strategy is then replaced in a temporary copy of the config. The
printed table and the chart are titled by the route and the strategy it ran with. The mock
providers' counters are reset first (a provider on loopback where nothing listens is an
error: ``routerctl up`` mocks only 127.0.0.1 and localhost, so a mock elsewhere, such as
``examples/simulate.yaml``'s fast one, is started by hand). While the requests run, the
shared state is read every 100 ms (``read_state``, from the cluster's Redis: ``--redis-url``,
``REDIS_URL``, the config's, or the private one the launcher started) for each provider's
in-flight, RPM and TPM peaks. Then, per provider: what it received by its own count
(``GET /stats``), what the strategy should give, the peaks against the limits, and the 429s
it sent:

- ``round_robin``: equal shares among the targets usable at the start;
- ``weighted``: the weight shares (smooth weighted round robin);
- ``headroom``: proportional to the limit that binds (the RPM limit, or the TPM limit over the
  tokens one request reserves), less what the window already held at the start;
- ``least_connections``, ``least_latency``: by load, no fixed figure: the fewest in flight per
  weight, the lowest expected latency (the fastest provider gets the most).

It writes ``DIR/simulate-<strategy>.json`` and a chart, ``DIR/simulate-<strategy>.png``. Exit
status: 0; 1 when a provider sent a 429 (the gateway must keep each under its limits) or a
request failed (anything but 200, or a 429 of the gateway's own); 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from loadtest.loadrun import (
    ClusterError,
    Gateway,
    LocalCluster,
    connect,
    mock_roots,
    read_stats,
    reset_stats,
)
from router.config import Config, Route, Strategy, load_config, masked_url
from router.errors import ConfigError, StoreError
from router.state.cluster import ProviderState, read_state
from router.state.store import Store
from router.tokens import max_output, prompt_tokens, reservation
from router.upstream.providers import adapter_for

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SAMPLE_S = 0.1
PROMPT = "Simulated request: say hello to the gateway in one short sentence."
SAMPLE_ERRORS = 5
BY_LOAD = {
    Strategy.LEAST_CONNECTIONS: "by load: fewest in flight per weight (equally fast providers "
    "get about their weight share, faster ones more)",
    Strategy.LEAST_LATENCY: "by load: lowest (ttft + tpot x output) x (in_flight + 1) (the "
    "fastest provider gets the most, the others its overflow)",
}


class UsageError(Exception):
    """The command line and the config do not fit together; the text says why."""


@dataclass(frozen=True)
class Plan:
    """What to drive: the config as the cluster runs it, the route, and how hard."""

    cfg: Config
    route: Route
    requests: int
    concurrency: int
    body: dict[str, Any]
    configured: Strategy | None = None
    """The strategy the config gives the route, when this run replaced it (in a copy)."""

    @property
    def names(self) -> list[str]:
        """The route's providers, in target order, each once."""
        return list(dict.fromkeys(t.provider for t in self.route.targets))

    def weight(self, name: str) -> int:
        """The provider's weight on this route (the target's, else the provider's)."""
        target = next(t for t in self.route.targets if t.provider == name)
        return target.weight or self.cfg.provider(name).weight

    def tokens(self, name: str) -> int:
        """Tokens one request reserves in the provider's TPM window."""
        provider = self.cfg.provider(name)
        default = self.route.default_max_tokens or adapter_for(provider.kind).default_max_tokens
        budget = max_output(self.body, default)
        accounting = provider.limits.tpm_accounting
        return reservation(prompt_tokens(self.body), budget, accounting)


@dataclass
class Peaks:
    """The highest figures one provider showed in the shared state."""

    in_flight: int = 0
    rpm: int = 0
    tpm: int = 0


class Sampler:
    """Reads the shared state every ``SAMPLE_S``; keeps each provider's first view and peaks."""

    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg
        self.first: dict[str, ProviderState] = {}
        self.peaks: dict[str, Peaks] = {}
        self.samples = 0

    async def sample(self) -> None:
        """One read of the shared state (a failed read is skipped)."""
        try:
            state = await read_state(self.store, self.cfg)
        except StoreError:
            return
        self.samples += 1
        for p in state.providers:
            self.first.setdefault(p.name, p)
            peak = self.peaks.setdefault(p.name, Peaks())
            peak.in_flight = max(peak.in_flight, p.in_flight)
            peak.rpm = max(peak.rpm, p.rpm_used)
            peak.tpm = max(peak.tpm, p.tpm_used)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set."""
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)


@dataclass
class Drive:
    """What the client saw: answers by status, a few error texts, the time it took."""

    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, status: str, text: str | None = None) -> None:
        """Count one answer (and keep its text when it is one of the first errors)."""
        self.statuses[status] += 1
        if text is not None and len(self.errors) < SAMPLE_ERRORS:
            self.errors.append(text)


async def _one(client: httpx.AsyncClient, body: dict[str, Any], drive: Drive) -> None:
    try:
        resp = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        drive.note("error", f"{type(exc).__name__}: {exc}")
        return
    code = resp.status_code
    drive.note(str(code), None if code == 200 else f"HTTP {code}: {resp.text[:300]}")


async def drive(gw: Gateway, plan: Plan) -> Drive:
    """Send ``plan.requests`` chat requests, ``plan.concurrency`` at a time."""
    result = Drive()
    todo = iter(range(plan.requests))  # shared by the workers: each request is taken once
    n = plan.concurrency
    async with httpx.AsyncClient(
        base_url=gw.root, headers={"Authorization": f"Bearer {gw.key}"}, timeout=120.0,
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n), trust_env=False,
    ) as client:  # fmt: skip

        async def worker() -> None:
            for _ in todo:
                await _one(client, plan.body, result)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(n)))
        result.seconds = time.monotonic() - started
    return result


async def observe(gw: Gateway, plan: Plan) -> tuple[Drive, Sampler | None]:
    """Drive the requests while sampling the shared state (when its Redis is known)."""
    if not gw.redis_url:
        return await drive(gw, plan), None
    store = Store.from_config(plan.cfg.model_copy(update={"redis_url": gw.redis_url}))
    sampler = Sampler(store, plan.cfg)
    try:
        await store.start(warm=1)
    except StoreError as exc:
        print(f"routerctl simulate: not sampling the shared state: {exc}", file=sys.stderr)
        await store.close()
        return await drive(gw, plan), None
    try:
        await sampler.sample()  # the state at the start
        stop = asyncio.Event()
        task = asyncio.create_task(sampler.run(stop))
        try:
            result = await drive(gw, plan)
        finally:
            stop.set()
            await task
        await sampler.sample()
        return result, sampler
    finally:
        await store.close()


@dataclass(frozen=True)
class Room:
    """One provider's limits, what its windows held at the start, and one request's tokens."""

    rpm: int
    tpm: int
    rpm_used: int
    tpm_used: int
    tokens: int

    @property
    def binding(self) -> str:
        """The limit that binds first: ``rpm``, ``tpm`` or ``-`` (none)."""
        if self.rpm and (not self.tpm or self.tpm >= self.rpm * self.tokens):
            return "rpm"
        return "tpm" if self.tpm else "-"

    def take(self, level: float) -> float:
        """Requests that fill this provider's windows up to the fraction ``level``."""
        caps = []
        if self.rpm:
            caps.append(level * self.rpm - self.rpm_used)
        if self.tpm:
            caps.append((level * self.tpm - self.tpm_used) / max(self.tokens, 1))
        return max(0.0, min(caps)) if caps else math.inf


def water_fill(n: int, rooms: Sequence[Room]) -> list[float]:
    """Requests per provider when headroom keeps the used fractions level; they sum to ``n``."""
    if not rooms:
        return []
    free = [r.binding == "-" for r in rooms]
    if any(free):  # an unlimited provider always has the most headroom
        return [n / sum(free) if f else 0.0 for f in free]
    lo, hi = 0.0, 1.0
    while sum(r.take(hi) for r in rooms) < n:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(r.take(mid) for r in rooms) < n else (lo, mid)
    return [r.take(hi) for r in rooms]


def _usable(state: ProviderState | None) -> bool:
    """Whether the provider could take requests at the start (unknown state: yes)."""
    if state is None:
        return True
    return state.health != "down" and not state.drained and state.circuit != "open"


def _room(plan: Plan, name: str, start: ProviderState | None) -> Room:
    limits = plan.cfg.provider(name).limits
    rpm_used, tpm_used = (start.rpm_used, start.tpm_used) if start else (0, 0)
    return Room(limits.rpm or 0, limits.tpm or 0, rpm_used, tpm_used, plan.tokens(name))


def expect(
    plan: Plan, first: Mapping[str, ProviderState]
) -> tuple[str, list[float] | None, list[str]]:
    """What the strategy should give: a text, a count per provider (None: by load), the
    limit that binds each provider."""
    names, n = plan.names, plan.requests
    usable = [_usable(first.get(name)) for name in names]
    rooms = [_room(plan, name, first.get(name)) for name in names]
    binding = [r.binding for r in rooms]
    strategy = plan.route.strategy
    if strategy in BY_LOAD:
        return BY_LOAD[strategy], None, binding
    if strategy is Strategy.HEADROOM:
        filled = iter(water_fill(n, [r for r, u in zip(rooms, usable, strict=True) if u]))
        text = "proportional to the limit that binds (RPM, or TPM / tokens per request), "
        text += "less what the window held at the start"
        return text, [next(filled) if u else 0.0 for u in usable], binding
    if strategy is Strategy.WEIGHTED:
        weights = [plan.weight(name) if u else 0 for name, u in zip(names, usable, strict=True)]
        text = "weight shares " + ":".join(str(w) for w in weights)
    else:
        weights = [1 if u else 0 for u in usable]
        text = f"equal shares among the {sum(weights)} usable targets"
    total = sum(weights) or 1
    return text, [n * w / total for w in weights], binding


def _peak(sampler: Sampler | None, own: Mapping[str, Any], name: str) -> dict[str, int | None]:
    """Peaks from the shared state when sampled, else the provider's own."""
    peaks = sampler.peaks.get(name) if sampler else None
    if peaks is not None:
        return {"in_flight": peaks.in_flight, "rpm": peaks.rpm, "tpm": peaks.tpm}
    keys = {"in_flight": "in_flight_peak", "rpm": "rpm_peak", "tpm": "tpm_peak"}
    return {k: own.get(v) for k, v in keys.items()}


def _row(
    plan: Plan, name: str, own: Mapping[str, Any], expected: float | None, sampler: Sampler | None
) -> dict[str, Any]:
    limits = plan.cfg.provider(name).limits
    peak = _peak(sampler, own, name)
    start = sampler.first.get(name) if sampler else None
    return {
        "name": name, "received": own.get("received"), "ok": own.get("ok"),
        "rate_limited": own.get("rate_limited"), "stats_error": own.get("error"),
        "expected": None if expected is None else round(expected, 2),
        "in_flight_peak": peak["in_flight"], "in_flight_limit": limits.max_in_flight,
        "rpm_start": start.rpm_used if start else None, "rpm_peak": peak["rpm"],
        "rpm_limit": limits.rpm,
        "tpm_start": start.tpm_used if start else None, "tpm_peak": peak["tpm"],
        "tpm_limit": limits.tpm, "tokens_per_request": plan.tokens(name),
        "provider_peaks": {k: own.get(k) for k in ("in_flight_peak", "rpm_peak", "tpm_peak")},
    }  # fmt: skip


def build_report(
    plan: Plan, gw: Gateway, result: Drive, sampler: Sampler | None, stats: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON document of one simulation."""
    text, counts, binding = expect(plan, sampler.first if sampler else {})
    rows = [
        _row(plan, name, stats.get(name, {}), counts[i] if counts else None, sampler)
        for i, name in enumerate(plan.names)
    ]
    received = sum(r["received"] or 0 for r in rows) or 1
    for row, bind in zip(rows, binding, strict=True):
        row["share"] = round((row["received"] or 0) / received, 4)
        row["expected_share"] = (
            None if row["expected"] is None else round(row["expected"] / plan.requests, 4)
        )
        row["binding"] = bind
    return {
        "strategy": plan.route.strategy.value, "route": plan.route.model,
        "replaced": plan.configured is not None,
        "configured_strategy": (plan.configured or plan.route.strategy).value,
        "host": masked_url(gw.root),
        "requests": plan.requests, "concurrency": plan.concurrency,
        "duration_s": round(result.seconds, 3), "statuses": dict(result.statuses),
        "errors": result.errors, "expectation": text,
        "state_samples": sampler.samples if sampler else 0, "providers": rows,
        "provider_429s": sum(r["rate_limited"] or 0 for r in rows),
    }  # fmt: skip


def _of(value: Any, limit: Any) -> str:
    if value is None:
        return "?"
    return f"{value}/{limit}" if limit else str(value)


def _known(value: Any) -> str:
    return "?" if value is None else str(value)


def _cells(r: Mapping[str, Any]) -> str:
    expected = "by load"
    if r["expected"] is not None:
        expected = f"{r['expected']:.1f} ({r['expected_share']:.1%})"
    return (
        f"{r['name']:<14}{_known(r['received']):>9}{r['share']:>8.1%}{expected:>18}"
        f"{_of(r['in_flight_peak'], r['in_flight_limit']):>11}"
        f"{_of(r['rpm_peak'], r['rpm_limit']):>14}{_of(r['tpm_peak'], r['tpm_limit']):>16}"
        f"{r['binding']:>7}{_known(r['rate_limited']):>11}"
    )


def title(report: Mapping[str, Any]) -> str:
    """What ran: the route and its strategy (and the config's, when this run replaced it)."""
    text = f"route {report['route']} ({report['strategy']}"
    if report["replaced"]:
        text += f", in place of its {report['configured_strategy']} in a copy of the config"
    return text + ")"


def render(report: Mapping[str, Any]) -> str:
    """The report as the table ``routerctl simulate`` prints."""
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(report["statuses"].items()))
    lines = [
        f"simulate {title(report)}: "
        f"{report['requests']} requests at concurrency {report['concurrency']} through "
        f"{report['host']} in {report['duration_s']:.2f} s ({statuses})",
        f"expected: {report['expectation']}",
        f"{'provider':<14}{'received':>9}{'share':>8}{'expected':>18}{'in flight':>11}"
        f"{'RPM peak':>14}{'TPM peak':>16}{'binds':>7}{'429s sent':>11}",
        *(_cells(r) for r in report["providers"]),
    ]
    if report["state_samples"]:
        lines.append(
            f"(peaks of {report['state_samples']} reads of the shared state: leases in flight, "
            "and the RPM/TPM windows, which hold the last minute's earlier traffic too)"
        )
    else:
        lines.append("(peaks as the providers counted them: no shared state to read)")
    return "\n".join(lines)


def _received_plot(ax: Axes, report: Mapping[str, Any]) -> None:
    rows = report["providers"]
    x = list(range(len(rows)))
    got = ax.bar([i - 0.2 for i in x], [r["received"] or 0 for r in rows], 0.4, label="received")
    ax.bar_label(got)
    if all(r["expected"] is not None for r in rows):
        exp = ax.bar([i + 0.2 for i in x], [r["expected"] for r in rows], 0.4, label="expected")
        ax.bar_label(exp, fmt="%.1f")
    ax.set_xticks(x, [r["name"] for r in rows])
    head = textwrap.fill(f"{title(report)}: requests per provider", 80)
    ax.set_title(head + "\n" + textwrap.fill(f"expected: {report['expectation']}", 80), fontsize=9)
    ax.legend()


def _limit_bars(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[str]]:
    heights, labels = [], []
    for r in rows:
        value, limit = r[f"{key}_peak"], r[f"{key}_limit"]
        heights.append(100.0 * value / limit if value is not None and limit else 0.0)
        labels.append(f"{value}/{limit}" if limit else f"{_known(value)}, no limit")
    return heights, labels


def _peaks_plot(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    x = list(range(len(rows)))
    for k, (key, label) in enumerate((("in_flight", "in flight"), ("rpm", "RPM"), ("tpm", "TPM"))):
        heights, labels = _limit_bars(rows, key)
        bars = ax.bar([i + (k - 1) * 0.27 for i in x], heights, 0.27, label=f"{label} peak")
        ax.bar_label(bars, labels, fontsize=7, rotation=90, padding=2)
    ax.axhline(100, color="red", linestyle="--", linewidth=1, label="limit")
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylim(0, 125)
    ax.set_ylabel("peak, % of the limit")
    ax.set_title("peaks in the shared state against the limits", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")


def chart(report: Mapping[str, Any], path: Path) -> None:
    """A PNG: requests received vs expected per provider, and the peaks against the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    _received_plot(left, report)
    _peaks_plot(right, report["providers"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _listing(cfg: Config) -> str:
    return ", ".join(f"{r.model} ({r.strategy.value})" for r in cfg.routes)


def pick_route(cfg: Config, strategy: Strategy | None, name: str | None, fixed: bool) -> Route:
    """The route to drive, as configured: ``name``'s, else the first using ``strategy``.
    ``fixed``: the cluster runs the config as it is (``--host``), so no other strategy."""
    if name is not None:
        route = cfg.route(name)
        if route is None:
            raise UsageError(f"no route {name!r} in the config; its routes: {_listing(cfg)}")
        if fixed and strategy is not None and route.strategy is not strategy:
            raise UsageError(
                f"route {name!r} uses {route.strategy.value}, not {strategy.value}, and the "
                "running cluster's config decides: pick a route using it, or drop --host"
            )
        return route
    if strategy is None:
        raise UsageError(f"pass --strategy or --route; the config's routes: {_listing(cfg)}")
    route = next((r for r in cfg.routes if r.strategy is strategy), None)
    if route is None:
        hint = "" if fixed else " (or --route MODEL: its strategy replaced in a copy)"
        raise UsageError(
            f"no route uses {strategy.value}; the config's routes: {_listing(cfg)}: add one, "
            f"or drive one of them with --route{hint}"
        )
    return route


def with_strategy(path: Path, route: str, strategy: Strategy, into: Path) -> Path:
    """A copy of the config at ``path``, in ``into``, with ``route``'s strategy replaced."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for r in data["routes"]:
        if r.get("model") == route:
            r["strategy"] = strategy.value
    copy = into / path.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return copy


def _start_local(
    args: argparse.Namespace, route: Route, strategy: Strategy, stack: contextlib.ExitStack
) -> tuple[Config, Gateway]:
    """A local cluster on the config, or on a copy where ``route`` uses ``strategy``."""
    path = Path(args.config)
    if route.strategy is not strategy:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="routerctl-sim-")))
        path = with_strategy(path, route.model, strategy, tmp)
    log = Path(args.out) / f"simulate-{strategy.value}-cluster.log"
    print(f"starting a local cluster (routerctl up; its log: {log})", flush=True)
    gw = stack.enter_context(LocalCluster(path, args.replicas, log))
    return load_config(path, resolve=False), gw


def _prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Plan, Gateway]:
    cfg = load_config(args.config, resolve=False)
    asked = Strategy(args.strategy) if args.strategy else None
    route = pick_route(cfg, asked, args.route, fixed=bool(args.host))
    strategy = asked or route.strategy
    if args.host:
        gw = connect(args.host, cfg)
    else:
        cfg, gw = _start_local(args, route, strategy, stack)
    if gw.key is None:
        raise UsageError(f"no client key: set {cfg.client_keys[0].env}")
    gw = Gateway(gw.root, gw.key, args.redis_url or gw.redis_url or cfg.redis_url)
    body = {"model": route.model, "max_tokens": args.max_tokens}
    body["messages"] = [{"role": "user", "content": PROMPT}]
    effective = route.model_copy(update={"strategy": strategy})
    configured = route.strategy if route.strategy is not strategy else None
    return Plan(cfg, effective, args.requests, args.concurrency, body, configured), gw


def check_listening(roots: Mapping[str, str], config: str) -> None:
    """A provider of the route on loopback where nothing listens would only fail its requests
    over to the others, and the split would mean nothing: say so before driving."""
    silent = []
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        for name, root in roots.items():
            try:
                client.get(f"{root}/stats")
            except httpx.ConnectError:
                silent.append(f"{name} at {root}")
    if silent:
        raise UsageError(
            f"nothing listens for {', '.join(silent)}: routerctl up mocks the providers on "
            f"127.0.0.1 and localhost only; start the others first (see {config}: its comments)"
        )


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        plan, gw = _prepare(args, stack)
        roots = mock_roots(plan.cfg, plan.names)
        check_listening(roots, args.config)
        reset_stats(roots)
        result, sampler = asyncio.run(observe(gw, plan))
        stats = read_stats(roots)
    return build_report(plan, gw, result, sampler, stats)


def simulate(args: argparse.Namespace) -> int:
    """Run ``routerctl simulate`` with parsed ``args``; return its exit status."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = _simulate(args)
    except ConfigError as exc:
        for where, message in exc.problems:
            print(f"routerctl simulate: {where}: {message}", file=sys.stderr)
        return 2
    except (UsageError, ClusterError) as exc:
        print(f"routerctl simulate: {exc}", file=sys.stderr)
        return 2
    stem = out / f"simulate-{report['strategy']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, stem.with_suffix(".png"))
    print(render(report))
    print(f"wrote {stem}.json and {stem}.png")
    return _verdict(report)


def _verdict(report: Mapping[str, Any]) -> int:
    failed = sum(v for k, v in report["statuses"].items() if k not in ("200", "429"))
    if report["provider_429s"]:
        print(f"FAIL: the providers sent {report['provider_429s']} 429s (must be 0)")
    if failed:
        print(f"FAIL: {failed} requests failed: {report['errors']}")
    return 1 if report["provider_429s"] or failed else 0
