"""The Redis key schema: the only module that spells a key name.

Every key that one script call touches carries the same hash tag, the provider pool
(``{pool}``), so each script runs in a single Redis Cluster slot. A provider's state is
shared by every route that uses it, so provider keys are named by the pool, not the route.

    <prefix>:{<pool>}:provider:<name>          hash, bounded: see PROVIDER_FIELDS
    <prefix>:{<pool>}:provider:<name>:leases   zset lease id -> expiry (ms), purged on use
    <prefix>:{<pool>}:route:<model>:rr         string, the shared rotation counter
    <prefix>:{<pool>}:route:<model>:swrr       hash target index -> current weight (nginx SWRR)
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_BUCKETS = 62
"""Buckets of one second in a sliding window: the current one and the 61 before it."""

PROVIDER_FIELDS = {
    "wh": "oldest window bucket still held (unix second)",
    "rpm": "requests in the window (sum of the r:<second> fields)",
    "tpm": "tokens in the window (sum of the t:<second> fields)",
    "r:<second>": "requests admitted in that second (at most WINDOW_BUCKETS fields)",
    "t:<second>": "tokens reserved in that second (at most WINDOW_BUCKETS fields)",
    "cool": "cooldown until (unix ms), set from a 429's Retry-After or reset header",
    "health": "up | down, written by healthd (absent = unknown = usable)",
    "ttft": "peak EWMA of time to first token (ms)",
    "tpot": "peak EWMA of time per output token (ms)",
    "lt": "when the EWMAs were last updated (unix ms)",
    "fails": "consecutive failed outcomes",
    "o:<outcome>": "outcome counters (ok, http_5xx, http_429, timeout, ...)",
}


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (``prefix``) and provider pool."""

    prefix: str
    pool: str

    @property
    def _base(self) -> str:
        return f"{self.prefix}:{{{self.pool}}}"

    def provider(self, name: str) -> str:
        """Hash with the provider's windows, EWMAs, cooldown, health and counters."""
        return f"{self._base}:provider:{name}"

    def leases(self, name: str) -> str:
        """Sorted set of the provider's in-flight leases, scored by expiry (ms)."""
        return f"{self._base}:provider:{name}:leases"

    def rotation(self, route: str) -> str:
        """The route's shared round-robin counter."""
        return f"{self._base}:route:{route}:rr"

    def swrr(self, route: str) -> str:
        """The route's smooth weighted round-robin state."""
        return f"{self._base}:route:{route}:swrr"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment and pool."""
        return f"{self._base}:*"
