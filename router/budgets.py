"""Budget periods and costs, as pure functions: the readable specification.

The acquire script (``lua/acquire.lua``) computes the same period numbers from Redis's clock;
a property test holds the two equal. Periods are UTC calendar days, weeks (from Monday) and
months. Money is counted in whole nano-dollars (1e-9 USD), so every sum in Redis is exact
(a double holds integers to 2**53: nine million dollars of spend per period and tenant).
"""

from __future__ import annotations

import datetime as dt
import functools
import math

from router.config import BudgetPeriod, Price

NANO = 1_000_000_000
"""Nano-dollars per dollar."""
PERIOD_CODES = {BudgetPeriod.DAY: 1, BudgetPeriod.WEEK: 2, BudgetPeriod.MONTH: 3}
"""How the acquire script is told the period (0: no budget)."""
_EPOCH = dt.date(1970, 1, 1)


@functools.lru_cache(maxsize=256)
def _bounds(period: BudgetPeriod, day: int) -> tuple[int, int, int]:
    """The period holding day ``day`` (days since the epoch): its number, first second and
    end. Every request asks for it (acquire, lease, release, degraded checks), so each
    (period, day) is computed once."""
    if period is BudgetPeriod.DAY:
        return day, day * 86_400, (day + 1) * 86_400
    if period is BudgetPeriod.WEEK:
        week = (day + 3) // 7  # 1970-01-01 was a Thursday: day 4 is the first Monday
        return week, (7 * week - 3) * 86_400, (7 * week + 4) * 86_400
    date = _EPOCH + dt.timedelta(days=day)
    first = dt.date(date.year, date.month, 1)
    nxt = dt.date(date.year + date.month // 12, date.month % 12 + 1, 1)
    pid = date.year * 12 + date.month - 1
    return pid, (first - _EPOCH).days * 86_400, (nxt - _EPOCH).days * 86_400


def period_id(period: BudgetPeriod, sec: int) -> int:
    """The number of the period holding unix second ``sec``: days since the epoch, weeks
    since the Monday before it, or ``year * 12 + month - 1``."""
    return _bounds(period, sec // 86_400)[0]


def period_end(period: BudgetPeriod, sec: int) -> int:
    """The unix second the period holding ``sec`` ends (the next one starts)."""
    return _bounds(period, sec // 86_400)[2]


def period_bounds(period: BudgetPeriod, sec: int) -> tuple[int, int, int]:
    """The period holding ``sec``: its number, its first second and its end."""
    return _bounds(period, sec // 86_400)


def period_label(period: BudgetPeriod, sec: int) -> str:
    """The period holding ``sec`` as people write it: ``2026-12-01``, ``2026-W49``,
    ``2026-12``."""
    return _label(period, sec // 86_400)


@functools.lru_cache(maxsize=256)
def _label(period: BudgetPeriod, day: int) -> str:
    date = _EPOCH + dt.timedelta(days=day)
    if period is BudgetPeriod.DAY:
        return date.isoformat()
    if period is BudgetPeriod.WEEK:
        year, week, _ = date.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{date.year:04d}-{date.month:02d}"


def cost_nano(prompt: int, completion: int, price: Price | None) -> int:
    """What ``prompt`` and ``completion`` tokens cost at ``price``, in nano-dollars, rounded
    up (a target without a price costs nothing)."""
    if price is None:
        return 0
    exact = prompt * price.input_per_mtok * 1000 + completion * price.output_per_mtok * 1000
    return max(0, math.ceil(exact - 1e-6))  # 1e-6: float noise must not add a nano-dollar


def usd(nano: int) -> float:
    """Nano-dollars as dollars."""
    return nano / NANO
