"""``routerctl``: operate a cluster from the command line."""

from __future__ import annotations

import argparse
import sys

from router.config import load_config
from router.errors import ConfigError
from router.launcher import add_arguments as add_up_arguments
from router.launcher import up as run_up


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
    args = parser.parse_args(argv)
    if args.command == "check-config":
        sys.exit(check_config(args.file))
    if args.command == "up":
        sys.exit(run_up(args))


if __name__ == "__main__":
    main()
