"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (dependencies reachable), ``/stats``, ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import error_response, error_responses
from gateway.httputil import json_response
from gateway.keys import AMQP, DB_POOL, METRICS, REDIS, STORE
from gateway.spec import docs

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0


async def _mysql(app: web.Application) -> None:
    async with app[DB_POOL].acquire() as conn:
        await conn.ping()


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
    try:
        await asyncio.wait_for(CHECKS[name](app), CHECK_TIMEOUT_SECONDS)
        return "ok"
    except Exception as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.warning("readiness: %s is down (%s)", name, reason)
        return f"down: {reason}"


async def _dispatch(app: web.Application) -> dict[str, Any]:
    state = await app[STORE].dispatch_state()
    return {k: state[k] for k in ("sending", "changed_at", "leader", "last_tick_at")}


async def _counts(app: web.Application) -> dict[str, Any]:
    store = app[STORE]
    return {"counts": await store.counts_by_status(), "sent_total": await store.sent_total()}


# /stats is the union of these sections: to extend it, append a source and document its fields below.
STATS_SOURCES: list[Callable[[web.Application], Awaitable[dict[str, Any]]]] = [_counts, _dispatch]


class CheckSchema(Schema):
    mysql = fields.String(required=True, metadata={"example": "ok"})
    redis = fields.String(required=True, metadata={"example": "ok"})
    rabbitmq = fields.String(required=True, metadata={"example": "ok"})


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"example": "ready"})
    checks = fields.Nested(CheckSchema, required=True)


class AliveSchema(Schema):
    status = fields.String(required=True, metadata={"example": "ok"})


class CountsSchema(Schema):
    pending = fields.Integer(required=True)
    queued = fields.Integer(required=True)
    sending = fields.Integer(required=True)
    sent = fields.Integer(required=True)
    failed = fields.Integer(required=True)


class StatsSchema(Schema):
    counts = fields.Nested(CountsSchema, required=True, metadata={"description": "Messages by status."})
    sent_total = fields.Integer(required=True, metadata={"description": "Messages sent (a maintained counter)."})
    sending = fields.Boolean(required=True, metadata={"description": "Whether automatic sending is on."})
    changed_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "Last start/stop."})
    leader = fields.String(required=True, allow_none=True, metadata={"description": "The producer that ticks."})
    last_tick_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "Its last tick."})


ALIVE = {"status": "ok"}
STATS_EXAMPLE = {
    "counts": {"pending": 120, "queued": 2, "sending": 0, "sent": 4210, "failed": 3},
    "sent_total": 4210,
    "sending": True,
    "changed_at": "2024-05-01T09:00:00.000000Z",
    "leader": "producer-7f9c@host-1",
    "last_tick_at": "2024-05-01T12:02:00.000000Z",
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
        **error_responses(503),
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
    summary="Counts by status, the sending switch, the leader and its last tick",
    responses={
        "200": {"schema": StatsSchema, "description": "Statistics.", "examples": {"application/json": STATS_EXAMPLE}}
    },
)
async def stats(request: web.Request) -> web.Response:
    body: dict[str, Any] = {}
    for source in STATS_SOURCES:
        body.update(await source(request.app))
    return json_response(body)


@docs(
    tags=["operations"],
    summary="Prometheus metrics",
    produces=["text/plain"],
    responses={"200": {"description": "Prometheus text exposition format."}},
)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/stats", stats, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
