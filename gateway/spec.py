"""aiohttp-apispec, imported and set up once here: the Swagger 2.0 spec and the offline Swagger UI.

aiohttp-apispec 2.2.3 (with apispec 3) is old: importing it and building a spec touch distutils'
deprecated ``LooseVersion``, marshmallow's deprecated ``Field.missing`` and string app keys. Those
warnings are silenced here, around these calls only; the rest of the gateway runs with warnings as errors.
"""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.web_exceptions import NotAppKeyWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import aiohttp_apispec

from gateway.auth import SECURITY_DEFINITIONS, public

__all__ = ["SPEC_URL", "SWAGGER_UI", "docs", "json_schema", "querystring_schema", "setup_swagger"]

SPEC_URL = "/swagger/swagger.json"
SWAGGER_UI = "/swagger/index.html"
STATIC = "/swagger/static"  # the UI's assets, served from the swagger-ui-py package: no internet needed

H = TypeVar("H", bound=Callable[..., Any])


def docs(**kwargs: Any) -> Callable[[H], H]:
    """Document an operation (tags, summary, parameters, responses with examples, security)."""
    return cast(Callable[[H], H], aiohttp_apispec.docs(**kwargs))


def json_schema(schema: Any, **kwargs: Any) -> Callable[[H], H]:
    """Document the JSON body of an operation."""
    return cast(Callable[[H], H], aiohttp_apispec.json_schema(schema, **kwargs))


def querystring_schema(schema: Any, **kwargs: Any) -> Callable[[H], H]:
    """Document the query parameters of an operation."""
    return cast(Callable[[H], H], aiohttp_apispec.querystring_schema(schema, **kwargs))


DESCRIPTION = """Sends the messages waiting in MySQL to a notification webhook, two every two minutes, never twice.
Start and stop automatic sending, list what was sent, queue and inspect messages.

Every error is JSON: `{"error": {"code": "...", "message": "...", "details": {...}}}`; a bad parameter or
field is a 422 whose `details.field` names it. Parameters and body fields the API does not know are ignored.
Times are ISO 8601 in UTC with a trailing `Z`. Request bodies must be `application/json` (415 otherwise).
When the gateway runs with `API_TOKEN` set, every endpoint that returns message data (recipients, contents)
or changes state needs `Authorization: Bearer <API_TOKEN>` (use **Authorize** with `Bearer <token>`);
health, readiness, metrics, statistics and these docs stay open. A browser may not change state from
another site (403 `cross_origin`)."""


# The UI's assets come from swagger-ui-py, which ships a current Swagger UI (5.x; the one inside
# aiohttp-apispec 2.2.3 is 4.1.0, open to CVE-2018-25031). Only the files the page uses are served.
ASSETS = Path(str(importlib.resources.files("swagger_ui"))) / "static"
ASSET_TYPES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
INIT = "/swagger/init.js"
# The spec URL and every option are fixed here: Swagger UI 5 ignores ?url= and ?configUrl= unless
# queryConfigEnabled is true, and it is spelled out false. BaseLayout has no top bar, so the page offers
# no box to load another spec either; connect-src 'self' would refuse one anyway.
INIT_JS = f"""// message-sender: start Swagger UI on the gateway's own spec, and nothing else.
"use strict";
window.addEventListener("DOMContentLoaded", function () {{
  window.ui = SwaggerUIBundle({{
    url: {SPEC_URL!r},
    dom_id: "#swagger-ui",
    queryConfigEnabled: false,
    deepLinking: true,
    validatorUrl: null,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  }});
}});
""".replace("'", '"')
INDEX = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>message-sender gateway: Swagger UI</title>
  <link rel="stylesheet" type="text/css" href="{STATIC}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{STATIC}/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="{STATIC}/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{STATIC}/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="{INIT}" charset="UTF-8"></script>
</body>
</html>
"""
# Scripts and everything fetched from the gateway only; Swagger UI sets inline styles (style-src
# 'unsafe-inline') and shows its icons as data: images.
DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


async def swagger_ui(_: web.Request) -> web.Response:
    return web.Response(text=INDEX, content_type="text/html", headers=DOCS_HEADERS)


async def swagger_init(_: web.Request) -> web.Response:
    return web.Response(text=INIT_JS, content_type="text/javascript", headers=DOCS_HEADERS)


async def swagger_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSET_TYPES:
        raise web.HTTPNotFound()
    return web.FileResponse(ASSETS / name, headers={**DOCS_HEADERS, "Content-Type": ASSET_TYPES[name]})


async def _to_ui(_: web.Request) -> web.Response:
    raise web.HTTPFound(SWAGGER_UI)


def setup_swagger(app: web.Application) -> None:
    """Build the spec from the routes already added (call it last), serve it and the UI beside it."""
    app.router.add_get(SWAGGER_UI, public(swagger_ui), allow_head=False)
    app.router.add_get("/swagger", public(_to_ui), allow_head=False)
    app.router.add_get("/swagger/", public(_to_ui), allow_head=False)
    app.router.add_get(INIT, public(swagger_init), allow_head=False)
    app.router.add_get(STATIC + "/{name}", public(swagger_asset), allow_head=False)
    # aiohttp-apispec consumes the docs it reads from each handler (it pops their schemas and extends
    # their parameters in place), so a second app in the same process would get dangling references:
    # give it copies and put the originals back.
    handlers = {route.handler for route in app.router.routes() if hasattr(route.handler, "__apispec__")}
    originals: dict[Any, dict[str, Any]] = {h: getattr(h, "__apispec__") for h in handlers}  # noqa: B009
    for handler, data in originals.items():
        copied = {**data, "parameters": list(data["parameters"]), "schemas": list(data["schemas"])}
        setattr(handler, "__apispec__", copied)  # noqa: B010
    try:
        _build(app)
    finally:
        for handler, data in originals.items():
            setattr(handler, "__apispec__", data)  # noqa: B010
    for route in app.router.routes():  # the spec document aiohttp-apispec serves is open to all
        if route.resource is not None and route.resource.canonical == SPEC_URL:
            public(route.handler)


def _build(app: web.Application) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", NotAppKeyWarning)
        aiohttp_apispec.setup_aiohttp_apispec(
            app,
            title="message-sender gateway",
            version="1.0.0",
            info={"description": DESCRIPTION},
            url=SPEC_URL,
            in_place=True,
            securityDefinitions=SECURITY_DEFINITIONS,
            consumes=["application/json"],
            produces=["application/json"],
            tags=[
                {"name": "messages", "description": "The sent list, create, detail, retry."},
                {"name": "dispatch", "description": "The start/stop switch of automatic sending."},
                {"name": "operations", "description": "Health, readiness, statistics, metrics."},
            ],
        )
