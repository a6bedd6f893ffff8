"""``python -m gateway`` / ``message-sender-gateway``: the public REST API, Swagger UI, health and metrics.

It listens at once, MySQL or not; the schema migrations are applied as soon as MySQL answers
(:mod:`gateway.mysql`), requests that need it answer 503 until then;
SIGTERM/SIGINT stop it gracefully (:func:`gateway.server.serve`); malformed requests that aiohttp
refuses itself are answered as JSON too (:mod:`gateway.server`).
"""

from __future__ import annotations

import asyncio
import logging

from common.service import run_service
from common.settings import Settings
from gateway.app import create_app
from gateway.server import serve
from gateway.spec import SWAGGER_UI

log = logging.getLogger("gateway")


def exposure_warning(settings: Settings) -> str | None:
    """What the gateway says at every start when other machines can reach it and no token protects it."""
    if settings.api_token or settings.gateway_is_local:
        return None
    return (
        f"the gateway listens on {settings.gateway_host or 'every interface'}, reachable from other machines, "
        "and API_TOKEN is not set: anyone who can reach it reads every recipient and message and can start, "
        "stop and send. Set API_TOKEN (16+ characters, e.g. `python3 -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'`), or listen on this machine only with GATEWAY_HOST=127.0.0.1 "
        "(with docker compose: publish it on 127.0.0.1, the default of GATEWAY_BIND)"
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    shown = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::", "") else settings.gateway_host
    log.info(
        "gateway starting on %s:%d; Swagger UI at http://%s:%d%s; API token %s",
        settings.gateway_host,
        settings.gateway_port,
        shown,
        settings.gateway_port,
        SWAGGER_UI,
        "required for message data and state changes" if settings.api_token else "not set",
    )
    if warning := exposure_warning(settings):
        log.warning("%s", warning)
    await serve(create_app(settings), settings, stop)


def main() -> None:
    run_service("gateway", run)  # a bad setting: one line "gateway: ..." and exit code 2


if __name__ == "__main__":
    main()
