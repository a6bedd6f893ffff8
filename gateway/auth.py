"""Who may do what: the bearer token (when ``API_TOKEN`` is set) and the refusal of cross-site state changes.

Deny by default: every route needs ``Authorization: Bearer <API_TOKEN>`` unless its handler is marked
:func:`public` (health, readiness, metrics, statistics without message data, the Swagger document and UI,
the dashboard's page and assets). So whatever returns message data (recipients, contents) and whatever
changes state is covered, including routes added later. A request without the token gets a 401, one with
a different token a 403; the comparison runs in constant time (of digests, so not even the length leaks).

Independently of the token, a browser may not change state from another site: an unsafe method (or the
seed's ``GET /process_message?command=...``) whose ``Sec-Fetch-Site`` or ``Origin`` says it comes from
another origin is a 403 (the Fetch Metadata "resource isolation" policy). Without it any web page a user of
a token-less gateway visits could post a form or load an ``<img>`` that stops sending. Clients that are not
browsers (curl, scripts) send neither header and are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.httputil import ApiError
from gateway.keys import API_TOKEN

H = TypeVar("H", bound=Callable[..., Any])

SCHEME = "bearer"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # "none": typed in the address bar, a bookmark
# The Swagger 2.0 security definition, and the requirement every protected operation carries.
SECURITY_DEFINITIONS = {
    SCHEME: {
        "type": "apiKey",
        "name": "Authorization",
        "in": "header",
        "description": "When the gateway runs with API_TOKEN set, every endpoint that returns message data or "
        "changes state requires `Authorization: Bearer <API_TOKEN>` (401 without it, 403 with a wrong one). "
        "Health, readiness, metrics, statistics and these docs stay open.",
    }
}
SECURITY: list[dict[str, list[str]]] = [{SCHEME: []}]
# An operation that changes state only with some parameters (GET /process_message?command=...).
OPTIONAL_SECURITY: list[dict[str, list[str]]] = [{}, {SCHEME: []}]


def digest(token: str) -> bytes:
    """What the gateway keeps of the token and compares: a fixed-length digest."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() if token else b""


def public(handler: H) -> H:
    """Mark a handler as open to anyone, with or without the token."""
    handler.__public__ = True  # type: ignore[attr-defined]
    return handler


def is_public(handler: object) -> bool:
    return bool(getattr(handler, "__public__", False))


def require_token(request: web.Request) -> None:
    """Raise a 401/403 :class:`ApiError` unless the request carries the configured token."""
    expected = request.app[API_TOKEN]
    if not expected:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != SCHEME or not given.strip():
        raise ApiError(
            401,
            "unauthorized",
            "this endpoint requires 'Authorization: Bearer <API_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="message-sender"'},
        )
    if not hmac.compare_digest(digest(given.strip()), expected):
        raise ApiError(403, "forbidden", "the bearer token is not valid")


def refuse_cross_site(request: web.Request) -> None:
    """Raise a 403 :class:`ApiError` when a browser sends this state change from another origin."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site is not None:
        foreign = site.lower() not in SAME_ORIGIN_FETCH
    elif origin is not None:
        parts = urlsplit(origin)
        foreign = origin == "null" or parts.netloc.lower() != request.host.lower()
    else:
        return
    if foreign:
        raise ApiError(
            403,
            "cross_origin",
            "a state change may not come from another site; call the API directly or use the gateway's own pages",
            {"sec_fetch_site": site, "origin": origin},
        )


def require_state_change(request: web.Request) -> None:
    """The checks of a request that changes state: same origin (for browsers), then the token."""
    refuse_cross_site(request)
    require_token(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    match = request.match_info
    if match.http_exception is None:  # unknown routes and methods answer their own 404/405
        if request.method not in SAFE_METHODS:
            refuse_cross_site(request)
        if not is_public(match.handler):
            require_token(request)
    return await handler(request)
