"""``routerctl``: operate a cluster from the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from router.config import Config, load_config
from router.errors import ConfigError, StoreError
from router.launcher import add_arguments as add_up_arguments
from router.launcher import up as run_up
from router.store import HealthStore, Store


def check_config(path: str) -> int:
    """Validate ``path``; print every problem with its field path. Exit status 0 or 1."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for field, message in exc.problems:
            print(f"{field}: {message}" if field else message)
        return 1
    store = cfg.redis_url or "embedded in-process store"
    print(f"{path}: ok ({len(cfg.providers)} providers, {len(cfg.routes)} routes, {store})")
    return 0


def _cluster_config(path: str | None) -> Config:
    from router.cli import config_from_args  # exits 2 with every problem

    cfg = config_from_args(path)
    if not cfg.redis_url:
        sys.exit("routerctl: the config names no Redis (redis_url or REDIS_URL)")
    return cfg


async def _set_drain(cfg: Config, provider: str, drained: bool) -> int:
    store = Store.from_config(cfg)
    try:
        await store.start()
        return await HealthStore(store).set_drain(provider, drained)
    finally:
        await store.close()


def drain(path: str | None, provider: str, drained: bool) -> int:
    """Drain (or enable) ``provider`` for every replica. Exit status 0, 1 or 2."""
    cfg = _cluster_config(path)
    if provider not in {p.name for p in cfg.providers}:
        print(f"routerctl: no provider named {provider!r} in the config", file=sys.stderr)
        return 2
    try:
        version = asyncio.run(_set_drain(cfg, provider, drained))
    except StoreError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    verb = "drained" if drained else "enabled"
    print(f"{provider}: {verb} for every replica (health version {version})")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``routerctl`` command."""
    parser = argparse.ArgumentParser(prog="routerctl", description="Operate a router cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    up = sub.add_parser(
        "up", help="run a local cluster: mock providers, Redis and replicas, until Ctrl-C"
    )
    add_up_arguments(up)
    for name, text in (("drain", "stop sending traffic to"), ("enable", "send traffic again to")):
        cmd = sub.add_parser(name, help=f"{text} a provider, on every replica")
        cmd.add_argument("provider")
        cmd.add_argument("--config", default=os.environ.get("ROUTER_CONFIG"))
    args = parser.parse_args(argv)
    if args.command in ("drain", "enable"):
        sys.exit(drain(args.config, args.provider, args.command == "drain"))
    if args.command == "check-config":
        sys.exit(check_config(args.file))
    if args.command == "up":
        sys.exit(run_up(args))


if __name__ == "__main__":
    main()
