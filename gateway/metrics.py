"""The gateway's Prometheus metrics (one registry per app): HTTP requests and the access log, recorded by
one middleware, and gauges of the whole system's state (messages by status, queue depths, the sending
switch) rendered at scrape time from the latest ``/stats`` snapshot (see :mod:`gateway.stats`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

access_log = logging.getLogger("gateway.access")

UNMATCHED = "unmatched"  # the route label of requests that matched no route (bounded label values)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class SystemState(Collector):
    """The latest ``/stats`` body as gauges; also the cache of its costly part (``cached``, taken at
    ``taken_at``, refreshed by one request at a time under ``lock``). A section that could not be read
    (MySQL or RabbitMQ down) is left out of the scrape rather than reported as a made-up value."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.cached: dict[str, Any] | None = None
        self.taken_at = 0.0
        self.lock = asyncio.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.latest
        if s.get("counts") is not None:
            by_status = GaugeMetricFamily("messages_by_status", "Messages in the database by status", labels=["status"])
            for status, n in s["counts"].items():
                by_status.add_metric([status], n)
            yield by_status
        if s.get("scheduled") is not None:
            yield GaugeMetricFamily(
                "messages_scheduled", "Pending messages whose send_at is still ahead (part of pending)", s["scheduled"]
            )
        if s.get("sent_total") is not None:
            yield CounterMetricFamily(
                "messages_sent", "Messages sent, by every consumer (the database's count)", s["sent_total"]
            )
        for name, key, what in (
            ("dispatch_queue_depth", "dispatch", "claimed ids waiting for a consumer"),
            ("dead_letter_queue_depth", "dead_letter", "failed copies and poison messages"),
        ):
            depth = (s.get("queues") or {}).get(key)
            if depth is not None:
                yield GaugeMetricFamily(name, f"Messages ready in the {key} queue ({what})", depth)
        if s.get("sending") is not None:
            yield GaugeMetricFamily("dispatch_sending", "1 while automatic sending is switched on", int(s["sending"]))
        if isinstance(s.get("last_tick_at"), dt.datetime):
            at = s["last_tick_at"].replace(tzinfo=dt.UTC).timestamp()
            yield GaugeMetricFamily("dispatch_last_tick_timestamp_seconds", "When the leader producer last ticked", at)
        if s.get("throughput"):
            yield GaugeMetricFamily(
                "messages_sent_last_minute", "Messages sent in the last 60 seconds", s["throughput"]["sent_last_minute"]
            )
        latency = s.get("latency_ms") or {}
        if latency.get("p50") is not None:
            claim_to_sent = GaugeMetricFamily(
                "message_claim_to_sent_seconds",
                "Claim-to-sent time of the last 1000 sent messages, by quantile",
                labels=["quantile"],
            )
            for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
                claim_to_sent.add_metric([quantile], latency[key] / 1000)
            yield claim_to_sent


class HttpMetrics:
    """The gateway's metrics in a registry of their own, so that many apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.state = SystemState()
        self.registry.register(self.state)
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
                "%s %s %d %.1fms",
                request.method,
                request.path,
                status,
                duration_ms,
                extra={"method": request.method, "path": request.path, "status": status, "duration_ms": duration_ms},
            )

    return middleware
