"""Bearer tokens, and who they are: the admin token compared in constant time, a client key
resolved to its tenant by its hash (``router.replica.tenants``)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from router.config import SecretRef
from router.errors import BadRequest, Unauthorized
from router.replica.tenants import TenantView
from router.state.store import TenantPlan


def authorization(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's one ``Authorization`` header (``""`` if none), from its raw header list.

    A request with two is refused: which one counts would depend on who reads it (a dict keeps
    the last, Starlette's ``headers.get`` the first), so a key could pass one check and
    another key a second one.
    """
    found = [value for name, value in headers if name == b"authorization"]
    if len(found) > 1:
        raise BadRequest("the request has more than one Authorization header")
    return found[0].decode("latin-1") if found else ""


def api_key(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's one ``x-api-key`` header (Anthropic's way to send a key; ``""`` if
    none): two are refused, as two Authorization headers are."""
    found = [value for name, value in headers if name == b"x-api-key"]
    if len(found) > 1:
        raise BadRequest("the request has more than one x-api-key header")
    return found[0].decode("latin-1") if found else ""


def bearer_token(header: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header, or ``b""`` for any other."""
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


class KeyRing:
    """A set of secret keys; membership compares against every key, so timing tells nothing."""

    def __init__(self, refs: Iterable[SecretRef]) -> None:
        self._keys = [ref.value.get_secret_value().encode() for ref in refs]

    def holds(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is one of the keys (an empty candidate never is)."""
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found and bool(candidate)


class ClientKeys:
    """Who may call the API: the tenants' keys (the config's ``client_keys`` are the
    ``default`` tenant's). The API resolves a key to its tenant before a request reaches the
    replica's parts, which never see a key, only the tenant's plan."""

    def __init__(self, view: TenantView) -> None:
        self.view = view
        """Its ``directory`` is swapped whole on every change: read it once per request."""

    def tenant(self, header: str) -> TenantPlan:
        """The tenant of ``header``'s bearer key; ``Unauthorized`` unless it is one."""
        plan = self.view.directory.resolve(bearer_token(header))
        if plan is None:
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)")
        return plan

    def check(self, header: str) -> None:
        """Raise ``Unauthorized`` unless ``header`` is ``Bearer`` and a tenant's key."""
        self.tenant(header)

    def holds(self, token: bytes) -> bool:
        """Whether ``token`` is a tenant's key (the admin API tells it from a wrong token)."""
        return self.view.directory.resolve(token) is not None
