"""``router``: start one replica (the serving itself is ``router.api.server``)."""

from __future__ import annotations

import argparse
import sys

from router.api.server import serve
from router.config import config_from_args, print_problems
from router.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``router`` command."""
    parser = argparse.ArgumentParser(prog="router", description="Run one router replica.")
    parser.add_argument("--config", help="YAML config file (default: $ROUTER_CONFIG)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share --port with other replicas on this machine (SO_REUSEPORT)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args.config)

    from router.api.app import create_app  # after the config, so a bad file fails fast
    from router.telemetry.logs import setup_logging

    setup_logging(cfg.log)
    try:
        app = create_app(cfg)
    except ConfigError as exc:  # what only the resolved secrets show: a key of two tenants
        print_problems(exc, f"{args.config or 'the config'}: invalid configuration:")
        sys.exit(2)
    try:
        serve(app, cfg, args.host, args.port, reuse_port=args.reuse_port)
    except SystemExit:
        if app.gw.start_error:  # the server exits 3 on any failed start-up; say which
            sys.exit(f"router: cannot start: {app.gw.start_error}")
        raise


if __name__ == "__main__":
    main()
