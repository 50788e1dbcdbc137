"""``router``: start one replica."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from router.config import Config, load_config
from router.errors import ConfigError


def config_from_args(path: str | None) -> Config:
    """Load the config named by ``--config`` or ``ROUTER_CONFIG``; exit 2 with every problem."""
    path = path or os.environ.get("ROUTER_CONFIG")
    if not path:
        sys.exit("router: no config file: pass --config FILE or set ROUTER_CONFIG")
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for field, message in exc.problems:
            print(f"  {field}: {message}" if field else f"  {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``router`` command."""
    parser = argparse.ArgumentParser(prog="router", description="Run one router replica.")
    parser.add_argument("--config", help="YAML config file (default: $ROUTER_CONFIG)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    cfg = config_from_args(args.config)

    from router.app import create_app  # after the config, so a bad file fails fast
    from router.logs import setup_logging

    setup_logging(cfg.log)
    uvicorn.run(
        create_app(cfg),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
