"""The router's ASGI app served by granian instead of uvicorn (``loadtest.front_ab``, front b).

    ROUTER_CONFIG=FILE granian --interface asgi --factory ... loadtest.granian_front:app

``app`` is the factory granian calls in its worker: the same steps as ``router.cli`` (the
config, the JSON logs, ``create_app``), without ``router.api.server``: no uvicorn and none of
its bounds on the request head, granian's own apply. The gateway starts in the ASGI lifespan
(it connects to Redis there), which granian's ``asgi`` interface runs before it serves.
"""

from __future__ import annotations

from router.api.app import create_app
from router.api.endpoints import HotPath
from router.config import config_from_args
from router.telemetry.logs import setup_logging


def app() -> HotPath:
    """The replica's ASGI app for the config in ``ROUTER_CONFIG``."""
    cfg = config_from_args(None, "granian_front")
    setup_logging(cfg.log)
    return create_app(cfg)
