"""The ``/messages`` resource: the sent list (offset and cursor pages) and the filtered lists, create (one or a
batch, scheduled, prioritised, idempotent), detail, retry, cancel."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import orjson
from aiohttp import web
from marshmallow import ValidationError

from common import tracing
from common.errors import NotFoundError
from common.models import RECIPIENT_RE, mask_recipient
from common.store import Idempotency, NewMessage
from gateway.auth import SECURITY
from gateway.errors import error_responses
from gateway.httputil import ApiError, invalid, json_response, query_bool, query_int, read_json
from gateway.keys import INTAKE, PAGES, STORE
from gateway.message_schemas import (
    DETAIL_EXAMPLE,
    EXAMPLE,
    STATUSES,
    AttemptSchema,
    BatchCreatedSchema,
    MessageBatchSchema,
    MessageCreateSchema,
    MessageDetailSchema,
    MessageSchema,
    parse_send_at,
)
from gateway.paging import (
    MASK_DESCRIPTION,
    MAX_LIMIT,
    MAX_OFFSET,
    NEXT_EXAMPLE,
    ListQuerySchema,
    decode_cursor,
    filtered_link,
    next_link,
)
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


MASK_PARAMETER = {
    "in": "query",
    "name": "mask",
    "required": False,
    "type": "string",
    "enum": ["true", "false"],
    "description": MASK_DESCRIPTION + " (what the dashboard asks for).",
}


def _answer(request: web.Request, row: dict[str, Any]) -> web.Response:
    """A message's detail, its recipient masked when the request says ``mask=true``."""
    body = detail(row)
    if query_bool(request.query, "mask"):
        body["recipient"] = mask_recipient(body["recipient"])
    return json_response(body)


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
    summary="List sent messages, newest first (or filter by status and recipient)",
    description="Sent messages ordered by `sent_at` (then id) descending. Page with `limit`/`offset`, or for "
    "deep pages follow the cursor of the `Link: rel=next` header (`after`), which stays stable while new "
    "messages are sent. `X-Total-Count` is the number of sent messages. With `mask=true` recipients come "
    "with every digit but the last four hidden (what the dashboard shows).\n\n"
    "With `status` (one or more statuses separated by commas) and/or `recipient` (without `status`: every "
    "status), the messages that match, newest created first (`created_at`, then id), each row with its "
    "`send_at` and `priority`; `X-Total-Count` is how many match; deep pages by the `Link` cursor only "
    "(no `offset`).",
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
    if "status" in query or "recipient" in query:
        return await _filtered(request, limit)
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


def _statuses(raw: str | None) -> list[str]:
    if raw is None:
        return list(STATUSES)
    wanted = raw.split(",")
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown or not wanted:
        raise invalid("status", f"must be one or more of {', '.join(STATUSES)}, separated by commas", value=raw[:100])
    return sorted(set(wanted), key=STATUSES.index)


async def _filtered(request: web.Request, limit: int) -> web.Response:
    """``status`` and/or ``recipient`` given: the messages that match, newest first (created_at, then id)."""
    query = request.query
    statuses = _statuses(query.get("status"))
    recipient = query.get("recipient")
    if recipient is not None and not RECIPIENT_RE.fullmatch(recipient):
        raise invalid(
            "recipient", "must be an E.164 phone number: '+' followed by 8 to 15 digits", value=recipient[:100]
        )
    if "offset" in query:
        raise invalid("offset", "is not supported with status or recipient; follow the Link header's cursor")
    after = query.get("after")
    cursor = decode_cursor(after) if after is not None else None
    page = await request.app[STORE].filtered_page(statuses, recipient, limit, cursor)
    headers = {"X-Total-Count": str(page.total)}
    if page.count == limit and page.last_key:
        headers["Link"] = filtered_link(limit, page.last_key, query.get("status"), recipient)
    if query_bool(query, "mask"):
        rows = [{**row, "recipient": mask_recipient(row["recipient"])} for row in orjson.loads(page.json)]
        return json_response(rows, headers=headers)
    return web.Response(text=page.json, headers=headers, content_type="application/json")


IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "description": "Any printable ASCII text of up to 255 characters. The same key with the same body within 24 h "
    "answers 200 with the messages the first request created, and creates nothing; with another body it is a 422.",
}


