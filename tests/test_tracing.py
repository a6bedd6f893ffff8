"""Tracing end to end: the real OTLP/HTTP exporter of the three real services, into a receiver run here."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from common.settings import Settings
from common.store import MessageStore
from tests.conftest import sql
from tests.procs import Cluster, StandIn, free_port, wait_for


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    scope: str = ""  # the instrumentation's name (opentelemetry.instrumentation.redis, ...) or ours
    kind: int = 0  # SpanKind of the OTLP protobuf: 2 server, 3 client, 4 producer, 5 consumer


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest into :class:`Span`."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest.FromString(await request.read())
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            attrs.get("service.name", ""),
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            {a.key: a.value.int_value or a.value.string_value for a in s.attributes},
                            ss.scope.name,
                            s.kind,
                        )
                    )
        return web.Response(status=200)

    def named(self, service: str, name: str, message_id: int | None = None) -> list[Span]:
        return [
            s
            for s in self.spans
            if s.service == service
            and s.name == name
            and (message_id is None or s.attributes.get("message.id") == message_id)
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", r.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield r, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


TRACED = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
# The instrumentations' scopes, and the OTLP SpanKind values
SERVER_SCOPE = "opentelemetry.instrumentation.aiohttp_server"
CLIENT_SCOPE = "opentelemetry.instrumentation.aiohttp_client"
AMQP_SCOPE = "opentelemetry.instrumentation.aio_pika"
REDIS_SCOPE = "opentelemetry.instrumentation.redis"
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5


def _consumer_spans(r: Receiver, message_id: int) -> dict[str, Span] | None:
    found = {}
    for name in ("consumer delivery", "compare-and-set", "webhook request", "outcome commit"):
        spans = r.named("consumer", name, message_id)
        if not spans:
            return None
        found[name] = spans[0]
    return found


def _amqp_spans(r: Receiver, message_id: int) -> tuple[Span, Span] | None:
    """The aio-pika instrumentation's send (producer) and receive (consumer) spans of the AMQP message that
    carried ``message_id`` first."""

    def of(service: str, kind: int) -> list[Span]:
        return [s for s in r.spans if s.service == service and s.scope == AMQP_SCOPE and s.kind == kind
                and s.attributes.get("messaging.message.id") == str(message_id)]  # fmt: skip

    send, receive = of("producer", PRODUCER), of("consumer", CONSUMER)
    return (send[0], receive[0]) if send and receive else None


def _redis_spans(r: Receiver, service: str) -> list[Span]:
    return [s for s in r.spans if s.service == service and s.scope == REDIS_SCOPE]


async def _sent(settings: Settings, message_id: int) -> bool:
    rows = await sql(settings, "SELECT status FROM messages WHERE id = %s", (message_id,))
    return bool(rows) and rows[0][0] == "sent"


async def _post(port: int, content: str) -> int:
    """POST /messages to the gateway on ``port`` once it answers; the new message's id."""
    async with aiohttp.ClientSession() as http:

        async def post() -> int | None:
            try:
                async with http.post(
                    f"http://127.0.0.1:{port}/messages", json={"recipient": "+905551111111", "content": content}
                ) as resp:
                    return int((await resp.json())["id"]) if resp.status == 201 else None
            except aiohttp.ClientError:
                return None

        return await wait_for(post, 30, "the gateway to create a message")


