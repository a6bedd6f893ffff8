"""The ``/messages`` resource: the sent list (offset and cursor pages), create, detail, retry."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from marshmallow import ValidationError

from common.models import mask_recipient
from gateway.auth import SECURITY
from gateway.errors import error_responses
from gateway.httputil import ApiError, invalid, json_response, query_bool, query_int, read_json
from gateway.keys import PAGES, STORE
from gateway.message_schemas import (
    DETAIL_EXAMPLE,
    EXAMPLE,
    AttemptSchema,
    MessageCreateSchema,
    MessageDetailSchema,
    MessageSchema,
)
from gateway.paging import MAX_LIMIT, MAX_OFFSET, NEXT_EXAMPLE, ListQuerySchema, decode_cursor, next_link
from gateway.spec import docs, json_schema, querystring_schema

MAX_ID = 2**63 - 1
ID_PARAMETER = {
    "in": "path",
    "name": "id",
    "required": True,
    "type": "integer",
    "format": "int64",
    "minimum": 1,
    "maximum": MAX_ID,
}


FORCE_PARAMETER = {
    "in": "query",
    "name": "force",
    "required": False,
    "type": "string",
    "enum": ["true", "false"],
    "description": "`true` to retry a message whose outcome is unknown (it may arrive twice).",
}


DETAIL_FIELDS = tuple(MessageDetailSchema._declared_fields)
ATTEMPT_FIELDS = tuple(AttemptSchema._declared_fields)


def detail(row: dict[str, Any]) -> dict[str, Any]:
    """A message as ``GET /messages/{id}`` documents it: exactly the fields of its schema."""
    body = {name: row[name] for name in DETAIL_FIELDS if name != "attempt_log"}
    body["attempt_log"] = [{name: a[name] for name in ATTEMPT_FIELDS} for a in row["attempt_log"]]
    return body


def _message_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= MAX_ID:
        raise invalid("id", f"must be an integer between 1 and {MAX_ID}", value=raw[:100])
    return int(raw)


@docs(
    tags=["messages"],
    summary="List sent messages, newest first",
    description="Sent messages ordered by `sent_at` (then id) descending. Page with `limit`/`offset`, or for "
    "deep pages follow the cursor of the `Link: rel=next` header (`after`), which stays stable while new "
    "messages are sent. `X-Total-Count` is the number of sent messages. With `mask=true` recipients come "
    "with every digit but the last four hidden (what the dashboard shows).",
    responses={
        "200": {
            "schema": MessageSchema(many=True),
            "description": "A page of sent messages.",
            "headers": {
                "X-Total-Count": {"type": "integer", "description": "How many messages are sent in total."},
                "Link": {"type": "string", "description": f"When the page is full: `{NEXT_EXAMPLE}`."},
            },
            "examples": {"application/json": [EXAMPLE]},
        },
        **error_responses(401, 403, 422, 503),
    },
    security=SECURITY,
)
@querystring_schema(ListQuerySchema)
async def list_messages(request: web.Request) -> web.Response:
    query = request.query
    store = request.app[STORE]
    limit = query_int(query, "limit", 20, 1, MAX_LIMIT)
    after = query.get("after")
    if after is not None and "offset" in query:
        raise invalid("offset", "cannot be combined with after")
    offset = query_int(query, "offset", 0, 0, MAX_OFFSET) if after is None else 0
    cursor = decode_cursor(after) if after is not None else None
    masked = query_bool(query, "mask")
    key = (limit, offset, after)
    pages = request.app[PAGES]
    page = pages.get(key, await store.sent_version())
    if page is None:
        page = await store.sent_page(limit, offset, cursor)
        pages.put(key, page)
    headers = {"X-Total-Count": str(page.total)}
    if page.count == limit and page.last_key:
        headers["Link"] = next_link(limit, page.last_key)
    if masked:
        rows = [{**row, "recipient": mask_recipient(row["recipient"])} for row in orjson.loads(page.json)]
        return json_response(rows, headers=headers)
    return web.Response(text=page.json, headers=headers, content_type="application/json")


@docs(
    tags=["messages"],
    summary="Queue a new message",
    description="Stores a `pending` message; the producer sends it in a coming batch (oldest first).",
    security=SECURITY,
    responses={
        "201": {
            "schema": MessageDetailSchema,
            "description": "Created; `Location` points at it.",
            "headers": {"Location": {"type": "string", "description": "`/messages/<id>`"}},
            "examples": {
                "application/json": {
                    **DETAIL_EXAMPLE,
                    "status": "pending",
                    "attempts": 0,
                    "sent_at": None,
                    "remote_message_id": None,
                    "queued_at": None,
                    "attempt_log": [],
                }
            },
        },
        **error_responses(400, 401, 403, 413, 415, 422, 503),
    },
)
@json_schema(MessageCreateSchema, required=True)
async def create_message(request: web.Request) -> web.Response:
    data = await read_json(request)
    try:
        payload = MessageCreateSchema().load(data or {})
    except ValidationError as exc:
        errors = exc.messages_dict
        field, messages = next(iter(errors.items()))
        raise invalid(str(field), " ".join(map(str, messages)), errors=errors) from None
    store = request.app[STORE]
    message_id = await store.create(payload["recipient"], payload["content"])
    row = await store.get(message_id)
    if row is None:  # deleted between the two statements: a server-side anomaly (500)
        raise RuntimeError(f"message {message_id} vanished right after it was created")
    return json_response(detail(row), status=201, headers={"Location": f"/messages/{message_id}"})


@docs(
    tags=["messages"],
    summary="One message in any status, with its delivery attempts",
    responses={
        "200": {
            "schema": MessageDetailSchema,
            "description": "The message.",
            "examples": {"application/json": DETAIL_EXAMPLE},
        },
        **error_responses(401, 403, 404, 422, 503),
    },
    security=SECURITY,
    parameters=[ID_PARAMETER],
)
async def get_message(request: web.Request) -> web.Response:
    message_id = _message_id(request)
    row = await request.app[STORE].get(message_id)
    if row is None:
        raise ApiError(404, "not_found", f"message {message_id} does not exist")
    return json_response(detail(row))


@docs(
    tags=["messages"],
    summary="Retry a failed message",
    description="Puts a `failed` message back to `pending` with a fresh attempt budget. A message that failed with "
    "an unknown outcome (`last_error` starts with `outcome unknown`) may already have reached the notification "
    "service: retrying it needs `force=true` (409 without), since it may then arrive twice.",
    security=SECURITY,
    responses={
        "200": {
            "schema": MessageDetailSchema,
            "description": "The message, now pending.",
            "examples": {"application/json": {**DETAIL_EXAMPLE, "status": "pending", "attempts": 0, "sent_at": None}},
        },
        **error_responses(401, 403, 404, 409, 422, 503),
    },
    parameters=[ID_PARAMETER, FORCE_PARAMETER],
)
async def retry_message(request: web.Request) -> web.Response:
    message_id = _message_id(request)
    raw = request.query.get("force", "false")
    if raw not in ("true", "false"):
        raise invalid("force", "must be true or false", value=raw[:100])
    return json_response(detail(await request.app[STORE].retry_failed(message_id, force=raw == "true")))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/messages", list_messages, allow_head=False)
    app.router.add_post("/messages", create_message)
    app.router.add_get("/messages/{id}", get_message, allow_head=False)
    app.router.add_post("/messages/{id}/retry", retry_message)
