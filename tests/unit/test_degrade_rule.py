"""When a replica goes degraded: after Redis calls have failed for ``degrade_after_s`` with
none answered in between; not on one failure, nor on a burst of failures at one moment."""

from __future__ import annotations

from typing import Any

import pytest

from router.errors import StoreError
from router.replica import degraded
from router.replica.degraded import SharedMode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Redis:
    """What ``SharedMode`` reads of the store: calls answered so far, and the probe."""

    embedded = False

    def __init__(self) -> None:
        self.answered = 0
        self.up = False

    async def time_ms(self) -> int:
        if not self.up:
            raise StoreError("down")
        self.answered += 1
        return 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(degraded, "time", c)
    return c


@pytest.fixture
def redis() -> Redis:
    return Redis()


def mode_of(redis: Redis, after_s: float) -> SharedMode:
    store: Any = redis  # the attributes SharedMode reads
    return SharedMode(store, degrade_after_s=after_s)


# (seconds since the first failure of each failed call, calls answered just before it,
#  degraded after the last one?)
CASES = [
    ([0.0], [0], False),  # one slow call
    ([0.0] * 100, [0] * 100, False),  # a burst: one stall failed a whole queue at once
    ([0.0, 0.2, 0.4], [0, 0, 0], False),
    ([0.0, 0.2, 0.5], [0, 0, 0], True),  # failing, not one answer, for 0.5 s
    ([0.0, 0.3, 0.6], [0, 1, 0], False),  # an answer at 0.3 s began a new run
    ([0.0, 0.3, 0.6, 0.9], [0, 1, 0, 0], True),  # which has failed for 0.6 s by 0.9 s
]


@pytest.mark.parametrize(("at", "answered", "degraded_after"), CASES)
async def test_degraded_once_failures_span_the_window_with_no_answer(
    clock: Clock, redis: Redis, at: list[float], answered: list[int], degraded_after: bool
) -> None:
    mode = mode_of(redis, 0.5)
    start = clock.now
    for t, n in zip(at, answered, strict=True):
        clock.now = start + t
        redis.answered += n
        mode.enter(StoreError("timed out"))
    assert mode.degraded is degraded_after
    await mode.stop()


async def test_zero_means_the_first_failure(clock: Clock, redis: Redis) -> None:
    mode = mode_of(redis, 0.0)
    mode.enter(StoreError("timed out"))
    assert (mode.degraded, mode.episodes) == (True, 1)
    await mode.stop()


async def test_one_answered_probe_brings_it_back(clock: Clock, redis: Redis) -> None:
    mode = mode_of(redis, 0.0)
    calls: list[str] = []

    async def resync() -> None:
        calls.append("resync")

    mode.on_recovery.append(resync)
    mode.degrade(StoreError("gone"))
    redis.up = True
    task = mode._task  # the recovery loop, awaited to its end
    assert task is not None
    await task
    assert (mode.degraded, calls, redis.answered) == (False, ["resync"], 1)
