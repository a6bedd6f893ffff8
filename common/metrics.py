"""The small HTTP listener of the producer and the consumer: Prometheus ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


async def start_listener(
    port: int, health: Callable[[], dict[str, object]], registry: CollectorRegistry = REGISTRY, host: str = "0.0.0.0"
) -> web.AppRunner | None:
    """Serve ``/metrics`` and ``/healthz`` on ``port`` (0 = no listener). ``health()`` gives the JSON of
    ``/healthz``; a ``"status"`` other than ``"ok"`` answers 503."""
    if not port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def healthz(_: web.Request) -> web.Response:
        state = health()
        return web.json_response(state, status=200 if state.get("status") == "ok" else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics and health on :%d", port)
    return runner
