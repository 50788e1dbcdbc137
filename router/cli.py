"""``router``: start one replica."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import uvicorn

from router.api.server import protocol
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


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other replicas may bind too (``SO_REUSEPORT``)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        sys.exit(f"router: cannot bind {host}:{port}: {exc.strerror}")
    # No listen() here: uvicorn calls it once the app has started, so until then the kernel
    # sends every new connection to the replicas that are already serving.
    return sock


# As they were before --reuse-port existed: the JSON logs come from router.telemetry.logs, not uvicorn.
UVICORN_SETTINGS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "access_log": False,
    # the client's address is used for nothing (keys identify clients): uvicorn's
    # X-Forwarded-For rewriting middleware, on by default, was 3 % of a loaded replica's CPU
    "proxy_headers": False,
    "log_config": None,
    "timeout_graceful_shutdown": 30,
}


def serve(app: Any, cfg: Config, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT/SIGTERM, alone or sharing the port; a
    request's line and headers are bounded in time, size and lines by ``cfg``."""
    settings = {**UVICORN_SETTINGS, "http": protocol(cfg)}
    if not reuse_port:
        uvicorn.run(app, host=host, port=port, **settings)
        return
    sock = reuse_port_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **settings))
    server.run(sockets=[sock])


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
    app = create_app(cfg)
    try:
        serve(app, cfg, args.host, args.port, reuse_port=args.reuse_port)
    except SystemExit:
        if app.gw.start_error:  # the server exits 3 on any failed start-up; say which
            sys.exit(f"router: cannot start: {app.gw.start_error}")
        raise


if __name__ == "__main__":
    main()
