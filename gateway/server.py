"""Serving the gateway: aiohttp's runner, with the requests aiohttp refuses itself answered as JSON.

aiohttp's HTTP parser refuses some requests before any handler or middleware runs (a duplicate
``Content-Type``, an over-long request line or header, a control character in a header, an unsupported
``Content-Encoding`` such as ``br``...) and answers them with a ``text/plain`` 400. The request handler
factory here (a :class:`web.Server` making :class:`JsonErrorHandler` protocols) answers them in the API's
error envelope instead, ``{"error": {"code", "message", "details"}}``, with one log line and no traceback.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from common.settings import Settings
from gateway.errors import bad_request_message, error_response

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_SECONDS = 10.0  # in-flight requests may finish on SIGTERM (each is bounded at 5 s anyway)


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol handler, answering its own errors (parse errors, a failed handler) as JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer is already on its way, cannot send one
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            if exc is not None:
                log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            text = "internal server error" if status == 500 else HTTPStatus(status).phrase.lower()
            code = "internal_error" if status == 500 else "http_error"
        else:
            text = bad_request_message(exc, message or "bad request")
            code = "bad_request" if status == 400 else "http_error"
            log.info("refused a malformed request from %s: %d %s", request.remote, status, text)
        resp = error_response(status, code, text)
        resp.force_close()  # as aiohttp: the rest of what the client sent cannot be trusted
        return resp


class JsonErrorServer(web.Server):
    """The request handler factory of :class:`GatewayRunner`."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`JsonErrorServer`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


async def serve(app: web.Application, settings: Settings, stop: asyncio.Event) -> None:
    """Serve ``app`` on ``GATEWAY_HOST:GATEWAY_PORT`` until ``stop`` is set, then shut down gracefully."""
    runner = GatewayRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.gateway_host, settings.gateway_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