async def test_one_trace_from_post_through_publish_webhook_and_commit(
    settings: Settings, cluster: Cluster, standin: StandIn, receiver: tuple[Receiver, str]
) -> None:
    r, endpoint = receiver
    env = {**TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    port = free_port()
    cluster.start("gateway", GATEWAY_PORT=str(port), **env)
    cluster.start("producer", **env)
    cluster.start("consumer", **env)
    message_id = await _post(port, "traced")
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz", "/metrics", "/stats"):
            async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 200, path
    await wait_for(lambda: _sent(settings, message_id), 30, "the message to be sent")
    await wait_for(lambda: asyncio.sleep(0, _consumer_spans(r, message_id)), 20, "the consumer's spans")
    await wait_for(lambda: asyncio.sleep(0, r.named("producer", "producer publish", message_id)), 20, "publish span")
    await wait_for(lambda: asyncio.sleep(0, r.named("gateway", "POST /messages")), 20, "the gateway's span")
    await wait_for(lambda: asyncio.sleep(0, _amqp_spans(r, message_id)), 20, "aio-pika's send and receive spans")
    await wait_for(lambda: asyncio.sleep(0, _redis_spans(r, "consumer")), 20, "the consumer's Redis span")

    await wait_for(lambda: asyncio.sleep(0, r.named("gateway", "GET /stats")), 20, "the span of GET /stats")
    (post_span,) = r.named("gateway", "POST /messages")
    (publish,) = r.named("producer", "producer publish", message_id)
    consumer = _consumer_spans(r, message_id)
    amqp = _amqp_spans(r, message_id)
    # probes and scrapes make no trace (sent before GET /stats, whose span is here)
    assert {s.name for s in r.spans if s.service == "gateway" and s.scope == SERVER_SCOPE} == {
        "POST /messages",
        "GET /stats",
    }
    assert consumer is not None and amqp is not None
    send, receive = amqp
    (cache,) = _redis_spans(r, "consumer")
    webhook = consumer["webhook request"]
    trace_ids = {post_span.trace_id, publish.trace_id, send.trace_id, receive.trace_id, cache.trace_id}
    assert trace_ids | {s.trace_id for s in consumer.values()} == {post_span.trace_id}, "one trace, three services"
    # the gateway's request (aiohttp server instrumentation) -> the producer's publish -> the consumer's delivery
    assert (post_span.scope, post_span.kind) == (SERVER_SCOPE, SERVER)
    assert publish.parent_id == post_span.span_id
    assert consumer["consumer delivery"].parent_id == publish.span_id
    for name in ("compare-and-set", "webhook request", "outcome commit"):
        assert consumer[name].parent_id == consumer["consumer delivery"].span_id, name
    # the AMQP message (aio-pika instrumentation): sent in the publish span, received from its own traceparent
    assert send.parent_id == publish.span_id and receive.parent_id == send.span_id
    # the webhook POST is the aiohttp client instrumentation's span, the webhook URL's path masked as in the logs
    assert (webhook.scope, webhook.kind) == (CLIENT_SCOPE, CLIENT)
    assert webhook.attributes["http.status_code"] == 202
    assert webhook.attributes["http.url"] == f"{standin.url}/webh***"
    # the script call that writes message:<messageId> (redis instrumentation), in the group commit of the outcome
    assert cache.parent_id == consumer["outcome commit"].span_id and cache.kind == CLIENT
    assert cache.attributes["db.statement"].startswith("EVALSHA ? ?"), "the values are not exported"
    (got,) = [x for x in await standin.received() if x["key"] == str(message_id)]
    assert got["traceparent"].startswith(f"00-{post_span.trace_id}-{webhook.span_id}-"), "the webhook request's span"


async def test_a_hand_inserted_row_gets_a_trace_starting_at_the_claim(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn, receiver: tuple[Receiver, str]
) -> None:
    r, endpoint = receiver
    env = {**TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905552222222', 'by hand')")
    (message_id,) = (await sql(settings, "SELECT MAX(id) FROM messages"))[0]
    cluster.start("producer", **env)
    cluster.start("consumer", **env)
    await wait_for(lambda: _sent(settings, int(message_id)), 30, "the message to be sent")
    await wait_for(lambda: asyncio.sleep(0, _consumer_spans(r, int(message_id))), 20, "the consumer's spans")
    await wait_for(lambda: asyncio.sleep(0, r.named("producer", "producer publish", int(message_id))), 20, "publish")
    await wait_for(lambda: asyncio.sleep(0, _amqp_spans(r, int(message_id))), 20, "aio-pika's spans")
    (publish,) = r.named("producer", "producer publish", int(message_id))
    assert publish.parent_id == "", "a new root at the claim"
    consumer = _consumer_spans(r, int(message_id))
    amqp = _amqp_spans(r, int(message_id))
    assert consumer is not None and amqp is not None
    assert {s.trace_id for s in (*consumer.values(), *amqp)} == {publish.trace_id}
    assert consumer["consumer delivery"].parent_id == publish.span_id
    assert amqp[0].parent_id == publish.span_id


async def test_without_the_extra_each_service_warns_once_and_runs_untraced(
    settings: Settings, cluster: Cluster, standin: StandIn, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT set where the tracing extra is not installed (here: an ``opentelemetry``
    package of nothing ahead of the real one on the path, as when none is installed): one warning per service,
    and the message goes out as with tracing off."""
    r, endpoint = receiver
    empty = tmp_path / "without-extra" / "opentelemetry"
    empty.mkdir(parents=True)
    (empty / "__init__.py").write_text('"""Nothing of OpenTelemetry: stands for an install without the extra."""\n')
    env = {**TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "PYTHONPATH": str(empty.parent)}
    port = free_port()
    services = [cluster.start("gateway", GATEWAY_PORT=str(port), **env), cluster.start("producer", **env),
                cluster.start("consumer", **env)]  # fmt: skip
    message_id = await _post(port, "untraced")
    await wait_for(lambda: _sent(settings, message_id), 30, "the message to be sent")
    (got,) = [x for x in await standin.received() if x["key"] == str(message_id)]
    assert got["traceparent"] is None
    for service in services:
        assert service.terminate() == 0, service.tail()  # a traced service would flush its spans on the way out
        warnings = [ln for ln in service.log().splitlines() if "tracing extra is not installed" in ln]
        assert len(warnings) == 1, f"{service.name}: {warnings or service.tail()}"
        assert "WARNING" in warnings[0] and "OTEL_EXPORTER_OTLP_ENDPOINT" in warnings[0]
        assert "tracing on" not in service.log()
    assert r.spans == []


def test_tracing_off_imports_no_opentelemetry() -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT unset, the services import nothing of the tracing: no tracer provider,
    exporter, instrumentation or propagator. (redis-py imports the OpenTelemetry API and metrics SDK by itself
    when they are installed, for its own metrics; that is not ours and costs nothing per call.)"""
    code = (
        "import sys, gateway.app, gateway.__main__, producer.service, consumer.service, common.service;"
        "from common import tracing; from common.settings import Settings;"
        "assert not tracing.setup('gateway'); gateway.app.create_app(Settings.from_env({}, dotenv=None));"
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'opentelemetry.instrumentation',"
        " 'opentelemetry.propagate');"
        "bad = sorted(m for m in sys.modules if m.startswith(ours)); assert not bad, bad"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
