"""Read usage: what each tenant used of each route and provider, per UTC day or month.

The release script writes the figures (``router.state.keys``: ``USAGE_FIGURES``) into one
hash per period, ``Keys.usage(period, label)``, a field per tenant, route, provider and
figure: ``<tenant>|<route>|<provider>|<figure>``. Tenant and provider names never hold a
``|`` (their name patterns), a route model may: the tenant is split off at the first ``|``,
the figure and provider at the last two. A request counts in the day and month (Redis time)
it was admitted in.

One period is one ``HGETALL``, bounded by the hash's size: tenants (``max_tenants``) x routes
x providers x 4 figures. Nothing here is a secret: names and numbers only. Rendering lives in
``router.ctl.tables``; the JSON schema is ``usage_json``'s.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import RedisError

from router.budgets import NANO, period_label
from router.config import TENANT_NAME, BudgetPeriod
from router.errors import BadRequest, StoreError
from router.state.store import Store, decode_text

SCHEMA = 1
"""Version of the JSON schema of ``usage_json``; bumped on any incompatible change."""

Period = Literal["day", "month"]
PERIODS: dict[str, Period] = {"day": "day", "month": "month"}
_LABEL = {"day": re.compile(r"^\d{4}-\d{2}-\d{2}$"), "month": re.compile(r"^\d{4}-\d{2}$")}
_LABEL_TEXT = {"day": "YYYY-MM-DD", "month": "YYYY-MM"}
_FIGURES = ("req", "in", "out", "cost")


@dataclass(frozen=True, slots=True)
class Figures:
    """What was used: requests served, prompt and completion tokens, cost (nano-USD)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0

    @property
    def cost_usd(self) -> float:
        """The cost in US dollars."""
        return self.cost_nano / NANO

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_nano + other.cost_nano,
        )


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One tenant's use of one route through one provider."""

    tenant: str
    route: str
    provider: str
    figures: Figures


@dataclass(frozen=True, slots=True)
class UsageReport:
    """One period's usage: a row per tenant, route and provider, and each tenant's total."""

    schema: int
    period: Period
    label: str
    taken_at_ms: int
    tenant: str | None
    """The tenant the report is limited to, if any."""
    rows: tuple[UsageRow, ...]
    totals: tuple[tuple[str, Figures], ...]
    """Per tenant, by name."""
    total: Figures


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What to read: a period, which one (``None``: the current), of which tenant."""

    period: Period = "day"
    label: str | None = None
    tenant: str | None = None


def usage_query(period: str, label: str | None, tenant: str | None) -> UsageQuery:
    """The query, validated; ``BadRequest`` (naming the parameter) when one is wrong."""
    if period not in PERIODS:
        raise BadRequest(f"period must be 'day' or 'month', not '{period[:20]}'", "period")
    p = PERIODS[period]
    if label is not None and not _valid_label(p, label):
        raise BadRequest(
            f"a {p}'s label is a UTC date written {_LABEL_TEXT[p]}, not '{label[:20]}'", "at"
        )
    if tenant is not None and not re.match(TENANT_NAME, tenant):
        raise BadRequest("a tenant name is 1 to 64 letters, digits, '.', '_' or '-'", "tenant")
    return UsageQuery(p, label, tenant)


def _valid_label(period: Period, label: str) -> bool:
    if not _LABEL[period].match(label):
        return False
    try:  # a real date: not 2026-02-30, not month 13
        dt.date.fromisoformat(label if period == "day" else f"{label}-01")
    except ValueError:
        return False
    return True


def current_label(period: Period, sec: int) -> str:
    """The label of the period holding unix second ``sec`` (``2026-12-01``, ``2026-12``)."""
    return period_label(BudgetPeriod(period), sec)


def parse_field(field: str) -> tuple[str, str, str, str] | None:
    """``<tenant>|<route>|<provider>|<figure>`` as its four parts; ``None`` when the field
    is not one (too few parts, an empty one)."""
    tenant, sep, rest = field.partition("|")
    parts = rest.rsplit("|", 2)
    if not sep or len(parts) != 3 or not tenant or not all(parts):
        return None
    route, provider, figure = parts
    return tenant, route, provider, figure


def _count(value: str) -> int:
    try:
        return int(value)
    except ValueError:  # not written by us as an integer: read what it says, rounded
        try:
            return int(float(value))
        except ValueError:
            return 0


def parse_usage(
    raw: Mapping[str, str], tenant: str | None = None
) -> tuple[tuple[UsageRow, ...], tuple[tuple[str, Figures], ...], Figures]:
    """A usage hash as rows (by tenant, route, provider), totals per tenant, and the total.

    Fields that are not ``<tenant>|<route>|<provider>|<figure>`` with a known figure are
    skipped: a newer release may record more figures than this reader knows."""
    found: dict[tuple[str, str, str], dict[str, int]] = {}
    for field, value in raw.items():
        parts = parse_field(field)
        if parts is None or parts[3] not in _FIGURES:
            continue
        if tenant is not None and parts[0] != tenant:
            continue
        figures = found.setdefault(parts[:3], {})
        figures[parts[3]] = figures.get(parts[3], 0) + _count(value)
    rows = tuple(
        UsageRow(
            t, r, p, Figures(f.get("req", 0), f.get("in", 0), f.get("out", 0), f.get("cost", 0))
        )
        for (t, r, p), f in sorted(found.items())
    )
    per_tenant: dict[str, Figures] = {}
    for row in rows:
        per_tenant[row.tenant] = per_tenant.get(row.tenant, Figures()) + row.figures
    return rows, tuple(per_tenant.items()), _sum(per_tenant.values())


def _sum(figures: Iterable[Figures]) -> Figures:
    total = Figures()
    for f in figures:
        total += f
    return total


async def read_usage(
    store: Store, period: Period = "day", label: str | None = None, tenant: str | None = None
) -> UsageReport:
    """One period's usage (``label``: the current period by Redis's clock when ``None``),
    of one tenant or of all: a ``TIME`` and one ``HGETALL``. Raises ``StoreError``."""
    try:
        sec, usec = await store.client.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        label = label or current_label(period, int(sec))
        raw = await store.client.hgetall(store.keys.usage(period, label))
    except RedisError as exc:
        raise StoreError(f"read failed: {exc}") from exc
    fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
    rows, totals, total = parse_usage(fields, tenant)
    return UsageReport(SCHEMA, period, label, now_ms, tenant, rows, totals, total)


def _figures_json(f: Figures) -> dict[str, Any]:
    return {
        "requests": f.requests,
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "cost_nano": f.cost_nano,
        "cost_usd": f.cost_usd,
    }


def usage_json(report: UsageReport) -> dict[str, Any]:
    """The documented, stable JSON form of ``report`` (schema ``SCHEMA``): cost both exact,
    in nano-USD (``cost_nano``), and in dollars (``cost_usd``)."""
    return {
        "schema": report.schema,
        "period": report.period,
        "label": report.label,
        "taken_at_ms": report.taken_at_ms,
        "tenant": report.tenant,
        "rows": [
            {
                "tenant": r.tenant,
                "route": r.route,
                "provider": r.provider,
                **_figures_json(r.figures),
            }
            for r in report.rows
        ],
        "tenants": [{"tenant": name, **_figures_json(f)} for name, f in report.totals],
        "total": _figures_json(report.total),
    }
