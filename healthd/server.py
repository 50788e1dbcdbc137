"""healthd's own HTTP API: ``GET /healthz`` (liveness and leadership) and ``GET /metrics``."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from healthd.metrics import CONTENT_TYPE, Metrics

SHUTDOWN_TIMEOUT_S = 2.0
"""How long a stopping daemon lets in-flight requests to this API finish."""


class Status(Protocol):
    """What the API reports: the daemon's identity, leadership and metrics."""

    @property
    def id(self) -> str: ...

    @property
    def leading(self) -> bool: ...

    @property
    def epoch(self) -> int: ...

    @property
    def metrics(self) -> Metrics: ...


def make_app(status: Status) -> web.Application:
    """The aiohttp application serving ``status``."""

    async def healthz(request: web.Request) -> web.Response:
        body = {"status": "ok", "id": status.id, "leading": status.leading, "epoch": status.epoch}
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=status.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; ``OSError`` if the port cannot be bound."""
    # access_log=None: the scrapes every few seconds would drown the transitions in noise
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
