"""``routerctl tenants`` and ``routerctl tenant add|key-add|key-revoke``: the admin API, over
HTTP (``router.api.tenants_admin``), so they work against any replica the operator reaches,
with the admin token, and never need Redis.

The replica is ``--url`` (any replica: they share the state), else the one local cluster of
``routerctl up``. The admin token is read from the variable ``--admin-token-env`` names
(default ``ROUTER_ADMIN_TOKEN``): a flag holding the token itself would show in ``ps`` and
the shell's history. Nothing here prints the token; ``key-add`` prints the new key, once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import httpx
from rich.console import Console

from router.config import TENANT_NAME
from router.ctl.local import Registry
from router.ctl.tables import render_tenants

TOKEN_ENV = "ROUTER_ADMIN_TOKEN"
TIMEOUT_S = 10.0


class CtlError(Exception):
    """What went wrong, as one line for the operator (never holding the token)."""


def _fail(text: str) -> int:
    print(f"routerctl: {text}", file=sys.stderr)
    return 1


def base_url(url: str | None, environ: Mapping[str, str]) -> str:
    """``--url``, else the endpoint of the one local cluster of ``routerctl up``."""
    if url:
        return url.rstrip("/").removesuffix("/v1")
    records = Registry.for_user(environ).running()
    if len(records) != 1:
        which = (
            "no local cluster of `routerctl up` is running"
            if not records
            else (f"{len(records)} local clusters are running")
        )
        raise CtlError(f"pass --url http://HOST:PORT of a replica ({which})")
    print(f"routerctl: {records[0].describe()}", file=sys.stderr)
    return records[0].endpoint.rstrip("/").removesuffix("/v1")


def admin_token(variable: str, environ: Mapping[str, str]) -> str:
    """The admin token from the environment variable ``variable``."""
    token = environ.get(variable, "")
    if not token:
        raise CtlError(
            f"the admin token is read from ${variable}, which is not set (the config's "
            "admin_token; --admin-token-env names another variable)"
        )
    return token


class AdminClient:
    """Calls to one replica's admin API; an error answer becomes a ``CtlError``."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The answer's JSON; ``CtlError`` with the API's own message on an error."""
        try:
            r = httpx.request(
                method, f"{self.url}{path}", json=body, headers=self._headers, timeout=TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise CtlError(f"cannot reach {self.url}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.is_success:
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise CtlError(f"{r.status_code} {error.get('code')}: {error.get('message')}")
        raise CtlError(f"{method} {path}: HTTP {r.status_code}")


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    limits = {"rpm": args.rpm, "tpm": args.tpm, "max_in_flight": args.max_in_flight}
    spec: dict[str, Any] = {
        "name": args.name,
        "limits": {k: v for k, v in limits.items() if v is not None},
    }
    if args.budget_usd is not None:
        spec["budget"] = {"usd": args.budget_usd, "period": args.period}
    if args.routes is not None:
        spec["routes"] = [r.strip() for r in args.routes.split(",") if r.strip()]
    return spec


def _run(args: argparse.Namespace, client: AdminClient) -> None:
    if args.command == "tenants":
        data = client.call("GET", "/admin/tenants")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            Console().print(render_tenants(data))
        return
    name = args.name
    if args.action == "add":
        data = client.call("POST", "/admin/tenants", _spec(args))
        print(f"{name}: created (tenants version {data['version']})")
    elif args.action == "key-add":
        data = client.call("POST", f"/admin/tenants/{name}/keys")
        print(f"{name}: key {data['id']} issued; it is shown this once:", file=sys.stderr)
        print(data["key"])
    else:
        data = client.call("DELETE", f"/admin/tenants/{name}/keys/{args.key_id}")
        print(f"{name}: key {args.key_id} revoked on every replica (version {data['version']})")


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run ``tenants`` or ``tenant ...``; exit status 0, 1 (an error), 2 (nothing to call)."""
    env = os.environ if environ is None else environ
    try:
        client = AdminClient(base_url(args.url, env), admin_token(args.admin_token_env, env))
    except CtlError as exc:
        _fail(str(exc))
        return 2
    try:
        _run(args, client)
    except CtlError as exc:
        return _fail(str(exc))
    return 0


def _name(text: str) -> str:
    if not re.match(TENANT_NAME, text):
        raise argparse.ArgumentTypeError("letters, digits, '.', '_' and '-', at most 64")
    return text


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _connection(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--url", help="a replica, http://HOST:PORT (default: the local cluster of routerctl up)"
    )
    cmd.add_argument(
        "--admin-token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"the variable holding the admin token (default: {TOKEN_ENV})",
    )


def add_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tenants`` and ``tenant add|key-add|key-revoke``."""
    show = sub.add_parser("tenants", help="list tenants: keys, use against limits, spend")
    show.add_argument("--json", action="store_true", help="the admin API's JSON, as it came")
    _connection(show)
    tenant = sub.add_parser("tenant", help="create a tenant, issue or revoke its keys")
    actions = tenant.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a tenant (the admin API owns it)")
    add.add_argument("name", type=_name)
    add.add_argument("--rpm", type=_positive(int))
    add.add_argument("--tpm", type=_positive(int))
    add.add_argument("--max-in-flight", type=_positive(int))
    add.add_argument("--budget-usd", type=_positive(float), metavar="USD")
    add.add_argument("--period", choices=["day", "week", "month"], default="month")
    add.add_argument("--routes", metavar="A,B", help="the route models it may use (default: all)")
    _connection(add)
    key_add = actions.add_parser("key-add", help="issue a key; printed once, on stdout")
    key_add.add_argument("name", type=_name)
    _connection(key_add)
    revoke = actions.add_parser("key-revoke", help="revoke an issued key, by its id")
    revoke.add_argument("name", type=_name)
    revoke.add_argument("key_id", metavar="ID")
    _connection(revoke)
