"""Small HTTP helpers shared by the handlers: JSON in and out, query parameters, the API error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

# Naive DATETIME(6) values are UTC: written as ISO 8601 with a trailing ``Z``.
JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
_DIGITS = re.compile(r"[0-9]{1,19}")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_JSON_TYPES[type(None)] = "null"


# On every answer (errors, static files, the docs and the dashboard too); a page that needs more sets its own
# Content-Security-Policy, which is then kept (it carries frame-ancestors 'none' as well).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


async def add_security_headers(_: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers of :data:`SECURITY_HEADERS` a response does not set itself."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


class ApiError(Exception):
    """Raised by a handler to answer ``{"error": {"code", "message", "details"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})


def invalid(field: str, message: str, **details: Any) -> ApiError:
    """A 422 naming the offending field: ``"<field>: <message>"``."""
    return ApiError(422, "validation_error", f"{field}: {message}", {"field": field, **details})


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=JSON_OPTIONS), status=status, headers=headers, content_type="application/json"
    )


def query_int(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within ``lo..hi``; anything else is a 422 (never clamped)."""
    raw = query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not lo <= (value := int(raw)) <= hi:
        raise invalid(name, f"must be an integer between {lo} and {hi}", value=raw[:100])
    return value


_BOOLEANS = {"true": True, "false": False}


def query_bool(query: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean query parameter, ``true`` or ``false``; anything else is a 422."""
    raw = query.get(name)
    if raw is None:
        return default
    if raw not in _BOOLEANS:
        raise invalid(name, "must be true or false", value=raw[:100])
    return _BOOLEANS[raw]


JSON_TYPE = "application/json"
JSON_CHARSETS = {None, "utf-8", "utf8"}


def require_json_body(request: web.Request) -> None:
    """A 415 unless the body is declared ``application/json`` (charset utf-8 or none). Browsers can send
    text/plain, form and multipart bodies to any site without asking (a "simple request"); insisting on
    JSON makes such a cross-site post fail before it does anything."""
    declared = request.headers.get("Content-Type")
    charset = request.charset.lower() if request.charset else None
    if declared is None or request.content_type != JSON_TYPE or charset not in JSON_CHARSETS:
        shown = "none" if declared is None else repr(declared[:100])
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the request body must be {JSON_TYPE} (optionally with charset=utf-8); Content-Type was {shown}",
            {"accepted": [JSON_TYPE, f"{JSON_TYPE}; charset=utf-8"], "content_type": declared and declared[:100]},
        )


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any] | None:
    """The request body as a JSON object. A body that is not declared JSON is a 415 (:func:`require_json_body`),
    unparsable JSON a 400, another JSON value a 422; an empty body is ``None`` when ``optional``, else a 400.
    A body over the size limit is a 413 (raised by aiohttp)."""
    body = await request.read()
    if body or not optional:  # an empty optional body says nothing, whatever its declared type
        require_json_body(request)
    if not body.strip():
        if optional:
            return None
        raise ApiError(400, "invalid_json", "the request body is empty; a JSON object is expected")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("body", f"must be a JSON object, not {_JSON_TYPES.get(type(data), 'another value')}")
    return data
