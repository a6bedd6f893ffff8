"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (dependencies reachable), ``/metrics``; and the
route of ``/stats`` (:mod:`gateway.stats`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import public
from gateway.errors import error_response, error_responses
from gateway.httputil import json_response
from gateway.keys import AMQP, DB_POOL, METRICS, MYSQL, READINESS, REDIS
from gateway.spec import docs
from gateway.stats import snapshot, stats

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0


async def _mysql(app: web.Application) -> None:
    if not app[MYSQL].ready.is_set():
        raise ConnectionError("not connected yet")  # start-up still waits for MySQL or applies migrations
    async with app[DB_POOL].acquire() as conn:
        await conn.ping(reconnect=False)


async def _redis(app: web.Application) -> None:
    await app[REDIS].ping()


async def _rabbitmq(app: web.Application) -> None:
    conn = app[AMQP].connection
    if conn is None or conn.is_closed or not conn.connected.is_set():
        raise ConnectionError("not connected")
    channel = await conn.channel()  # a real round trip to the broker
    await channel.close()


# Each dependency /readyz really reaches; a check passes when it returns within the timeout.
CHECKS: dict[str, Callable[[web.Application], Awaitable[None]]] = {
    "mysql": _mysql,
    "redis": _redis,
    "rabbitmq": _rabbitmq,
}


async def _probe(app: web.Application, name: str) -> str:
    """``ok`` or ``down: <reason>``; a change is logged once (down, then up again), not every probe."""
    try:
        await asyncio.wait_for(CHECKS[name](app), CHECK_TIMEOUT_SECONDS)
        result = "ok"
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            reason = "timed out"
        elif isinstance(exc, ConnectionError) and exc.args:
            reason = str(exc)  # our own words: "not connected yet"
        else:
            reason = type(exc).__name__
        result = f"down: {reason}"
    last = app[READINESS].get(name, "ok")
    app[READINESS][name] = result
    if result != "ok" and last == "ok":
        log.warning("readiness: %s is %s", name, result)
    elif result == "ok" and last != "ok":
        log.info("readiness: %s is ok again", name)
    return result


# What GET /stats answers, as sections to merge (the dashboard renders the same).
STATS_SOURCES: list[Callable[[web.Application], Awaitable[dict[str, Any]]]] = [snapshot]


class CheckSchema(Schema):
    mysql = fields.String(required=True, metadata={"example": "ok"})
    redis = fields.String(required=True, metadata={"example": "ok"})
    rabbitmq = fields.String(required=True, metadata={"example": "ok"})


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"example": "ready"})
    checks = fields.Nested(CheckSchema, required=True)


class AliveSchema(Schema):
    status = fields.String(required=True, metadata={"example": "ok"})


ALIVE = {"status": "ok"}
NOT_READY_EXAMPLE = {
    "code": "not_ready",
    "message": "not ready: mysql unreachable",
    "details": {"checks": {"mysql": "down: not connected yet", "redis": "ok", "rabbitmq": "ok"}},
}


@docs(
    tags=["operations"],
    summary="Liveness: the process answers",
    responses={"200": {"schema": AliveSchema, "description": "Alive.", "examples": {"application/json": ALIVE}}},
)
async def healthz(_: web.Request) -> web.Response:
    return json_response(ALIVE)


@docs(
    tags=["operations"],
    summary="Readiness: MySQL, Redis and RabbitMQ really reachable",
    description=f"Each dependency is pinged (at most {CHECK_TIMEOUT_SECONDS:g}s each, concurrently); a 503 names "
    "the ones that are down.",
    responses={
        "200": {
            "schema": ReadySchema,
            "description": "Every dependency answered.",
            "examples": {"application/json": {"status": "ready", "checks": {n: "ok" for n in CHECKS}}},
        },
        "503": {
            **error_responses(503)["503"],
            "description": "A dependency is unreachable; `details.checks` says which and why.",
            "examples": {"application/json": {"error": NOT_READY_EXAMPLE}},
        },
    },
)
async def readyz(request: web.Request) -> web.Response:
    names = list(CHECKS)
    results = dict(zip(names, await asyncio.gather(*(_probe(request.app, n) for n in names)), strict=True))
    down = [n for n, r in results.items() if r != "ok"]
    if down:
        return error_response(503, "not_ready", f"not ready: {', '.join(down)} unreachable", {"checks": results})
    return json_response({"status": "ready", "checks": results})


@docs(
    tags=["operations"],
    summary="Prometheus metrics",
    produces=["text/plain"],
    description="HTTP requests of this gateway, and gauges of the whole system read at scrape time: "
    "`messages_by_status`, `messages_sent_total`, `dispatch_queue_depth`, `dead_letter_queue_depth`, "
    "`dispatch_sending`, `dispatch_last_tick_timestamp_seconds`... A gauge whose source is unreachable is "
    "left out; the answer is still a 200.",
    responses={"200": {"description": "Prometheus text exposition format."}},
)
async def metrics(request: web.Request) -> web.Response:
    await snapshot(request.app)  # refreshes the state gauges (cached like /stats)
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", public(healthz), allow_head=False)
    app.router.add_get("/readyz", public(readyz), allow_head=False)
    app.router.add_get("/stats", public(stats), allow_head=False)
    app.router.add_get("/metrics", public(metrics), allow_head=False)