def _idempotency(request: web.Request, body: Any) -> Idempotency | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= 255 or not all(" " <= c <= "~" for c in key):
        raise invalid("Idempotency-Key", "must be 1 to 255 printable ASCII characters", value=key[:100])
    canonical = request.path.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return Idempotency(key, hashlib.sha256(canonical).hexdigest())


def _new_message(payload: dict[str, Any], traceparent: str | None = None) -> NewMessage:
    send_at = parse_send_at(payload["send_at"])
    return NewMessage(payload["recipient"], payload["content"], send_at, payload["priority"], traceparent)


# Reused by every request (a schema holds no state of a load; making one was 4% of a create's time).
_CREATE = MessageCreateSchema()
_BATCH = MessageBatchSchema()


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
        "200": {
            "schema": MessageDetailSchema,
            "description": "The same Idempotency-Key and body again within 24 h: the message the first request made.",
            "examples": {"application/json": {**DETAIL_EXAMPLE, "status": "pending", "attempts": 0, "sent_at": None}},
        },
        **error_responses(400, 401, 403, 413, 415, 422, 503),
    },
    parameters=[IDEMPOTENCY_PARAMETER],
)
@json_schema(MessageCreateSchema, required=True)
async def create_message(request: web.Request) -> web.Response:
    data = await read_json(request)
    try:
        payload = _CREATE.load(data or {})
    except ValidationError as exc:
        errors = exc.messages_dict
        field, messages = next(iter(errors.items()))
        raise invalid(str(field), " ".join(map(str, messages)), errors=errors) from None
    message = _new_message(payload, tracing.current_traceparent())
    idempotency = _idempotency(request, data)
    at: dt.datetime | None
    if idempotency is None:  # shares an INSERT and a commit with the creates arriving meanwhile
        message_id, at = await request.app[INTAKE].create(message)
    else:
        created = await request.app[STORE].create_messages([message], idempotency)
        (message_id,), at = created.ids, created.at
    if at is None:  # replayed: the message as it is now
        row = await request.app[STORE].get(message_id)
        if row is None:  # removed since (retention): the key's request cannot be answered again
            raise NotFoundError(f"message {message_id} of this Idempotency-Key no longer exists")
        return json_response(detail(row), headers={"Location": f"/messages/{message_id}"})
    body = {**_created(message_id, message, at), "attempt_log": []}
    return json_response(body, status=201, headers={"Location": f"/messages/{message_id}"})


def _created(message_id: int, m: NewMessage, at: dt.datetime) -> dict[str, Any]:
    """A message as its create answers it, from the values inserted and the time the database gave them."""
    return {
        "id": message_id,
        "recipient": m.recipient,
        "content": m.content,
        "status": "pending",
        "remote_message_id": None,
        "attempts": 0,
        "created_at": at,
        "sent_at": None,
        "send_at": m.due(at),
        "priority": m.priority,
        "last_error": None,
        "next_attempt_at": None,
        "queued_at": None,
        "updated_at": at,
        "cancelled_at": None,
    }


BATCH_EXAMPLE = {
    "messages": [
        {
            **{k: v for k, v in DETAIL_EXAMPLE.items() if k != "attempt_log"},
            "status": "pending",
            "attempts": 0,
            "sent_at": None,
            "queued_at": None,
            "remote_message_id": None,
        }
    ]
}


def _batch_errors(messages: Any) -> list[dict[str, Any]]:
    """marshmallow's nested errors as one ``{index, field, reason}`` per bad field of an item, by index."""
    out: list[dict[str, Any]] = []
    if not isinstance(messages, dict):
        return [{"index": None, "field": "messages", "reason": " ".join(map(str, messages))}]
    for index in sorted(messages):
        for field, reasons in messages[index].items():
            name = "item" if field == "_schema" else str(field)
            reason = " ".join(map(str, reasons)) if isinstance(reasons, list) else str(reasons)
            if name == "item":
                reason = "must be a JSON object with recipient and content"
            out.append({"index": index, "field": name, "reason": reason})
    return out


