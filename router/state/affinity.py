"""Affinity keys as the acquire script is told them: a key's digest, its rendezvous order over
a route's targets, and the pin request one decision carries.

Every replica computes the same digest and order for the same key (no shared state, no
randomness), so a key with no pin yet goes to the same target whichever replica sees it first.
The pin itself lives in Redis (``Keys.pin``, ``Keys.response_pin``), read and written by the
acquire script in the decision's own round trip; ``router.strategies.place`` is its rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from hashlib import blake2b
from typing import Literal

MAX_RESPONSE_ID = 256
"""Longest response id put in a key name (a client's ``previous_response_id`` is checked
against it before any Redis call)."""


def affinity_digest(route: str, value: str) -> str:
    """The key's name in Redis: 16 bytes of blake2b over the route and the key's value (so
    a value of any length, a prompt prefix say, makes a short key, and never shows in it)."""
    return blake2b(f"{route}\0{value}".encode(), digest_size=16).hexdigest()


def hrw_order(digest: str, providers: Sequence[str]) -> list[int]:
    """The targets' 0-based indices in rendezvous (highest random weight) order for ``digest``:
    adding or removing a target moves only the keys whose first choice it is or was."""
    seed = bytes.fromhex(digest)

    def weight(i: int) -> bytes:
        return blake2b(seed + providers[i].encode(), digest_size=8).digest()

    return sorted(range(len(providers)), key=lambda i: (weight(i), -i), reverse=True)


class PinMode(IntEnum):
    """How a decision treats a pin (the numbers are the acquire script's)."""

    PREFERRED = 1
    """A session or prompt-prefix key: followed while its target can take the request, moved
    otherwise, made when absent."""
    REQUIRED = 2
    """A response id's pin (``previous_response_id``): only its target holds the state."""


@dataclass(frozen=True, slots=True)
class PinRequest:
    """One decision's affinity: which pin to read, how to treat it, how to make one."""

    kind: Literal["route", "response"]
    key: str
    """The digest (``affinity_digest``) for ``route``, the response id for ``response``."""
    mode: PinMode
    ttl_ms: int
    """A pin written or refreshed now lives this long."""
    order: tuple[int, ...] = ()
    """0-based target indices in rendezvous order (``hrw_order``): where a key with no pin
    goes (preferred pins only)."""
    load_factor: float = 1.25
    tenant: str = ""
    """The request's tenant: written in the pin; a required pin of another is not honoured."""

    @classmethod
    def preferred(
        cls,
        route: str,
        value: str,
        providers: Sequence[str],
        *,
        ttl_s: float,
        load_factor: float,
        tenant: str = "",
    ) -> PinRequest:
        """The pin request of an affinity key's ``value`` on ``route``."""
        digest = affinity_digest(route, value)
        order = tuple(hrw_order(digest, providers))
        return cls(
            "route", digest, PinMode.PREFERRED, int(ttl_s * 1000), order, load_factor, tenant
        )

    @classmethod
    def response(cls, response_id: str, *, ttl_s: float, tenant: str = "") -> PinRequest:
        """The pin request of a ``previous_response_id``."""
        return cls("response", response_id, PinMode.REQUIRED, int(ttl_s * 1000), tenant=tenant)


@dataclass(frozen=True, slots=True)
class Pin:
    """A pin as stored: ``<provider>|<expires ms>|<tenant>`` (names hold no '|')."""

    provider: str
    expires_ms: int
    tenant: str

    @classmethod
    def parse(cls, value: str) -> Pin | None:
        """The pin stored as ``value``; ``None`` for anything else."""
        provider, _, rest = value.partition("|")
        expires, _, tenant = rest.partition("|")
        if not provider or not expires.isdigit():
            return None
        return cls(provider, int(expires), tenant)
