"""The one error middleware: every error leaves as ``{"error": {"code", "message", "details"}}``.

- :class:`~gateway.httputil.ApiError` raised by a handler: its status, code, message and details;
- validation errors of :mod:`common.models` -> 422 naming the field, ``NotFoundError`` -> 404,
  ``ConflictError`` -> 409;
- aiohttp's own HTTP errors (unknown route 404, 405 with ``Allow``, 413 body too big...) -> JSON;
- anything else: logged with its traceback, answered with a generic 500 that reveals nothing.

Request bodies are limited to :data:`MAX_BODY_BYTES`: a declared ``Content-Length`` over it is refused
before anything is read, and aiohttp stops a longer chunked body at the same limit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from marshmallow import Schema, fields

from common.errors import ConflictError, NotFoundError, ValidationError
from gateway.httputil import ApiError, json_response

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024

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
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except ValidationError as exc:
        return error_response(422, "validation_error", str(exc), {"field": exc.field})
    except NotFoundError as exc:
        return error_response(404, "not_found", str(exc))
    except ConflictError as exc:
        return error_response(409, "conflict", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects are answers, not errors
        return _from_http_exception(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
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
    503: "A dependency is unreachable.",
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
    503: (
        "not_ready",
        "not ready: rabbitmq unreachable",
        {"checks": {"mysql": "ok", "redis": "ok", "rabbitmq": "down"}},
    ),
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
