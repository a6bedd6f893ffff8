"""Observability: the metrics of each service after real deliveries, JSON logs without secrets, ``/stats``
against the database."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import topology
from common.logs import JsonFormatter, TextFormatter, secrets_of
from common.settings import Secret, Settings
from common.store import MessageStore
from deploy.devsupport import amqp_credentials
from gateway.app import create_app
from tests.chaos_helpers import ticks_seen
from tests.conftest import sql
from tests.procs import Cluster, Service, StandIn, free_port, wait_for
from tests.test_gateway import fail, send
from tests.test_pipeline import all_finished, insert

Client = Any  # aiohttp's TestClient
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


# --- helpers ----------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{label="v",...}': value}`` (labels sorted; bare name without labels)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def over_http(url: str) -> Callable[[], Awaitable[str]]:
    async def fetch() -> str:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.text()

    return fetch


def through(client: Client, path: str = "/metrics") -> Callable[[], Awaitable[str]]:
    async def fetch() -> str:
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()
        return str(await resp.text())

    return fetch


async def metrics_reach(fetch: Callable[[], Awaitable[str]], expected: dict[str, float]) -> dict[str, float]:
    """Scrape until every expected sample has its value (counters move just after the commit they count);
    then assert it, so a mismatch shows each expected sample beside what was scraped."""
    last: dict[str, float] = {}

    async def check() -> bool:
        nonlocal last
        try:
            last = parse_metrics(await fetch())
        except (aiohttp.ClientError, OSError):
            return False  # the listener is not up yet
        return all(last.get(k) == v for k, v in expected.items())

    try:
        await wait_for(check, 10, "the expected metrics")
    except AssertionError:
        pass
    assert {k: last.get(k) for k in expected} == expected
    return last


def metrics_url(svc: Service, name: str) -> str:
    return f"http://127.0.0.1:{svc.env[name]}"  # type: ignore[attr-defined]


# --- metrics after a run of deliveries ----------------------------------------------------------------


async def test_each_service_counts_a_run_of_deliveries(
    settings: Settings, store: MessageStore, cluster: Cluster, standin: StandIn, aiohttp_client: Any
) -> None:
    # Three messages, four requests: one 500 (retried, then sent), one 202, one 400 (failed for good), one 202.
    await standin.behave(script=[{"status": 500}, {"status": 202}, {"status": 400}])
    await insert(settings, 3)
    producer = cluster.start("producer")
    consumer = cluster.start("consumer")
    gateway = await aiohttp_client(create_app(settings))
    await wait_for(lambda: all_finished(settings), 30, "every message to finish")

    consumer_url = metrics_url(consumer, "CONSUMER_METRICS_PORT")
    got = await metrics_reach(
        over_http(consumer_url + "/metrics"),
        {
            'consumer_deliveries_total{outcome="sent"}': 2,
            'consumer_deliveries_total{outcome="retry"}': 1,
            'consumer_deliveries_total{outcome="failed"}': 1,
            "consumer_retries_total": 1,
            'consumer_webhook_responses_total{status="202"}': 2,
            'consumer_webhook_responses_total{status="500"}': 1,
            'consumer_webhook_responses_total{status="400"}': 1,
            'consumer_dead_lettered_total{reason="failed"}': 1,
            "consumer_webhook_latency_seconds_count": 4,
            "consumer_duplicates_dropped_total": 0,
            "consumer_inflight_deliveries": 0,
        },
    )
    assert got["consumer_commit_batch_size_sum"] == 4, "every outcome was committed"

    producer_url = metrics_url(producer, "PRODUCER_METRICS_PORT")
    got = await metrics_reach(
        over_http(producer_url + "/metrics"),
        {
            "producer_claimed_total": 4,  # three messages and the retry
            "producer_published_total": 4,
            "producer_released_total": 0,
            "producer_stale_republished_total": 0,
            "producer_is_leader": 1,
            "producer_sending": 1,
        },
    )
    assert got["producer_ticks_total"] >= 2

    got = await metrics_reach(
        through(gateway),
        {
            'messages_by_status{status="pending"}': 0,
            'messages_by_status{status="queued"}': 0,
            'messages_by_status{status="sending"}': 0,
            'messages_by_status{status="sent"}': 2,
            'messages_by_status{status="failed"}': 1,
            "messages_sent_total": 2,
            "dispatch_queue_depth": 0,
            "dead_letter_queue_depth": 1,  # the copy of the failed message
            "dispatch_sending": 1,
        },
    )
    assert got["dispatch_last_tick_timestamp_seconds"] > 0
    assert got['message_claim_to_sent_seconds{quantile="0.5"}'] >= 0

    for url in (producer_url, consumer_url):
        async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"


# --- JSON logs, and no secret anywhere -----------------------------------------------------------------

SECRETS = {
    "MYSQL_PASSWORD": "mysql-pw-7d41c",
    "WEBHOOK_AUTH_KEY": "hook-key-2b9e0",
    "API_TOKEN": "api-token-5f3a8-91c0e",
}
# The path of the webhook URL: a webhook.site URL is a capability (whoever has it reads every message).
CAPABILITY = "0b7e2c1a-5d4f-4e3a-9b8c-7d6e5f4a3b2c"


@pytest.mark.private("mysql")  # it creates a MySQL account: on a private server, not the machine's
async def test_every_log_line_is_json_and_no_secret_is_logged_or_answered(
    settings: Settings, store: MessageStore, cluster: Cluster, standin: StandIn, run_id: str
) -> None:
    # A MySQL account with a password (the private server's root has none), dropped at the end.
    await sql(settings, f"CREATE USER '{run_id}'@'%%' IDENTIFIED BY %s", (SECRETS["MYSQL_PASSWORD"],))
    try:
        await sql(settings, f"GRANT ALL ON `{run_id}`.* TO '{run_id}'@'%%'")
        await _run_with_secrets(settings, cluster, standin, run_id)
    finally:
        await sql(settings, f"DROP USER IF EXISTS '{run_id}'@'%%'")

    amqp_password = quote(amqp_credentials(settings)[1], safe="")  # the AMQP_URL's own
    assert f":{amqp_password}@" in settings.amqp_url.reveal()
    for svc in cluster.services:
        text = svc.log()
        for name, secret in [*SECRETS.items(), ("AMQP_URL", f":{amqp_password}@"), ("WEBHOOK_URL", CAPABILITY[4:])]:
            assert secret not in text, f"{name} appears in the log of {svc.name}"
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{svc.name} line {number} is not JSON: {line!r}")
            assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry), line
            entries.append(entry)
        assert len(entries) > 5, f"{svc.name} logged almost nothing"
        for entry in entries:  # a line about one message carries its id
            about = re.match(r"message (\d+)\b", entry["message"])
            if about:
                assert entry.get("message_id") == int(about[1]), entry

    gateway, _, consumer = cluster.services
    entries = [json.loads(line) for line in gateway.log().splitlines()]
    access = [e for e in entries if e["logger"] == "gateway.access"]
    assert access and all({"method", "path", "status", "duration_ms"} <= set(e) for e in access)
    assert {(e["method"], e["status"]) for e in access} >= {("POST", 201), ("POST", 401), ("POST", 403), ("GET", 500)}
    (crash,) = [e for e in entries if e["logger"] == "gateway.errors"]
    assert crash["level"] == "ERROR" and "message_attempts" in crash["exc"], "the traceback is in the JSON line"
    consumer_entries = [json.loads(line) for line in consumer.log().splitlines()]
    assert {e["message_id"] for e in consumer_entries if "message_id" in e} >= set(range(1, 4))


async def _run_with_secrets(settings: Settings, cluster: Cluster, standin: StandIn, user: str) -> None:
    token = SECRETS["API_TOKEN"]
    await standin.behave(auth_key=SECRETS["WEBHOOK_AUTH_KEY"], script=[{"status": 503}, {"status": 400}])
    overrides = {"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG", "MYSQL_USER": user, **SECRETS,
                 "WEBHOOK_URL": f"{standin.url}/{CAPABILITY}"}  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cluster.start("gateway", GATEWAY_PORT=str(port), **overrides)
    producer = cluster.start("producer", **overrides)
    consumer = cluster.start("consumer", **overrides)
    answers: list[str] = []
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, status: int, **kwargs: Any) -> Any:
            async with http.request(method, base + path, **kwargs) as resp:
                answers.append(f"{resp.headers}\n{await resp.text()}")
                assert resp.status == status, answers[-1]
                return await resp.json() if resp.content_type == "application/json" else None

        async def ready() -> bool:
            try:
                async with http.get(base + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 20, "the gateway to be ready")
        auth = {"Authorization": f"Bearer {token}"}
        ids = [
            (
                await call(
                    "POST", "/messages", 201, json={"recipient": f"+9055500000{i}", "content": "hi"}, headers=auth
                )
            )["id"]
            for i in range(3)
        ]
        assert ids == [1, 2, 3]
        await call("POST", "/messages", 401, json={"recipient": "+905550000009", "content": "x"})
        await call(
            "POST",
            "/messages",
            403,
            json={"recipient": "+905550000009", "content": "x"},
            headers={"Authorization": f"Bearer {token[:-1]}"},
        )
        await call("POST", "/process_message", 415, data=b"{not json", headers=auth)
        await call(
            "POST", "/process_message", 400, data=b"{not json", headers={**auth, "Content-Type": "application/json"}
        )
        await call("GET", "/messages?limit=0", 422, headers=auth)
        await call("GET", "/messages/999999", 404, headers=auth)
        await wait_for(lambda: all_finished(settings), 30, "every message to finish")
        await call("GET", "/stats", 200)
        await call("GET", "/metrics", 200)
        assert producer.terminate() == 0 and consumer.terminate() == 0
        await sql(settings, "DROP TABLE message_attempts")  # the database breaks under the gateway
        error = await call("GET", f"/messages/{ids[0]}", 500, headers=auth)
        assert error["error"]["message"] == "internal server error"
    assert cluster.services[0].terminate() == 0
    for answer in answers:
        for name, secret in [*SECRETS.items(), ("WEBHOOK_URL", CAPABILITY)]:
            assert secret not in answer, f"{name} in an answer of the gateway: {answer}"
    assert len(await standin.received()) >= 3, "the webhook URL was used all the same"


# --- /stats against the database -----------------------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


async def test_stats_match_the_database(settings: Settings, store: MessageStore, aiohttp_client: Any) -> None:
    sent = await send(store, 6)
    # Two were sent five minutes ago; the four recent ones took 40, 10, 30 and 20 ms from claim to send.
    await sql(
        settings, "UPDATE messages SET sent_at = sent_at - INTERVAL 5 MINUTE WHERE id IN (%s, %s)", tuple(sent[:2])
    )
    for mid, ms in zip(sent[2:], (40, 10, 30, 20), strict=True):
        await sql(
            settings,
            "UPDATE messages SET queued_at = sent_at - INTERVAL %s MICROSECOND WHERE id = %s",
            (ms * 1000, mid),
        )
    await fail(store)
    queued = await store.create("+905550000001", "queued")
    assert await store.claim(1) == [queued]
    for i in range(2):
        await store.create(f"+90555000001{i}", "pending")
    await store.set_sending(False)
    await sql(
        settings,
        "UPDATE producer_lease SET holder = 'producer-1', expires_at = UTC_TIMESTAMP(6) + INTERVAL 1 MINUTE,"
        " last_tick_at = UTC_TIMESTAMP(6)",
    )
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
        for i in range(3):
            await topo.dispatch.publish(
                topology.dispatch_message([1000 + i]), routing_key=topology.DISPATCH_ROUTING_KEY
            )
        await topo.dead_letter_copy(b'{"id": 7}', {"x-reason": "failed"})

    client = await aiohttp_client(create_app(settings))

    async def connected() -> Any:
        body = await (await client.get("/stats")).json()
        return body if body["queues"]["dispatch"] is not None else None

    body = await wait_for(connected, 10, "the gateway's RabbitMQ connection")  # it connects in the background

    by_status = dict(await sql(settings, "SELECT status, COUNT(*) FROM messages GROUP BY status"))
    assert body["counts"] == {
        s: by_status.get(s, 0) for s in ("pending", "queued", "sending", "sent", "failed", "cancelled")
    }
    assert body["counts"] == {"pending": 2, "queued": 1, "sending": 0, "sent": 6, "failed": 1, "cancelled": 0}
    assert body["sent_total"] == 6
    ((last_minute,),) = await sql(
        settings,
        "SELECT COUNT(*) FROM messages WHERE status = 'sent' AND sent_at >= UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE",
    )
    assert body["throughput"] == {"sent_last_minute": last_minute, "per_second": round(last_minute / 60, 3)}
    assert last_minute == 4
    rows = await sql(
        settings, "SELECT TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at) FROM messages WHERE status = 'sent'"
    )
    waits = [int(r[0]) / 1000 for r in rows]  # ms
    assert body["latency_ms"] == {
        "p50": pytest.approx(nearest_rank(waits, 0.5)),
        "p99": pytest.approx(nearest_rank(waits, 0.99)),
        "window": "last 1000 sent",
    }
    assert body["latency_ms"]["p99"] == pytest.approx(40)
    assert body["queues"] == {"dispatch": 3, "dead_letter": 1}
    ((leader, tick),) = await sql(settings, "SELECT holder, last_tick_at FROM producer_lease")
    assert (body["sending"], body["leader"]) == (False, leader)
    assert dt.datetime.fromisoformat(body["last_tick_at"].removesuffix("Z")) == tick
    assert ISO_Z.match(body["changed_at"])

    # The switch is read on every request; the counts follow within the cache time.
    await store.set_sending(True)
    assert (await (await client.get("/stats")).json())["sending"] is True
    await store.create("+905550000020", "one more")

    async def counted() -> bool:
        return bool((await (await client.get("/stats")).json())["counts"]["pending"] == 3)

    await wait_for(counted, 5, "the new message in the counts")


async def test_stats_and_metrics_without_rabbitmq(settings: Settings, store: MessageStore, aiohttp_client: Any) -> None:
    await send(store, 2)
    closed = free_port()
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{closed}/")))
    )
    resp = await client.get("/stats")
    assert resp.status == 200
    body = await resp.json()
    assert body["queues"] == {"dispatch": None, "dead_letter": None} and body["counts"]["sent"] == 2
    resp = await client.get("/metrics")
    assert resp.status == 200
    got = parse_metrics(await resp.text())
    assert got['messages_by_status{status="sent"}'] == 2
    assert "dispatch_queue_depth" not in got and "dead_letter_queue_depth" not in got, "unknown, so absent"


async def test_the_swagger_spec_documents_the_stats_fields(client_spec: dict[str, Any]) -> None:
    stats = client_spec["definitions"]["Stats"]["properties"]
    assert {"counts", "sent_total", "sending", "leader", "last_tick_at", "queues", "throughput", "latency_ms"} <= set(
        stats
    )
    op = client_spec["paths"]["/stats"]["get"]
    assert set(op["responses"]) == {"200", "503"}


@pytest.fixture
async def client_spec(settings: Settings, store: MessageStore, aiohttp_client: Any) -> dict[str, Any]:
    client = await aiohttp_client(create_app(settings))
    return dict(await (await client.get("/swagger/swagger.json")).json())


# --- the log formats (no services) ----------------------------------------------------------------------


def _log_with(formatter: logging.Formatter, emit: Callable[[logging.Logger], None]) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test_observability.{id(formatter)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        emit(logger)
    finally:
        logger.handlers.clear()
    return stream.getvalue().splitlines()


def _awkward(log: logging.Logger) -> None:
    log.info("message %d sent", 42, extra={"message_id": 42, "attempt": 1})
    log.warning("odd extras", extra={"ids": {1: "a", 2: b"b"}, "big": 2**70, "obj": object(), "pw": "pw=s3cret-value"})
    log.error("bad format %d", "not a number")  # would print "--- Logging error ---" to stderr
    try:
        raise RuntimeError("connect to amqp://guest:s3cret-value@host failed\nsecond line")
    except RuntimeError:
        log.exception("it broke", extra={"message_id": 7})


def test_json_lines_are_json_whatever_they_carry_and_mask_secrets() -> None:
    lines = _log_with(JsonFormatter(["s3cret-value"]), _awkward)
    assert len(lines) == 4, "one line per record, tracebacks included"
    entries = [json.loads(line) for line in lines]
    assert entries[0]["message_id"] == 42 and entries[0]["message"] == "message 42 sent"
    assert entries[1]["big"] == str(2**70) and entries[1]["pw"] == "pw=***"
    assert "not a number" in entries[2]["message"]
    assert entries[3]["message_id"] == 7 and "RuntimeError" in entries[3]["exc"]
    assert "s3cret-value" not in "\n".join(lines)


def test_text_lines_mask_secrets_too() -> None:
    lines = _log_with(TextFormatter(["s3cret-value"]), _awkward)
    text = "\n".join(lines)
    assert "message 42 sent message_id=42 attempt=1" in text
    assert "s3cret-value" not in text and "amqp://guest:***@host" in text


def test_secrets_of_the_settings() -> None:
    settings = Settings.from_env(
        {
            "MYSQL_PASSWORD": "db-pass",
            "REDIS_URL": "redis://:redis-pass@cache:6379/0",
            "AMQP_URL": "amqp://user:amqp%40pass@broker/",
            "API_TOKEN": "tok-123-4567890abcdef",
            "WEBHOOK_URL": "https://webhook.site/0b7e2c1a-5d4f-4e3a-9b8c-7d6e5f4a3b2c",
            "WEBHOOK_AUTH_KEY": "k",
        },
        dotenv=None,
    )
    found = secrets_of(settings)
    assert {"db-pass", "redis-pass", "amqp%40pass", "amqp@pass", "tok-123-4567890abcdef", "k"} <= set(found)
    assert "user" not in found, "only the passwords of URLs"
    assert not any("://" in s for s in found if "webhook.site" not in s), "only the passwords of URLs"
    assert found["https://webhook.site/0b7e2c1a-5d4f-4e3a-9b8c-7d6e5f4a3b2c"] == "https://webhook.site/0b7e***"
    assert found["/0b7e2c1a-5d4f-4e3a-9b8c-7d6e5f4a3b2c"] == "/0b7e***"


def test_every_secret_is_scrubbed_whatever_its_length() -> None:
    settings = Settings.from_env(
        {"WEBHOOK_AUTH_KEY": "Q", "MYSQL_PASSWORD": "pw", "WEBHOOK_URL": "https://webhook.site/0b7e2c1a-5d4f-4e3a"},
        dotenv=None,
    )

    def emit(log: logging.Logger) -> None:
        log.warning("key Q, password pw; posting to https://webhook.site/0b7e2c1a-5d4f-4e3a failed")
        log.warning("redirect to /0b7e2c1a-5d4f-4e3a?x=1, id 0b7e2c1a-5d4f-4e3a")

    for formatter in (JsonFormatter(secrets_of(settings)), TextFormatter(secrets_of(settings))):
        text = "\n".join(_log_with(formatter, emit))
        assert "Q" not in text and "pw" not in text and "0b7e2c1a" not in text, text
        assert "https://webhook.site/0b7e***" in text, "scheme, host and the first characters of the path stay"


async def test_make_run_says_each_sent_message_and_keeps_idle_ticks_quiet(
    settings: Settings, store: MessageStore, cluster: Cluster, standin: StandIn, env: dict[str, str]
) -> None:
    """What `make run` prints (text logs at INFO): one line per sent message (its id, the recipient masked, how
    long the webhook took, the attempt, the messageId); a producer with nothing to send logs its first tick and
    not one line per interval after it; `make demo` names the running producer's interval and batch, not its
    own environment's."""
    producer = cluster.start("producer", SEND_INTERVAL_SECONDS="0.2", SEND_BATCH_SIZE="7")
    await ticks_seen(store, 3)
    logged = producer.log().count("tick: ")  # its first ticks: standby, then leader (a change is news)
    await ticks_seen(store, 5)
    assert producer.log().count("tick: ") == logged <= 2, producer.log()

    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "common.cli", "demo", "--count", "2",
        env={**os.environ, **env, "SEND_INTERVAL_SECONDS": "120", "SEND_BATCH_SIZE": "2"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(demo.communicate(), 60)
    assert demo.returncode == 0, out
    assert "sends 7 every 0.2s" in out.decode(), out

    ids = [await store.create("+905551234567", "hello")]
    consumer = cluster.start("consumer")
    await wait_for(lambda: all_finished(settings), 30, "every message sent")

    async def sent_lines() -> list[str]:  # the line follows the commit: the row says sent a moment before it
        return [x for x in consumer.log().splitlines() if f"message {ids[0]} sent to " in x]

    (line,) = await wait_for(sent_lines, 10, "the consumer's line about the message")
    assert re.search(rf"message {ids[0]} sent to \+•+4567 in \d+ ms \(attempt 1, messageId [0-9a-f-]{{36}}\)", line)
    assert "+905551234567" not in consumer.log()
    assert producer.log().count("tick: ") >= 2  # the ticks that claimed are news
