"""The status dashboard: ``GET /`` (also ``/dashboard``), one server-rendered page that its own small
script refreshes from documented JSON endpoints, and the two endpoints it added for that:
``GET /stats/timeline`` (sent and failed per minute) and ``GET /stats/failed`` (failed messages).

Everything the page loads comes from the gateway (its Content-Security-Policy allows nothing else), so it
works offline. It reads ``/stats``, ``/stats/timeline``, ``/stats/failed``, ``/messages`` and
``/messages?status=pending`` (the last three with ``mask=true``: the server hides the recipients' digits,
the full numbers never reach the page), and changes state only through ``POST /process_message``,
``POST /messages/{id}/retry`` and ``POST /messages/{id}/cancel``. When the gateway
has an ``API_TOKEN``, the page asks for it once (at the first 401) and sends it with every request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import html
import logging
import string
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields, validate

from common.models import mask_recipient, utcnow
from gateway import health
from gateway.auth import SECURITY, public
from gateway.errors import error_responses
from gateway.httputil import json_response, query_bool, query_int
from gateway.keys import STORE
from gateway.paging import MASK_DESCRIPTION, MAX_OFFSET
from gateway.spec import docs, querystring_schema
from gateway.stats import SNAPSHOT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
MAX_MINUTES = 24 * 60
MAX_FAILED_PAGE = 100
# The snapshot answers within its own bound, leaving out what it could not read (MySQL or RabbitMQ down
# or hanging); this is a safety net above it, so an outage does not log a line per page view.
RENDER_TIMEOUT_SECONDS = SNAPSHOT_TIMEOUT_SECONDS + 1.0
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
UNKNOWN = "—"


# --- the page ----------------------------------------------------------------------------------------


class _Template(string.Template):
    idpattern = r"[a-z_][a-z0-9_.]*"


class _Values(dict[str, str]):
    """Template values; a field /stats does not (yet) have renders as a dash, and the script fills it in."""

    def __missing__(self, key: str) -> str:
        return UNKNOWN


@functools.cache
def _file(name: str) -> tuple[bytes, str]:
    """A file of ``gateway/static`` and a short hash of it (the assets' cache-busting version)."""
    data = (STATIC / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:12]


def _flatten(body: dict[str, Any], prefix: str = "") -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in body.items():
        if isinstance(value, dict):
            values.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            values[prefix + key] = f"{value:,}"
        elif isinstance(value, float):
            values[prefix + key] = f"{value:,.{2 if abs(value) < 10 else 1}f}".rstrip("0").rstrip(".")
        elif isinstance(value, dt.datetime):
            values[prefix + key] = value.strftime("%Y-%m-%d %H:%M:%S UTC")
        else:
            values[prefix + key] = str(value)
    return values


async def _stats(app: web.Application) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for source in health.STATS_SOURCES:  # what GET /stats answers
        body.update(await source(app))
    return body


async def page(request: web.Request) -> web.Response:
    """The dashboard with the current statistics already in it; the script keeps them fresh."""
    try:
        stats = await asyncio.wait_for(_stats(request.app), RENDER_TIMEOUT_SECONDS)
    except Exception as exc:  # the page still loads; its script shows what is unreachable
        log.warning("dashboard rendered without statistics: %s", type(exc).__name__)
        stats = {}
    values = _Values({k: html.escape(v) for k, v in _flatten(stats).items()})
    for key in ("latency_ms.p50", "latency_ms.p99"):
        if key in values:
            values[key] += " ms"
    sending = stats.get("sending")
    values["sending.checked"] = "true" if sending else "false"
    values["sending.label"] = UNKNOWN if sending is None else ("On" if sending else "Off")
    for name in ASSETS:
        values[f"version.{name}"] = _file(name)[1]
    text = _Template(_file("dashboard.html")[0].decode()).substitute(values)
    return web.Response(text=text, content_type="text/html", headers=PAGE_HEADERS)


def _asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        body, version = _file(name)
        headers = {"Cache-Control": "no-cache", "ETag": f'"{version}"'}
        if request.headers.get("If-None-Match") == headers["ETag"]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=ASSETS[name], headers=headers)

    return handler


# --- GET /stats/timeline -----------------------------------------------------------------------------


class TimelineQuerySchema(Schema):
    minutes = fields.Integer(
        load_default=60,
        validate=validate.Range(1, MAX_MINUTES),
        metadata={"description": "How many minutes back, the current one included."},
    )


