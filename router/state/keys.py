"""The Redis key schema: the only module that spells a key name.

Every key that one script call touches carries the same hash tag, the provider pool
(``{pool}``), so each script runs in a single Redis Cluster slot. A provider's state is
shared by every route that uses it, so provider keys are named by the pool, not the route.

    <prefix>:{<pool>}:provider:<name>          hash, bounded: see PROVIDER_FIELDS
    <prefix>:{<pool>}:provider:<name>:leases   zset lease id -> expiry (ms), purged on use
    <prefix>:{<pool>}:route:<model>:rr         string, the shared rotation counter
    <prefix>:{<pool>}:route:<model>:wrr        string: current weights, comma-separated, in
                                               target order (nginx smooth weighted RR)
    <prefix>:{<pool>}:route:<model>:queue      zset ticket -> place (band, then virtual finish)
    <prefix>:{<pool>}:route:<model>:queue:exp  zset ticket -> expiry (ms): waiters renew theirs
    <prefix>:{<pool>}:route:<model>:queue:vt   hash: 'V' virtual time, 'f:<tenant>' finish tags
    <prefix>:{<pool>}:waiting                  string: tickets waiting in every route's queue
    <prefix>:freed                             pub/sub channel: a provider has room again
    <prefix>:{<pool>}:health:version           string, bumped on every health transition
    <prefix>:{<pool>}:healthd:leader           string with expiry: the leading healthd's id
    <prefix>:{<pool>}:healthd:epoch            string, the fencing token, bumped per new leader
    <prefix>:{<pool>}:replicas                 zset replica id -> last heartbeat (ms)
    <prefix>:{<pool>}:replica:<id>             hash with expiry: one replica's heartbeat record
    <prefix>:{<pool>}:tenant:<name>            hash: its window's past seconds (r:<s>, t:<s>)
    <prefix>:{<pool>}:tenant:<name>:live       string: its live figures, packed (TENANT_LIVE)
    <prefix>:{<pool>}:tenants                  hash tenant name -> JSON spec (admin-created ones)
    <prefix>:{<pool>}:tenant-keys              hash sha256(key) hex -> JSON {tenant, id, created}
    <prefix>:{<pool>}:tenants:version          string, bumped on every change of the two above
    <prefix>:{<pool>}:usage:day:<YYYY-MM-DD>   hash "<tenant>|<route>|<provider>|<figure>" -> int
    <prefix>:{<pool>}:usage:month:<YYYY-MM>    the same per month (figures: see USAGE_FIGURES)
    <prefix>:{<pool>}:pin:<route>:<digest>     string with expiry (PX): an affinity pin,
                                               '<provider>|<expires ms>|<tenant>'
    <prefix>:{<pool>}:response:<id>            the same for a Responses API answer's id
    <prefix>:{<pool>}:pins:<provider>          zset pin key's suffix after the pool tag
                                               ('pin:<route>:<digest>', 'response:<id>') ->
                                               expiry (ms): the provider's pins, trimmed on write
    <prefix>:health                            pub/sub channel of health transitions (JSON)
    <prefix>:tenants                           pub/sub channel of tenant and key changes (JSON)
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
    "inf": "leases in flight: the size of the provider's lease zset (acquire reads it here)",
    "nm": "next maintenance (unix ms): at most when the oldest bucket leaves the window and "
    "every lease's expiry; from then on acquire slides the window and purges the lease zset",
    "gate": "present when something may block the provider (down, drained, circuit, "
    "cooldown); acquire then reads those fields, and drops it once none blocks",
    "cool": "cooldown until (unix ms), set from a 429's Retry-After or reset header",
    "health": "up | down, written by healthd (absent = unknown = usable)",
    "h_since": "when the health state last changed (unix ms)",
    "h_ok": "consecutive good probes",
    "h_bad": "consecutive bad probes",
    "h_error": "the last probe error (no secrets)",
    "h_latency": "the last probe's latency (ms)",
    "h_at": "when the last probe ran (unix ms)",
    "circ": "circuit: absent/closed, open, half (a trial request in flight)",
    "circ_until": "open circuit: when a trial may go (unix ms); half: when the trial expires",
    "circ_opens": "times the circuit opened in a row (the backoff exponent)",
    "drain": "1 when an operator drained the provider (routerctl drain)",
    "ttft": "peak EWMA of time to first token (ms)",
    "tpot": "peak EWMA of time per output token (ms)",
    "lt": "when the EWMAs were last updated (unix ms)",
    "fails": "consecutive failed outcomes",
    "o:<outcome>": "outcome counters (ok, http_5xx, http_429, timeout, ...)",
}


TENANT_FIELDS = {
    "r:<second>": "requests admitted in that second, once it is over (at most WINDOW_BUCKETS)",
    "t:<second>": "tokens in that second, corrected to the reported usage (the same)",
}
"""The tenant's hash: its window's past seconds. Everything read or written per request is in
its live string instead, one GET and one SET (a hash's HMGET and HSET cost twice as much)."""

TENANT_ARGS_FORMAT = "<11d"
"""The acquire script's tenant block ARGV, packed in one argument (eleven numbers as text would
each cost Redis a ``strtod``): limits, tokens, budget, period code, cost, counted, and the
caller's guess of the period (acquire.lua's header)."""
TENANT_LIVE_FORMAT = "<10d"
"""The live string: ten little-endian doubles (Lua's ``struct`` '<dddddddddd'), exact for
integers up to 2**53."""
TENANT_LIVE = (
    ("rpm", "requests admitted in the window (its past seconds and this one)"),
    ("tpm", "tokens in the window, corrected to the reported usage as requests end"),
    ("in_flight", "requests in flight, kept with a max_in_flight (lease ids end '@<tenant>')"),
    ("next_maintenance_ms", "when the window next slides (seconds leave it)"),
    ("period", "the spend period (router.budgets.period_id), -1 before the first"),
    ("spend_nano", "spend in that period: served requests' cost and reservations in flight"),
    ("second", "the second the next three fields are of"),
    ("second_requests", "requests admitted in that second"),
    ("second_tokens", "tokens in that second"),
    ("oldest", "the oldest second the totals hold (0: no window yet)"),
)
"""The live string's fields, in order: what each holds."""

USAGE_FIGURES = {
    "req": "requests served (answered by the provider, successfully or not)",
    "in": "prompt tokens, as the provider reported them",
    "out": "completion tokens, as the provider reported them",
    "cost": "cost in nano-USD (1e-9 USD): the tokens times the target's price",
}
USAGE_DAY_TTL_S = 62 * 86_400
"""How long a day's usage hash is kept (it expires this long after its first write)."""
USAGE_MONTH_TTL_S = 400 * 86_400
"""How long a month's usage hash is kept."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (``prefix``) and provider pool."""

    prefix: str
    pool: str

    @property
    def _base(self) -> str:
        return f"{self.prefix}:{{{self.pool}}}"

    @property
    def base(self) -> str:
        """``<prefix>:{<pool>}``, which every key of the pool begins with: a script that
        derives a key of the same slot (a provider's pins) is given it."""
        return self._base

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
        return f"{self._base}:route:{route}:wrr"

    def queue(self, route: str) -> str:
        """The route's wait queue: ticket -> place (priority band, then virtual finish time)."""
        return f"{self._base}:route:{route}:queue"

    def queue_expiry(self, route: str) -> str:
        """The route's waiting tickets -> expiry (ms); a waiter renews its own."""
        return f"{self._base}:route:{route}:queue:exp"

    def queue_clock(self, route: str) -> str:
        """The route's fair-queueing clock: 'V' and each tenant's last finish tag."""
        return f"{self._base}:route:{route}:queue:vt"

    def waiting(self) -> str:
        """How many tickets wait in the pool's queues (release.lua publishes only then)."""
        return f"{self._base}:waiting"

    def freed_channel(self) -> str:
        """The pub/sub channel on which releases say a provider has room again."""
        return f"{self.prefix}:freed"

    def health_version(self) -> str:
        """Counter bumped on every health transition: the snapshot's version."""
        return f"{self._base}:health:version"

    def leader(self) -> str:
        """The healthd leader lease (its holder's id, with an expiry)."""
        return f"{self._base}:healthd:leader"

    def epoch(self) -> str:
        """The healthd fencing token, bumped each time a new leader takes the lease."""
        return f"{self._base}:healthd:epoch"

    def replicas(self) -> str:
        """Sorted set of replica ids by last heartbeat (ms)."""
        return f"{self._base}:replicas"

    def replica(self, replica_id: str) -> str:
        """One replica's heartbeat record."""
        return f"{self._base}:replica:{replica_id}"

    def health_channel(self) -> str:
        """The pub/sub channel of health transitions."""
        return f"{self.prefix}:health"

    def tenant(self, name: str) -> str:
        """Hash with the tenant's windows and its spend this budget period."""
        return f"{self._base}:tenant:{name}"

    def tenant_live(self, name: str) -> str:
        """The tenant's live figures: one packed string (``TENANT_LIVE``)."""
        return f"{self._base}:tenant:{name}:live"

    def tenants(self) -> str:
        """Hash of the tenants created through the admin API: name -> JSON spec."""
        return f"{self._base}:tenants"

    def tenant_keys(self) -> str:
        """Hash of the keys issued through the admin API: sha256 hex -> JSON record."""
        return f"{self._base}:tenant-keys"

    def tenants_version(self) -> str:
        """Counter bumped on every change of the tenants or their issued keys."""
        return f"{self._base}:tenants:version"

    def tenants_channel(self) -> str:
        """The pub/sub channel of tenant and key changes."""
        return f"{self.prefix}:tenants"

    def usage(self, period: str, label: str) -> str:
        """Usage hash of one day (``period="day"``, label ``YYYY-MM-DD``) or month
        (``"month"``, ``YYYY-MM``)."""
        return f"{self._base}:usage:{period}:{label}"

    def pin(self, route: str, digest: str) -> str:
        """A key's affinity pin on ``route`` (``digest``: ``affinity.affinity_digest``)."""
        return f"{self._base}:pin:{route}:{digest}"

    def response_pin(self, response_id: str) -> str:
        """The provider that made a Responses API answer (and holds its state)."""
        return f"{self._base}:response:{response_id}"

    def pins(self, provider: str) -> str:
        """The provider's pins: each pin key's suffix after the pool tag -> its expiry (ms)."""
        return f"{self._base}:pins:{provider}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment and pool."""
        return f"{self._base}:*"
