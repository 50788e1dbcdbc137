"""Render the cluster state, its keys and its usage as rich tables (read by
``router.state.cluster`` and ``router.state.usage``), and the tenants as the admin API lists
them (``routerctl tenants``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from router.config import masked_url
from router.state.cluster import ClusterState, KeyInfo, ProviderState, ReplicaState, RouteState
from router.state.usage import Figures, UsageReport

_HEALTH_STYLE = {"up": "green", "down": "bold red", "unknown": "dim"}


def _row(table: Table, *cells: str | Text, style: str = "") -> None:
    # names come from the config and Redis: as Text, "[x]" is no markup and ":a:" no emoji
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells), style=style)


def _table(title: str, columns: Sequence[str], figures: Collection[str] = ()) -> Table:
    """A table whose ``figures`` columns are right-aligned and never wrap, so that no number
    is ever cut; the others wrap at spaces and fold a long name onto more lines when the
    console is narrow (rich's default cuts both to an ellipsis: ``prov… weig…`` at 80).
    The circuit's state stays on one line too: the names fold first."""
    table = Table(title=Text(title), title_justify="left")
    for name in columns:
        if name in figures:
            table.add_column(name, justify="right", no_wrap=True)
        elif name == _CIRCUIT_COLUMN:
            table.add_column(name, no_wrap=True)
        else:
            table.add_column(name, overflow="fold")
    return table


def humanize(seconds: float) -> str:
    """A short duration: ``0.4s``, ``42s``, ``3m``, ``2h``, ``5d``."""
    s = max(0.0, seconds)
    if round(s, 1) < 10:
        return f"{s:.1f}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{s:.0f}s"


def _of(used: int, limit: int | None) -> str:
    return f"{used}/{limit}" if limit is not None else f"{used}/∞"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _health(p: ProviderState, now_ms: int) -> Text:
    label: str = p.health
    if p.health_since_ms:
        label += " " + humanize((now_ms - p.health_since_ms) / 1000)
    return Text(label, style=_HEALTH_STYLE[p.health])


def _circuit(p: ProviderState, now_ms: int) -> Text:
    parts: list[str] = [p.circuit]
    if p.circuit != "closed" and p.circuit_until_ms:
        parts[0] += " " + humanize((p.circuit_until_ms - now_ms) / 1000)
    if p.cooldown_until_ms:
        parts.append("cooling " + humanize((p.cooldown_until_ms - now_ms) / 1000))
    style = "" if parts == ["closed"] else "yellow"
    return Text(", ".join(parts), style=style)


# pins (affinity pins naming the provider) sit in the status part: the load part at 80
# columns has no room left for a sixth figure without folding the names to a few letters
_CIRCUIT_COLUMN = "circuit / cooldown"
_STATUS = ("provider", "weight", "health", _CIRCUIT_COLUMN, "drained", "pins")
_LOAD = ("in flight", "RPM", "TPM", "TTFT ms", "TPOT ms")
_FIGURES = frozenset({"weight", "pins", *_LOAD})


def _status_cells(weight: int, p: ProviderState, now_ms: int) -> tuple[str | Text, ...]:
    drained = Text("DRAINED", style="bold yellow") if p.drained else Text("no")
    return p.name, str(weight), _health(p, now_ms), _circuit(p, now_ms), drained, str(p.pins)


def _load_cells(p: ProviderState) -> tuple[str, ...]:
    return (
        _of(p.in_flight, p.max_in_flight),
        _of(p.rpm_used, p.rpm_limit),
        _of(p.tpm_used, p.tpm_limit),
        _ms(p.ttft_ewma_ms),
        _ms(p.tpot_ewma_ms),
    )


class _Fitted:
    """Providers in one table when the console is wide enough for it without wrapping, else
    in two narrower ones (status, then load) with the provider name in each."""

    def __init__(self, wide: Table, narrow: Sequence[Table]) -> None:
        self.wide = wide
        self.narrow = narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # measured unclamped: Measurement.get caps the answer at the width it is given;
        # asked at each render, so --watch follows a resized terminal
        natural = Measurement.get(console, options.update_width(10_000), self.wide).maximum
        if natural <= options.max_width:
            yield self.wide
        else:
            yield from self.narrow


def _provider_table(
    title: str, rows: Sequence[tuple[int, ProviderState]], now_ms: int
) -> RenderableType:
    wide = _table(title, (*_STATUS, *_LOAD), _FIGURES)
    status = _table(title + ": status", _STATUS, _FIGURES)
    load = _table(title + ": load", ("provider", *_LOAD), _FIGURES)
    for weight, p in rows:
        status_cells, load_cells = _status_cells(weight, p, now_ms), _load_cells(p)
        _row(wide, *status_cells, *load_cells)
        _row(status, *status_cells)
        _row(load, p.name, *load_cells)
    return _Fitted(wide, (status, load))


def _route_title(route: RouteState) -> str:
    return f"route {route.model} ({route.strategy})"


def _waiting(route: RouteState) -> RenderableType | None:
    """Who waits for the route, cluster-wide, against its ``max_queue``: a row per tenant and
    priority, the band served first at the top (a row each, so that a narrow console never
    splits one); a dim line when none waits, nothing for a route that never waits."""
    q = route.queue
    if q is None:
        return None
    head = f"route {route.model}: waiting {_of(q.waiting, q.max_queue)}"
    if not q.waiting:
        return Text(head, style="dim")
    table = _table(head, ("tenant", "priority", "waiting"), ("priority", "waiting"))
    for w in q.by_tenant:
        _row(table, w.tenant, str(w.priority), str(w.count))
    return table


def _replica_table(replicas: Sequence[ReplicaState], now_ms: int) -> Table:
    columns = ("replica", "host", "pid", "version", "up", "last heartbeat")
    table = _table(f"{len(replicas)} live replicas", columns, ("pid", "up", "last heartbeat"))
    for r in replicas:
        up = humanize(now_ms / 1000 - r.started) if r.started else "-"
        _row(table, r.id, r.host, str(r.pid or "-"), r.version, up, humanize(r.age_s) + " ago")
    return table


def render_state(state: ClusterState, redis_url: str | None = None) -> RenderableType:
    """The state as tables: one per route (with who waits for it, when it has a queue), then
    the replicas, then healthd; the header names the Redis it was read from (its user and
    password masked)."""
    now = state.taken_at_ms
    by_name = {p.name: p for p in state.providers}
    head = f"pool {state.pool} · prefix {state.key_prefix} · health version {state.health_version}"
    if redis_url:
        head += f" · {masked_url(redis_url)}"
    if state.shard is not None:
        head += f" · slot {state.shard.slot} on {state.shard.node}"
    parts: list[RenderableType] = [Text(head, style="bold")]
    for route in state.routes:
        rows = [(t.weight, by_name[t.provider]) for t in route.targets]
        parts.append(_provider_table(_route_title(route), rows, now))
        waiting = _waiting(route)
        if waiting is not None:
            parts.append(waiting)
    routed = {t.provider for r in state.routes for t in r.targets}
    idle = [(p.weight, p) for p in state.providers if p.name not in routed]
    if idle:
        parts.append(_provider_table("providers no route uses", idle, now))
    parts.append(_replica_table(state.replicas, now))
    h = state.healthd
    leader = f"leader {h.leader}" if h.leader else "no leader"
    parts.append(Text(f"healthd: {leader}, epoch {h.epoch}"))
    return Group(*parts)


def _ttl(info: KeyInfo) -> str:
    if info.type in ("none", "channel"):
        return "-"
    return "none" if info.ttl_ms is None else humanize(info.ttl_ms / 1000)


def render_keys(keys: Sequence[KeyInfo]) -> Table:
    """The deployment's keys: name, Redis type ("none" when absent), TTL, what it holds."""
    present = sum(k.type not in ("none", "channel") for k in keys)
    table = _table(f"{present} keys present", ("key", "type", "TTL", "what"), ("TTL",))
    for k in keys:
        _row(table, k.key, k.type, _ttl(k), k.what, style="dim" if k.type == "none" else "")
    return table


_TENANT_COLUMNS = ("tenant", "owner", "keys", "RPM", "TPM", "in flight", "spend")


def _keys_cell(t: Mapping[str, Any]) -> str:
    ids = [str(k["id"]) for k in t.get("keys", [])]
    if t.get("config_keys"):
        ids.insert(0, f"{t['config_keys']} in config")
    return ", ".join(ids) or "-"


def _spend(t: Mapping[str, Any]) -> str:
    budget, use = t.get("budget"), t.get("usage", {})
    if not budget:
        return "-"
    return f"${use.get('spend_usd', 0):.4f}/${budget['usd']:g} {use.get('period') or ''}".strip()


def render_tenants(data: Mapping[str, Any]) -> Table:
    """``GET /admin/tenants`` as a table: each tenant's owner, its keys' ids, its use against
    its limits now (``∞``: none) and its spend this period against its budget."""
    tenants = data.get("tenants", [])
    title = f"{len(tenants)} tenants · version {data.get('version', 0)}"
    table = _table(title, _TENANT_COLUMNS, ("RPM", "TPM", "in flight", "spend"))
    for t in tenants:
        lim, use = t.get("limits", {}), t.get("usage", {})
        _row(
            table,
            t["name"],
            t["owner"],
            _keys_cell(t),
            _of(use.get("rpm", 0), lim.get("rpm")),
            _of(use.get("tpm", 0), lim.get("tpm")),
            _of(use.get("in_flight", 0), lim.get("max_in_flight")),
            _spend(t),
        )
    return table


_USAGE = ("tenant", "route", "provider", "requests", "prompt tok", "completion tok", "cost $")
_USAGE_FIGURES = frozenset(_USAGE[3:])


def usd(nano: int) -> str:
    """Nano-dollars as dollars to six decimals (a millionth of a dollar: cheap models' requests
    cost a few), exact: the integer is split, not divided as a float."""
    whole, frac = divmod(nano, 1_000_000_000)
    return f"{whole}.{frac // 1000:06d}"


def _figures(f: Figures) -> tuple[str, ...]:
    return (
        str(f.requests),
        str(f.prompt_tokens),
        str(f.completion_tokens),
        usd(f.cost_nano),
    )


def render_usage(report: UsageReport) -> RenderableType:
    """One period's usage: a row per tenant, route and provider, each tenant's total after its
    rows, and the whole period's total when there is more than one tenant."""
    who = f" · tenant {report.tenant}" if report.tenant else ""
    title = f"usage {report.period} {report.label} (UTC){who}"
    table = _table(title, _USAGE, _USAGE_FIGURES)
    totals = dict(report.totals)
    rows = list(report.rows)
    for i, row in enumerate(rows):
        _row(table, row.tenant, row.route, row.provider, *_figures(row.figures))
        if i + 1 == len(rows) or rows[i + 1].tenant != row.tenant:
            _row(table, row.tenant, "total", "", *_figures(totals[row.tenant]), style="bold")
    if len(totals) > 1:
        _row(table, "all tenants", "total", "", *_figures(report.total), style="bold")
    if not rows:
        return Group(table, Text("no usage recorded in this period", style="dim"))
    return table