class MinuteSchema(Schema):
    minute = fields.DateTime(required=True, metadata={"description": "Start of the minute, UTC."})
    sent = fields.Integer(required=True, metadata={"description": "Messages sent in it (by `sent_at`)."})
    failed = fields.Integer(required=True, metadata={"description": "Messages that failed in it and are still failed."})


TIMELINE_EXAMPLE = [
    {"minute": "2024-05-01T12:01:00Z", "sent": 0, "failed": 0},
    {"minute": "2024-05-01T12:02:00Z", "sent": 2, "failed": 1},
]


@docs(
    tags=["operations"],
    summary="Messages sent and failed per minute",
    description="One entry per minute, oldest first, zeros included, ending with the current (partial) "
    "minute. Sent messages count by `sent_at`; failed ones by when they failed (their last update).",
    responses={
        "200": {
            "schema": MinuteSchema(many=True),
            "description": "The per-minute series.",
            "examples": {"application/json": TIMELINE_EXAMPLE},
        },
        **error_responses(422, 503),
    },
)
@querystring_schema(TimelineQuerySchema)
async def timeline(request: web.Request) -> web.Response:
    minutes = query_int(request.query, "minutes", 60, 1, MAX_MINUTES)
    now = utcnow().replace(second=0, microsecond=0)
    start = now - dt.timedelta(minutes=minutes - 1)
    counts = await request.app[STORE].per_minute(start)
    series = []
    for i in range(minutes):
        minute = start + dt.timedelta(minutes=i)
        sent, failed = counts.get(minute, (0, 0))
        series.append({"minute": minute, "sent": sent, "failed": failed})
    return json_response(series)


# --- GET /stats/failed -------------------------------------------------------------------------------


class FailedQuerySchema(Schema):
    limit = fields.Integer(
        load_default=20, validate=validate.Range(1, MAX_FAILED_PAGE), metadata={"description": "Page size."}
    )
    offset = fields.Integer(
        load_default=0,
        validate=validate.Range(0, MAX_OFFSET),
        metadata={"description": "Rows to skip.", "format": "int64"},
    )
    mask = fields.Boolean(load_default=False, metadata={"description": MASK_DESCRIPTION})


class FailedSchema(Schema):
    id = fields.Integer(required=True, metadata={"example": 42})
    recipient = fields.String(required=True, metadata={"example": "+905551111111"})
    content = fields.String(required=True, metadata={"example": "Insider - Project"})
    last_error = fields.String(required=True, allow_none=True, metadata={"description": "Why it failed."})
    attempts = fields.Integer(required=True)
    updated_at = fields.DateTime(required=True, metadata={"description": "When it failed, UTC."})


FAILED_EXAMPLE = {
    "id": 42,
    "recipient": "+905551111111",
    "content": "Insider - Project",
    "last_error": "HTTP 400 from the webhook",
    "attempts": 1,
    "updated_at": "2024-05-01T12:02:00.250000Z",
}


@docs(
    tags=["operations"],
    summary="Failed messages with their reason, newest first",
    description="`POST /messages/{id}/retry` sends one again. How many there are: `counts.failed` of `/stats`.",
    responses={
        "200": {
            "schema": FailedSchema(many=True),
            "description": "A page of failed messages.",
            "examples": {"application/json": [FAILED_EXAMPLE]},
        },
        **error_responses(401, 403, 422, 503),
    },
    security=SECURITY,
)
@querystring_schema(FailedQuerySchema)
async def failed(request: web.Request) -> web.Response:
    limit = query_int(request.query, "limit", 20, 1, MAX_FAILED_PAGE)
    offset = query_int(request.query, "offset", 0, 0, MAX_OFFSET)
    masked = query_bool(request.query, "mask")
    rows = await request.app[STORE].list_failed(limit, offset)
    if masked:
        rows = [{**row, "recipient": mask_recipient(row["recipient"])} for row in rows]
    return json_response(rows)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", public(page), allow_head=False)
    app.router.add_get("/dashboard", public(page), allow_head=False)
    for name in ASSETS:
        app.router.add_get(f"/dashboard/{name}", public(_asset(name)), allow_head=False)
    app.router.add_get("/stats/timeline", public(timeline), allow_head=False)
    app.router.add_get("/stats/failed", failed, allow_head=False)
