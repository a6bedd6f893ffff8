"""aiohttp-apispec, imported and set up once here: the Swagger 2.0 spec and the offline Swagger UI.

aiohttp-apispec 2.2.3 (with apispec 3) is old: importing it and building a spec touch distutils'
deprecated ``LooseVersion``, marshmallow's deprecated ``Field.missing`` and string app keys. Those
warnings are silenced here, around these calls only; the rest of the gateway runs with warnings as errors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.web_exceptions import NotAppKeyWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import aiohttp_apispec

from gateway.auth import SECURITY_DEFINITIONS

__all__ = ["SPEC_URL", "SWAGGER_UI", "docs", "json_schema", "querystring_schema", "setup_swagger"]

SPEC_URL = "/swagger/swagger.json"
SWAGGER_UI = "/swagger/index.html"
STATIC = "/swagger/static"  # the UI's assets, served from the aiohttp-apispec package: no internet needed

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
Times are ISO 8601 in UTC with a trailing `Z`. When the gateway runs with `API_TOKEN` set, state-changing
endpoints need `Authorization: Bearer <API_TOKEN>`; reads stay open."""


ASSETS = Path(aiohttp_apispec.__file__).parent / "static"
INDEX = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>message-sender gateway: Swagger UI</title>
  <link rel="stylesheet" type="text/css" href="{STATIC}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{STATIC}/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{STATIC}/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="{STATIC}/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.onload = function () {{
      window.ui = SwaggerUIBundle({{
        url: "{SPEC_URL}",
        dom_id: "#swagger-ui",
        deepLinking: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        plugins: [SwaggerUIBundle.plugins.DownloadUrl],
        layout: "StandaloneLayout"
      }});
    }};
  </script>
</body>
</html>
"""


async def swagger_ui(_: web.Request) -> web.Response:
    return web.Response(text=INDEX, content_type="text/html")


async def _to_ui(_: web.Request) -> web.Response:
    raise web.HTTPFound(SWAGGER_UI)


def setup_swagger(app: web.Application) -> None:
    """Build the spec from the routes already added (call it last), serve it and the UI beside it."""
    app.router.add_get(SWAGGER_UI, swagger_ui, allow_head=False)
    app.router.add_get("/swagger", _to_ui, allow_head=False)
    app.router.add_get("/swagger/", _to_ui, allow_head=False)
    app.router.add_static(STATIC, ASSETS)
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
