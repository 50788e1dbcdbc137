"""``healthd``: run the health daemon (start two or more: one leads, the others stand by)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from router.config import Config, config_from_args, masked_url
from router.errors import StoreError

EXIT_CONFIG = 2
EXIT_FAILED = 1


def require_shared_store(cfg: Config, path: str) -> None:
    """Exit 2 unless the config names a Redis: healthd cannot share an embedded store."""
    if cfg.redis_url:
        return
    sys.stderr.write(
        f"healthd: no shared store: set redis_url in {path} or the REDIS_URL variable.\n"
        "  Without Redis each router keeps its state in its own process (the embedded\n"
        "  store), which a separate health daemon cannot reach.\n"
    )
    sys.exit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``healthd`` command."""
    parser = argparse.ArgumentParser(
        prog="healthd", description="Probe the providers and record their health in Redis."
    )
    parser.add_argument("--config", help="YAML config file (default: $ROUTER_CONFIG)")
    parser.add_argument("--host", default="127.0.0.1", help="address of /healthz and /metrics")
    parser.add_argument("--port", type=int, required=True, help="port of /healthz and /metrics")
    args = parser.parse_args(argv)
    path = args.config or os.environ.get("ROUTER_CONFIG")
    cfg = config_from_args(path, "healthd")  # exits without a path
    require_shared_store(cfg, path or "the config")

    from healthd.daemon import HealthDaemon  # after the config, so a bad file fails fast
    from router.telemetry.logs import setup_logging

    setup_logging(cfg.log, "healthd")
    daemon = HealthDaemon(cfg, host=args.host, port=args.port)
    try:
        asyncio.run(daemon.serve())
    except StoreError as exc:
        where = masked_url(cfg.redis_url or "")
        sys.exit(
            f"healthd: cannot start: {exc}. Redis at {where}: check redis_url (or REDIS_URL), "
            "or set redis.start_degraded: true to stand by until it answers"
        )
    except OSError as exc:
        sys.exit(f"healthd: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}")
    if daemon.failed:
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
