"""``GET /stats``: counts by status, the sending switch, the leader and its last tick, queue depths,
throughput of the last minute and claim-to-sent latency. The same snapshot feeds the state gauges of
``/metrics``.

Counting messages by status reads a whole index (~0.15-0.3 s at a million rows), so the costly part
(counts, queue depths, throughput, latency) is cached for :data:`CACHE_SECONDS` and refreshed by one
request at a time, however many dashboards and scrapers ask. The switch, the leader, the last tick and
``sent_total`` are single-row reads, done on every request, so a start/stop shows at once.

Every section (the refresh of the costly part included) is read concurrently under one deadline,
:data:`SNAPSHOT_TIMEOUT_SECONDS`: a dependency that hangs leaves its sections out (None) and the answer
comes within that bound, well under Prometheus's default 10 s scrape timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aio_pika
from aiohttp import web
from marshmallow import Schema, fields

from common import db, topology
from common.cache import read_breaker
from gateway.errors import error_responses
from gateway.httputil import ApiError, json_response
from gateway.keys import AMQP, METRICS, MYSQL, REDIS, SETTINGS, STORE
from gateway.spec import docs

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_SECONDS = 2.0
THROUGHPUT_WINDOW_SECONDS = 60
LATENCY_WINDOW = 1000  # the most recently sent messages
SNAPSHOT_TIMEOUT_SECONDS = 3.0  # all sections together; a section not read by then is left out
UNAVAILABLE = "statistics are unavailable: MySQL does not answer"
QUEUES = {"dispatch": topology.DISPATCH_QUEUE, "dead_letter": topology.DEAD_LETTER_QUEUE}
RABBITMQ_SECTIONS = frozenset(f"{key} queue depth" for key in QUEUES)


async def _section(app: web.Application, what: str, work: Awaitable[T], deadline: float) -> T | None:
    """``work``'s result, or None when its dependency is down or it is not done by ``deadline`` (loop
    time): a snapshot is never all or nothing. A MySQL outage is logged once for all sections and
    requests (:mod:`gateway.mysql`); anything else once per section that meets it."""
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError(f"{what} not read within {SNAPSHOT_TIMEOUT_SECONDS:g}s")
        if db.is_unavailable(exc) and what not in RABBITMQ_SECTIONS:
            app[MYSQL].failed(exc)
        else:
            log.warning("stats: %s unavailable (%s: %s)", what, type(exc).__name__, exc)
        return None


async def _queue_depth(app: web.Application, name: str) -> int | None:
    """Messages ready in ``name``, by a passive declare on a short-lived channel of the gateway's RabbitMQ
    connection (None while it is down or the queue does not exist yet)."""
    conn = app[AMQP].connection
    if conn is None or conn.is_closed or not conn.connected.is_set() or conn.transport is None:
        return None
    channel = await conn.transport.connection.channel()
    try:
        declared = await channel.queue_declare(name, passive=True)
        return int(declared.message_count or 0)
    except aio_pika.exceptions.AMQPError:  # the queue is not declared yet: the broker closes the channel
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 3)


async def _costly(app: web.Application, deadline: float) -> dict[str, Any]:
    store = app[STORE]
    depths = (_section(app, f"{key} queue depth", _queue_depth(app, name), deadline) for key, name in QUEUES.items())
    counts, scheduled, sent, latencies, depths_read = await asyncio.gather(
        _section(app, "counts by status", store.counts_by_status(), deadline),
        _section(app, "scheduled", store.scheduled_count(), deadline),
        _section(app, "throughput", store.sent_since(THROUGHPUT_WINDOW_SECONDS), deadline),
        _section(app, "latency", store.claim_to_sent_seconds(LATENCY_WINDOW), deadline),
        asyncio.gather(*depths),
    )
    ordered = sorted(latencies or [])
    return {
        "counts": counts,
        "scheduled": scheduled,
        "queues": dict(zip(QUEUES, depths_read, strict=True)),
        "throughput": None
        if sent is None
        else {"sent_last_minute": sent, "per_second": round(sent / THROUGHPUT_WINDOW_SECONDS, 3)},
        "latency_ms": {
            "p50": _percentile(ordered, 0.5),
            "p99": _percentile(ordered, 0.99),
            "window": f"last {LATENCY_WINDOW} sent",
        },
    }


async def _off() -> dict[str, str | None]:
    return {"state": "off", "failing_since": None, "until": None}


def _stale(taken_at: float) -> bool:
    return time.monotonic() - taken_at >= CACHE_SECONDS


async def _refresh(app: web.Application, deadline: float) -> dict[str, Any]:
    """The costly part: the cached one when fresh, else refreshed by one request at a time (concurrent
    requests wait for it instead of repeating it; one that cannot wait by ``deadline`` gets no sections)."""
    state = app[METRICS].state
    if state.cached is not None and not _stale(state.taken_at):
        return state.cached
    try:
        async with asyncio.timeout_at(deadline), state.lock:
            if state.cached is None or _stale(state.taken_at):
                state.cached = await _costly(app, deadline)
                state.taken_at = time.monotonic()
            return state.cached
    except TimeoutError:
        return state.cached or dict.fromkeys(("counts", "scheduled", "queues", "throughput", "latency_ms"))


async def snapshot(app: web.Application) -> dict[str, Any]:
    """The ``/stats`` body (the costly part from the cache when fresh); also what ``/metrics`` renders.
    Every section is read concurrently within :data:`SNAPSHOT_TIMEOUT_SECONDS`; one that could not be
    read is None."""
    state = app[METRICS].state
    store = app[STORE]
    deadline = asyncio.get_running_loop().time() + SNAPSHOT_TIMEOUT_SECONDS
    settings = app[SETTINGS]
    costly, dispatch, sent_total, breaker = await asyncio.gather(
        _refresh(app, deadline),
        _section(app, "dispatch state", store.dispatch_state(), deadline),
        _section(app, "sent total", store.sent_total(), deadline),
        _section(app, "breaker", read_breaker(app[REDIS], settings.redis_prefix), deadline)
        if settings.webhook_breaker_failure_ratio > 0
        else _off(),
    )
    body: dict[str, Any] = {"sent_total": sent_total, **costly, "breaker": breaker}
    fields_ = ("sending", "changed_at", "leader", "last_tick_at")
    body.update({k: dispatch[k] for k in fields_} if dispatch else dict.fromkeys(fields_))
    state.latest = body
    return body


class CountsSchema(Schema):
    pending = fields.Integer(required=True)
    queued = fields.Integer(required=True)
    sending = fields.Integer(required=True)
    sent = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    cancelled = fields.Integer(required=True)


class QueuesSchema(Schema):
    dispatch = fields.Integer(required=True, allow_none=True, metadata={"description": "Ids waiting for a consumer."})
    dead_letter = fields.Integer(
        required=True, allow_none=True, metadata={"description": "Failed copies and poison messages."}
    )


class ThroughputSchema(Schema):
    sent_last_minute = fields.Integer(required=True, metadata={"description": "Messages sent in the last 60 s."})
    per_second = fields.Float(required=True, metadata={"description": "The same, per second."})


class LatencySchema(Schema):
    p50 = fields.Float(required=True, allow_none=True, metadata={"description": "Median claim-to-sent time, ms."})
    p99 = fields.Float(required=True, allow_none=True, metadata={"description": "99th percentile, ms."})
    window = fields.String(required=True, metadata={"description": "The sample: the most recently sent messages."})


class BreakerSchema(Schema):
    state = fields.String(
        required=True,
        metadata={"description": "The webhook's circuit breaker: off (not configured), closed, open, half-open."},
    )
    failing_since = fields.DateTime(
        required=True, allow_none=True, metadata={"description": "When it opened (the notification service failing)."}
    )
    until = fields.DateTime(required=True, allow_none=True, metadata={"description": "When the next probe may go."})


class StatsSchema(Schema):
    counts = fields.Nested(CountsSchema, required=True, metadata={"description": "Messages by status."})
    scheduled = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Pending messages whose send_at is still ahead (part of pending)."},
    )
    sent_total = fields.Integer(required=True, metadata={"description": "Messages sent (a maintained counter)."})
    sending = fields.Boolean(required=True, metadata={"description": "Whether automatic sending is on."})
    changed_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "Last start/stop."})
    leader = fields.String(required=True, allow_none=True, metadata={"description": "The producer that ticks."})
    last_tick_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "Its last tick."})
    queues = fields.Nested(
        QueuesSchema, required=True, metadata={"description": "Messages ready in each queue; null if unknown."}
    )
    throughput = fields.Nested(ThroughputSchema, required=True)
    latency_ms = fields.Nested(
        LatencySchema, required=True, metadata={"description": "Claim (queued_at) to sent (sent_at) time."}
    )
    breaker = fields.Nested(
        BreakerSchema, required=True, allow_none=True, metadata={"description": "Null while Redis is unreachable."}
    )


STATS_EXAMPLE = {
    "counts": {"pending": 120, "queued": 2, "sending": 0, "sent": 4210, "failed": 3, "cancelled": 1},
    "scheduled": 20,
    "sent_total": 4210,
    "sending": True,
    "changed_at": "2024-05-01T09:00:00.000000Z",
    "leader": "producer-7f9c@host-1",
    "last_tick_at": "2024-05-01T12:02:00.000000Z",
    "queues": {"dispatch": 0, "dead_letter": 3},
    "throughput": {"sent_last_minute": 1, "per_second": 0.017},
    "latency_ms": {"p50": 41.3, "p99": 118.0, "window": f"last {LATENCY_WINDOW} sent"},
    "breaker": {
        "state": "open",
        "failing_since": "2024-05-01T12:01:30.000000Z",
        "until": "2024-05-01T12:02:30.000000Z",
    },
}


@docs(
    tags=["operations"],
    summary="Counts by status, the sending switch, the leader, queue depths, throughput and latency",
    description=f"Counts, queue depths, throughput and latency are cached for {CACHE_SECONDS:g} s; the switch, "
    "the leader, its last tick and `sent_total` are read on every request. A queue depth is null while "
    "RabbitMQ is unreachable; a 503 means MySQL is.",
    responses={
        "200": {"schema": StatsSchema, "description": "Statistics.", "examples": {"application/json": STATS_EXAMPLE}},
        "503": {
            **error_responses(503)["503"],
            "description": "MySQL does not answer.",
            "examples": {"application/json": {"error": {"code": "unavailable", "message": UNAVAILABLE, "details": {}}}},
        },
    },
)
async def stats(request: web.Request) -> web.Response:
    body = await snapshot(request.app)
    if any(body[k] is None for k in ("counts", "sent_total", "sending", "throughput")):
        raise ApiError(503, "unavailable", UNAVAILABLE)
    return json_response(body)
