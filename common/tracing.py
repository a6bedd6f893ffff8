"""OpenTelemetry tracing, off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the standard variables apply).

With the variable unset nothing of OpenTelemetry is imported and every helper here is a no-op (one check
of a module global). With it set, :func:`setup` installs a ``TracerProvider`` (``service.name`` = the
service), a ``BatchSpanProcessor``, the OTLP/HTTP exporter and the maintained instrumentations (aio-pika and
redis in every service, the aiohttp server in the gateway, the aiohttp client in the consumer);
:func:`shutdown` flushes within a bound. With it set but the ``tracing`` extra not installed, the service
logs one warning and runs untraced.

One trace per message: the gateway's request span (the aiohttp server instrumentation) is stored with the
row as a W3C ``traceparent``; the producer's publish span is its child (a new root for a hand-inserted row)
and travels in the AMQP message's ``traceparents`` header (``id=traceparent,...``: a message may carry
several ids); the consumer's spans (delivery, compare-and-set, webhook request, outcome commit) are its
children. The webhook request's span is the aiohttp client instrumentation's, which sends its
``traceparent``. What one AMQP message or one group commit does for several messages (aio-pika's send and
receive spans, the Redis pipeline of ``message:<messageId>``) is in the trace of the first of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from common.settings import mask_webhook_url

log = logging.getLogger(__name__)

ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
HEADER = "traceparents"  # the AMQP header: "id=traceparent,id=traceparent"
SHUTDOWN_TIMEOUT_MILLIS = 5000
WEBHOOK_SPAN = "webhook request"  # the aiohttp client instrumentation's span of a webhook POST
SERVER_EXCLUDED_VAR = "OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS"
UNTRACED_PATHS = "/healthz,/readyz,/metrics"  # the gateway's requests that make no span by default

_provider: Any = None
_tracer: Any = None


def enabled() -> bool:
    return _tracer is not None


def setup(service: str) -> bool:
    """Install tracing for ``service`` if ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; True if it is on. Without
    the ``tracing`` extra it logs one warning and leaves tracing off (the service runs as without the variable)."""
    global _provider, _tracer
    if not os.environ.get(ENDPOINT_VAR) or _tracer is not None:
        return _tracer is not None
    try:
        _provider = _install(service)
    except ImportError as exc:
        log.warning(
            "%s is set but the tracing extra is not installed (%s): %s runs without tracing; "
            "install it with pip install 'message-sender[tracing]'",
            ENDPOINT_VAR,
            exc,
            service,
        )
        return False
    _tracer = _provider.get_tracer("message-sender")
    return True


def _install(service: str) -> Any:
    """The provider, installed with the instrumentations of ``service``. Every import comes first, so a missing
    package raises ImportError before anything is changed."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    instrumentors: list[tuple[Any, dict[str, Any]]] = [(AioPikaInstrumentor(), {}), (RedisInstrumentor(), {})]
    if service == "gateway":  # a server span per request: every web.Application made from here on gets it
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

        # Health probes and metric scrapes (every few seconds, from orchestrators and Prometheus) would be a
        # trace each: left out unless the instrumentation's own variable says otherwise.
        os.environ.setdefault(SERVER_EXCLUDED_VAR, UNTRACED_PATHS)
        instrumentors.append((AioHttpServerInstrumentor(), {}))
    if service == "consumer":  # the webhook's requests (its session is the only client session)
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

        hooks = {"url_filter": lambda url: mask_webhook_url(str(url)), "request_hook": _name_webhook_span}
        instrumentors.append((AioHttpClientInstrumentor(), hooks))

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    for instrumentor, kwargs in instrumentors:
        instrumentor.instrument(tracer_provider=provider, **kwargs)
    return provider


def _name_webhook_span(span: Any, params: Any) -> None:
    """The client span of a webhook POST is the message's ``webhook request`` (its id from Idempotency-Key)."""
    span.update_name(WEBHOOK_SPAN)
    key = params.headers.get("Idempotency-Key", "")
    if key.isascii() and key.isdigit():
        span.set_attribute("message.id", int(key))


def shutdown() -> None:
    """Export what is left, waiting at most :data:`SHUTDOWN_TIMEOUT_MILLIS`."""
    global _provider, _tracer
    if _provider is None:
        return
    with contextlib.suppress(Exception):
        _provider.force_flush(timeout_millis=SHUTDOWN_TIMEOUT_MILLIS)
        _provider.shutdown()
    _provider = _tracer = None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span; None when tracing is off or no span is recording."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def _context(traceparent: str | None) -> Any:
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent:
        return Context()  # a new root
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


_OFF = contextlib.nullcontext()  # reusable and stateless: the span of every block while tracing is off


def span(
    name: str, parent: str | None = None, root: bool = False, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` around the block: a child of ``parent`` (a traceparent), of a new root when
    ``root`` (and no parent), else of the current span. Off: one shared no-op (the consumer enters three
    per message, so no generator or object is made for them)."""
    if _tracer is None:
        return _OFF
    context = _context(parent) if (parent or root) else None
    manager: contextlib.AbstractContextManager[Any] = _tracer.start_as_current_span(
        name, context=context, attributes=attributes
    )
    return manager


def within(traceparent: str | None) -> contextlib.AbstractContextManager[Any]:
    """The block runs in the context of ``traceparent``: the spans the instrumentations start in it are its
    children. A no-op when off or without one."""
    if _tracer is None or not traceparent:
        return _OFF
    return _attached(traceparent)


@contextlib.contextmanager
def _attached(traceparent: str) -> Iterator[None]:
    from opentelemetry import context

    token = context.attach(_context(traceparent))
    try:
        yield
    finally:
        context.detach(token)


def start_span(name: str, parent: str | None, attributes: Mapping[str, Any] | None = None) -> tuple[Any, str | None]:
    """A started span (the caller ends it) whose parent is ``parent`` (a new root if None), and its traceparent."""
    from opentelemetry import trace

    s = _tracer.start_span(name, context=_context(parent), attributes=attributes)
    carrier: dict[str, str] = {}
    from opentelemetry.propagate import inject as _inject

    _inject(carrier, context=trace.set_span_in_context(s))
    return s, carrier.get("traceparent")


def encode(traceparents: Mapping[int, str]) -> str:
    return ",".join(f"{i}={tp}" for i, tp in traceparents.items())


def decode(header: object) -> dict[int, str]:
    """The ``traceparents`` header of an AMQP message as ``{id: traceparent}`` (malformed parts ignored)."""
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    if not isinstance(header, str):
        return {}
    found: dict[int, str] = {}
    for part in header.split(","):
        key, _, value = part.partition("=")
        if key.isascii() and key.isdigit() and value:
            found[int(key)] = value
    return found