@docs(
    tags=["messages"],
    summary="Queue up to 1,000 messages at once (all or nothing)",
    description="Each item is like the body of `POST /messages` (`send_at` and `priority` included). All valid: "
    "201 with the created messages in order. Any item invalid: 422 with one error per bad field of each bad "
    "item (`details.errors`: `index`, `field`, `reason`) and nothing created. Inserted in a single transaction "
    "with multi-row statements.",
    security=SECURITY,
    parameters=[IDEMPOTENCY_PARAMETER],
    responses={
        "201": {
            "schema": BatchCreatedSchema,
            "description": "Created, in the order of the request.",
            "examples": {"application/json": BATCH_EXAMPLE},
        },
        "200": {
            "schema": BatchCreatedSchema,
            "description": "The same Idempotency-Key and body again within 24 h: the first request's messages.",
            "examples": {"application/json": BATCH_EXAMPLE},
        },
        **error_responses(400, 401, 403, 413, 415, 422, 503),
    },
)
@json_schema(MessageBatchSchema, required=True)
async def create_batch(request: web.Request) -> web.Response:
    data = await read_json(request)
    assert data is not None
    try:
        payload = _BATCH.load(data)
    except ValidationError as exc:
        errors = exc.messages_dict.get("messages")
        if errors is None:
            raise invalid("messages", "is required: an array of 1 to 1000 messages") from None
        listing = _batch_errors(errors)
        if len(listing) == 1 and listing[0]["index"] is None:
            raise invalid("messages", listing[0]["reason"]) from None
        bad = sorted({e["index"] for e in listing})
        raise ApiError(
            422,
            "validation_error",
            f"messages: {len(bad)} of {len(data['messages'])} items are invalid (indexes {bad[:20]}); nothing created",
            {"field": "messages", "errors": listing},
        ) from None
    store = request.app[STORE]
    items = [_new_message(m) for m in payload["messages"]]
    created = await store.create_messages(items, _idempotency(request, data), tracing.current_traceparent())
    if created.at is None:  # replayed: the rows as they are now
        rows = await store.created_json(sorted(created.ids))
        return web.Response(text='{"messages":' + rows + "}", content_type="application/json")
    body = [_created(i, m, created.at) for i, m in zip(created.ids, items, strict=True)]
    return json_response({"messages": body}, status=201)


@docs(
    tags=["messages"],
    summary="Cancel a message that was not claimed yet",
    description="Moves a `pending` message (due, scheduled for later or waiting for a retry) to the terminal "
    "status `cancelled`: it is never sent, even when the producer's claim races with the cancel. A message "
    "that is `queued`, `sending`, `sent` or `failed` cannot be cancelled (409). Cancelling a cancelled "
    "message again answers 200.",
    security=SECURITY,
    responses={
        "200": {
            "schema": MessageDetailSchema,
            "description": "The message, now cancelled.",
            "examples": {
                "application/json": {
                    **DETAIL_EXAMPLE,
                    "status": "cancelled",
                    "attempts": 0,
                    "sent_at": None,
                    "remote_message_id": None,
                    "queued_at": None,
                    "attempt_log": [],
                }
            },
        },
        **error_responses(401, 403, 404, 409, 422, 503),
    },
    parameters=[ID_PARAMETER, MASK_PARAMETER],
)
async def cancel_message(request: web.Request) -> web.Response:
    message_id = _message_id(request)
    query_bool(request.query, "mask")  # a bad value is a 422 before anything changes
    return _answer(request, await request.app[STORE].cancel(message_id))


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
    parameters=[ID_PARAMETER, FORCE_PARAMETER, MASK_PARAMETER],
)
async def retry_message(request: web.Request) -> web.Response:
    message_id = _message_id(request)
    raw = request.query.get("force", "false")
    if raw not in ("true", "false"):
        raise invalid("force", "must be true or false", value=raw[:100])
    query_bool(request.query, "mask")  # a bad value is a 422 before anything changes
    return _answer(request, await request.app[STORE].retry_failed(message_id, force=raw == "true"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/messages", list_messages, allow_head=False)
    app.router.add_post("/messages", create_message)
    app.router.add_post("/messages/batch", create_batch)
    app.router.add_get("/messages/{id}", get_message, allow_head=False)
    app.router.add_post("/messages/{id}/retry", retry_message)
    app.router.add_post("/messages/{id}/cancel", cancel_message)
