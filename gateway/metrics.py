"""HTTP metrics (Prometheus, one registry per app) and the access log, recorded by one middleware."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram

access_log = logging.getLogger("gateway.access")

UNMATCHED = "unmatched"  # the route label of requests that matched no route (bounded label values)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class HttpMetrics:
    """The gateway's metrics in a registry of their own, so that many apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by method, route and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route.",
            ("method", "route"),
            buckets=BUCKETS,
            registry=self.registry,
        )


def route_label(request: web.Request) -> str:
    """The canonical path of the matched route (``/messages/{id}``), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def metrics_middleware(metrics: HttpMetrics) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500  # if the handler fails past the error middleware (cancelled, ...)
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(request)
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.duration.labels(request.method, route).observe(elapsed)
            duration_ms = round(elapsed * 1000, 2)
            access_log.info(
                "request",
                extra={"method": request.method, "path": request.path, "status": status, "duration_ms": duration_ms},
            )

    return middleware
