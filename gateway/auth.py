"""Bearer-token protection of the state-changing endpoints (when ``API_TOKEN`` is set).

Read endpoints stay open. A request without ``Authorization: Bearer <token>`` gets a 401, one with a
different token a 403; the comparison runs in constant time.
"""

from __future__ import annotations

import functools
import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.httputil import ApiError
from gateway.keys import API_TOKEN

SCHEME = "bearer"
# The Swagger 2.0 security definition and the requirement state-changing operations carry.
SECURITY_DEFINITIONS = {
    SCHEME: {
        "type": "apiKey",
        "name": "Authorization",
        "in": "header",
        "description": "When the gateway runs with API_TOKEN set, state-changing endpoints require "
        "`Authorization: Bearer <API_TOKEN>` (401 without it, 403 with a wrong one). Read endpoints stay open.",
    }
}
SECURITY: list[dict[str, list[str]]] = [{SCHEME: []}]
# An operation that changes state only with some parameters (GET /process_message?command=...).
OPTIONAL_SECURITY: list[dict[str, list[str]]] = [{}, {SCHEME: []}]


def require_token(request: web.Request) -> None:
    """Raise a 401/403 :class:`ApiError` unless the request carries the configured token."""
    expected = request.app[API_TOKEN]
    if not expected:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401,
            "unauthorized",
            "this endpoint requires 'Authorization: Bearer <API_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="message-sender"'},
        )
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), expected):
        raise ApiError(403, "forbidden", "the bearer token is not valid")


def protected(handler: Handler) -> Handler:
    """Decorate a handler that always changes state: it runs only with a valid token."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        require_token(request)
        return await handler(request)

    return wrapper
