"""The one error middleware: every error leaves as ``{"error": {"code", "message", "details"}}``.

- :class:`~gateway.httputil.ApiError` raised by a handler: its status, code, message and details;
- validation errors of :mod:`common.models` -> 422 naming the field, ``NotFoundError`` -> 404,
  ``ConflictError`` -> 409, ``IdempotencyConflict`` -> 422 naming the ``Idempotency-Key`` header;
- aiohttp's own HTTP errors (unknown route 404, 405 with ``Allow``, 413 body too big...) -> JSON;
- MySQL unavailable (refused, lost, timed out, not connected yet) -> 503 ``unavailable``, the outage
  logged once (:mod:`gateway.mysql`), no traceback per request;
- a request that is not answered within :data:`REQUEST_DEADLINE_SECONDS` -> 503 ``unavailable``;
- a body that cannot be decoded (``Content-Encoding: gzip`` on a plain body...) -> 400 ``bad_request``;
- anything else: logged with its traceback, answered with a generic 500 that reveals nothing.

Malformed requests that aiohttp refuses before any handler runs (bad headers, over-long lines...) are
answered in the same envelope by :mod:`gateway.server`.

Request bodies are limited to :data:`MAX_BODY_BYTES`: a declared ``Content-Length`` over it is refused
before anything is read, and aiohttp stops a longer chunked body at the same limit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler
from marshmallow import Schema, fields

from common import db
from common.errors import ConflictError, IdempotencyConflict, NotFoundError, ValidationError
from gateway.httputil import ApiError, json_response
from gateway.keys import MYSQL

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# Every request is answered within this bound: a MySQL that hangs costs a client seconds, not minutes
# (each MySQL read gives up after 3 s and the wait for a connection after 2 s, see gateway.mysql).
REQUEST_DEADLINE_SECONDS = 5.0
MYSQL_UNAVAILABLE = "MySQL does not answer; try again shortly"
RETRY_AFTER = {"Retry-After": "2"}
MAX_MESSAGE = 200

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "unavailable",
}
# aiohttp's headers worth keeping on an error answer (e.g. ``Allow`` of a 405).
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"example": "validation_error"})
    message = fields.String(required=True, metadata={"example": "limit: must be an integer between 1 and 1000"})
    details = fields.Dict(required=True, metadata={"example": {"field": "limit", "value": "0"}})


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return json_response(body, status=status, headers=headers)


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    headers = {h: exc.headers[h] for h in _KEPT_HEADERS if h in exc.headers}
    details: dict[str, Any] = {}
    if exc.status == 404:
        message = "no such resource; see /swagger/index.html for the API"
    elif exc.status == 405:
        message = f"method not allowed; allowed: {exc.headers.get('Allow', '')}"
    elif exc.status == 413:
        message = f"the request body is larger than {MAX_BODY_BYTES} bytes"
        details = {"max_bytes": MAX_BODY_BYTES}
    else:
        message = exc.reason
    return error_response(exc.status, _CODES.get(exc.status, "http_error"), message, details, headers)


def bad_request_message(exc: BaseException | None, fallback: str = "bad request") -> str:
    """One line saying what aiohttp found wrong with a request (its texts span lines and echo input)."""
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc or "")
    text = " ".join(str(text or fallback).split()).removeprefix("400, message: ")
    lowered = text.lower()
    if isinstance(exc, LineTooLong) or lowered.startswith("got more than"):
        return "the request line or a header is too long (at most 8190 bytes each)"
    if "invalid header value char" in lowered:
        return "a header value contains a control character"
    if "brotli" in lowered or "zstd" in lowered:
        return "this Content-Encoding is not supported: send the body plain, gzip or deflate"
    if isinstance(exc, ContentEncodingError | web.RequestPayloadError) or "content-encoding" in lowered:
        encoding = text.rsplit(" ", 1)[-1]
        return f"the request body is not valid {encoding} as its Content-Encoding says: send it plain or encoded"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error_response(
            413,
            "payload_too_large",
            f"the request body is larger than {MAX_BODY_BYTES} bytes",
            {"max_bytes": MAX_BODY_BYTES},
            {"Connection": "close"},
        )
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_SECONDS):
            return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except ValidationError as exc:
        return error_response(422, "validation_error", str(exc), {"field": exc.field})
    except NotFoundError as exc:
        return error_response(404, "not_found", str(exc))
    except ConflictError as exc:
        return error_response(409, "conflict", str(exc))
    except IdempotencyConflict as exc:
        return error_response(422, "idempotency_conflict", str(exc), {"field": "Idempotency-Key"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects are answers, not errors
        return _from_http_exception(exc)
    except (BadHttpMessage, web.RequestPayloadError) as exc:  # reading the body: gzip that is not gzip...
        # The rest of the body is unreadable too: end it here (aiohttp would try to read it after the
        # answer and log the same error with a traceback) and close the connection after the answer.
        request.content.feed_eof()
        resp = error_response(400, "bad_request", bad_request_message(exc))
        resp.force_close()
        return resp
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        request.app[MYSQL].failed(TimeoutError(f"a request took longer than {REQUEST_DEADLINE_SECONDS:g}s"))
        message = f"no answer within {REQUEST_DEADLINE_SECONDS:g}s: {MYSQL_UNAVAILABLE}"
        return error_response(503, "unavailable", message, {"dependency": "mysql"}, RETRY_AFTER)
    except Exception as exc:
        if db.is_unavailable(exc):
            request.app[MYSQL].failed(exc)
            return error_response(503, "unavailable", MYSQL_UNAVAILABLE, {"dependency": "mysql"}, RETRY_AFTER)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")


_DESCRIPTIONS = {
    400: "The request body is not valid JSON (or is empty where a body is required).",
    401: "API_TOKEN is set and the request has no `Authorization: Bearer` token.",
    403: "API_TOKEN is set and the bearer token is wrong, or a browser sent a state change from another site.",
    404: "No such message.",
    409: "The message is not in a status that allows the operation.",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    415: "The request body is not declared `application/json`.",
    422: "A parameter or body field is invalid; `details.field` names it.",
    503: "MySQL does not answer (down, hanging or not connected yet): try again after `Retry-After` seconds.",
}
_EXAMPLES = {
    400: ("invalid_json", "the request body is not valid JSON: unexpected character: line 1 column 1 (char 0)", {}),
    401: ("unauthorized", "this endpoint requires 'Authorization: Bearer <API_TOKEN>'", {}),
    403: ("forbidden", "the bearer token is not valid", {}),
    404: ("not_found", "message 42 does not exist", {}),
    409: ("conflict", "message 42 is sent, only a failed message can be retried", {}),
    413: (
        "payload_too_large",
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        {"max_bytes": MAX_BODY_BYTES},
    ),
    415: (
        "unsupported_media_type",
        "the request body must be application/json (optionally with charset=utf-8); Content-Type was 'text/plain'",
        {"accepted": ["application/json", "application/json; charset=utf-8"], "content_type": "text/plain"},
    ),
    422: ("validation_error", "limit: must be an integer between 1 and 1000", {"field": "limit", "value": "0"}),
    503: ("unavailable", MYSQL_UNAVAILABLE, {"dependency": "mysql"}),
}


def error_responses(*statuses: int) -> dict[str, dict[str, Any]]:
    """The Swagger ``responses`` entries of the given error statuses, with the error schema and an example."""
    documented: dict[str, dict[str, Any]] = {}
    for status in statuses:
        code, message, details = _EXAMPLES[status]
        documented[str(status)] = {
            "schema": ErrorSchema,
            "description": _DESCRIPTIONS[status],
            "examples": {"application/json": {"error": {"code": code, "message": message, "details": details}}},
        }
    return documented
