"""The gateway application: ``create_app(settings)`` wires routes, middlewares and the Swagger spec
without any I/O; MySQL, Redis and RabbitMQ are opened on start-up and closed on shutdown (``cleanup_ctx``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aio_pika
from aiohttp import web
from yarl import URL

from common.cache import connect
from common.settings import Settings, mask_url
from common.store import MessageStore
from gateway import dashboard, dispatch, health, messages
from gateway.auth import auth_middleware, digest
from gateway.errors import MAX_BODY_BYTES, error_middleware
from gateway.httputil import add_security_headers
from gateway.intake import Intake
from gateway.keys import (
    AMQP,
    API_TOKEN,
    DB_POOL,
    INTAKE,
    METRICS,
    MYSQL,
    PAGES,
    READINESS,
    REDIS,
    SETTINGS,
    STORE,
    AmqpLink,
)
from gateway.metrics import HttpMetrics, metrics_middleware
from gateway.mysql import STARTUP_WAIT_SECONDS, MysqlLink
from gateway.paging import PageCache
from gateway.spec import setup_swagger

REDIS_TIMEOUT_SECONDS = 2.0  # one Redis command (/readyz, the breaker in /stats), connecting included
log = logging.getLogger(__name__)

AMQP_RETRY_SECONDS = 5.0


async def mysql_ctx(app: web.Application) -> AsyncIterator[None]:
    """The MySQL pool, opened in the background (see :mod:`gateway.mysql`): start-up waits a moment for it,
    then listens anyway, /readyz reporting MySQL until it is connected and the schema is up to date."""
    link = MysqlLink(app[SETTINGS])
    app[MYSQL] = link
    app[DB_POOL] = link.pool
    app[STORE] = MessageStore(link.pool)
    app[INTAKE] = Intake(app[STORE])
    link.start()
    if not await link.wait_ready(STARTUP_WAIT_SECONDS):
        log.warning("listening before MySQL answers: requests that need it answer 503 until it does")
    try:
        yield
    finally:
        await app[INTAKE].close()  # the creates in flight finish before their connections close
        await link.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis client: connections are opened lazily, so an unreachable Redis shows in /readyz."""
    url = app[SETTINGS].redis_url.reveal()
    client = connect(url, REDIS_TIMEOUT_SECONDS)
    app[REDIS] = client
    log.info("redis client for %s", mask_url(url))
    try:
        yield
    finally:
        await client.aclose()


async def amqp_ctx(app: web.Application) -> AsyncIterator[None]:
    """A robust RabbitMQ connection for /readyz. Start-up never waits for it: the connection keeps trying
    in the background (each failed attempt logged by aio-pika) and /readyz reports it until it is up."""
    url = app[SETTINGS].amqp_url.reveal()
    conn = aio_pika.RobustConnection(URL(url), fail_fast=False, reconnect_interval=AMQP_RETRY_SECONDS)
    app[AMQP].connection = conn

    async def connected() -> None:
        await conn.connect()
        log.info("connected to %s", mask_url(url))

    waiter = asyncio.create_task(connected(), name="gateway-amqp-connect")
    try:
        yield
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        await conn.close()  # also stops its reconnect loop, connected or not


def create_app(settings: Settings) -> web.Application:
    """The gateway, ready to run; nothing is connected until the app starts."""
    metrics = HttpMetrics()
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[metrics_middleware(metrics), error_middleware, auth_middleware]
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[AMQP] = AmqpLink()
    app[PAGES] = PageCache()
    app[READINESS] = {}
    app[API_TOKEN] = digest(settings.api_token.reveal())
    app.cleanup_ctx.extend([mysql_ctx, redis_ctx, amqp_ctx])
    app.on_response_prepare.append(add_security_headers)

    messages.add_routes(app)
    dispatch.add_routes(app)
    health.add_routes(app)
    dashboard.add_routes(app)
    setup_swagger(app)
    return app
