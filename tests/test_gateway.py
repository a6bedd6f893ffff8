"""The gateway's REST API on the real MySQL, Redis and RabbitMQ, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from common.models import Outcome, utcnow
from common.settings import Secret, Settings
from common.store import MessageStore
from gateway.app import create_app
from gateway.auth import is_public
from tests.chaos_helpers import outage
from tests.conftest import sql
from tests.private_servers import PrivateServer
from tests.procs import free_port

Client = TestClient[Any, Any]
TOKEN = "s3cret-token-0f9e8d7c"
LIST_FIELDS = {"id", "recipient", "content", "status", "remote_message_id", "attempts", "created_at", "sent_at"}
DETAIL_EXTRA = {
    "last_error",
    "next_attempt_at",
    "queued_at",
    "updated_at",
    "send_at",
    "priority",
    "cancelled_at",
    "attempt_log",
}
JSON = "application/json"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


# --- seeding through the store, the way producer and consumer move rows ----------------------------


async def send(store: MessageStore, n: int, per_commit: int | None = None) -> list[int]:
    """Create ``n`` messages and move them pending -> queued -> sending -> sent, ``per_commit`` (default all)
    per group commit; the rows of one commit share a ``sent_at``, later commits get later ones."""
    ids = [await store.create(f"+9055512{i:05d}", f"message {i}") for i in range(n)]
    assert sorted(await store.claim(n)) == ids
    await store.begin_sending([(i, 1) for i in ids])
    step = per_commit or n
    for start in range(0, n, step):
        now = utcnow()
        await store.record_outcomes(
            [
                Outcome(m, "sent", 1, 1, now - dt.timedelta(milliseconds=5), now, 202, remote_message_id=f"r-{m}")
                for m in ids[start : start + step]
            ]
        )
    return ids


async def fail(store: MessageStore) -> int:
    """A message that failed: a retryable HTTP 503 first, then a permanent HTTP 400."""
    mid = await store.create("+905551234567", "will fail")
    for attempt, (kind, status) in enumerate((("retry", 503), ("failed", 400)), start=1):
        assert await store.claim(1) == [mid]
        await store.begin_sending([(mid, attempt)])
        now = utcnow()
        due = now - dt.timedelta(seconds=1) if kind == "retry" else None
        outcome = Outcome(mid, kind, attempt, attempt, now, now, status, error=f"HTTP {status}", next_attempt_at=due)
        await store.record_outcomes([outcome])
    row = await store.get(mid)
    assert row is not None and row["status"] == "failed"
    return mid


@pytest.fixture
async def client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def token_client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app(dataclasses.replace(settings, api_token=Secret(TOKEN))))


async def error_of(resp: Any, status: int, case: object = None) -> dict[str, Any]:
    """Assert ``status`` and the JSON error envelope; return the inner error object."""
    assert resp.status == status, (case, await resp.text())
    assert resp.content_type == "application/json", case
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, (case, body)
    return dict(body["error"])


# --- GET /messages ----------------------------------------------------------------------------------


async def test_list_is_sent_messages_newest_first_with_total(client: Client, store: MessageStore) -> None:
    ids = await send(store, 5, per_commit=1)
    await store.create("+905550000000", "still pending")

    resp = await client.get("/messages")
    assert resp.status == 200
    assert resp.headers["X-Total-Count"] == "5"
    assert "Link" not in resp.headers, "a page that is not full has no next page"
    rows = await resp.json()
    assert [r["id"] for r in rows] == ids[::-1]
    first = rows[0]
    assert set(first) == LIST_FIELDS
    assert (first["status"], first["remote_message_id"], first["attempts"]) == ("sent", f"r-{ids[-1]}", 1)
    assert ISO_Z.match(first["created_at"]) and ISO_Z.match(first["sent_at"]), first
    assert [r["sent_at"] for r in rows] == sorted((r["sent_at"] for r in rows), reverse=True)
    assert abs(dt.datetime.fromisoformat(first["sent_at"].removesuffix("Z")) - utcnow()) < dt.timedelta(minutes=1)

    resp = await client.get("/messages", params={"limit": "2", "offset": "1"})
    assert [r["id"] for r in await resp.json()] == [ids[3], ids[2]]
    assert resp.headers["X-Total-Count"] == "5"


async def test_full_pages_link_to_the_next_by_cursor(client: Client, store: MessageStore) -> None:
    ids = await send(store, 5, per_commit=1)
    resp = await client.get("/messages?limit=2")
    link = resp.headers["Link"]
    match = re.fullmatch(r'</messages\?limit=2&after=([A-Za-z0-9_-]+)>; rel="next"', link)
    assert match, link
    seen = [r["id"] for r in await resp.json()]
    while "Link" in resp.headers:
        resp = await client.get(resp.headers["Link"].split(">")[0][1:])
        assert resp.status == 200 and resp.headers["X-Total-Count"] == "5"
        seen += [r["id"] for r in await resp.json()]
    assert seen == ids[::-1]


async def test_empty_list(client: Client) -> None:
    resp = await client.get("/messages")
    assert (resp.status, await resp.json(), resp.headers["X-Total-Count"]) == (200, [], "0")


BAD_LIST_QUERIES = [
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=-1", "limit"),
    ("limit=abc", "limit"),
    ("limit=1.5", "limit"),
    ("limit=", "limit"),
    ("limit=%2B5", "limit"),
    ("limit=%205", "limit"),
    ("limit=99999999999999999999999", "limit"),
    ("offset=-1", "offset"),
    ("offset=x", "offset"),
    ("offset=1e3", "offset"),
    ("offset=99999999999999999999", "offset"),
    ("after=not*a*cursor", "after"),
    ("after=", "after"),
    ("after=bm90LWEtY3Vyc29y", "after"),  # valid base64 of "not-a-cursor"
    ("after=OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OjE", "after"),  # a time out of range
    ("after=MTcxNDU2NDkyMDI1MDAwMDo0Mg&offset=3", "offset"),  # both forms at once
]


async def test_bad_list_parameters_are_422_naming_the_parameter(client: Client) -> None:
    for query, field in BAD_LIST_QUERIES:
        error = await error_of(await client.get(f"/messages?{query}"), 422, query)
        assert error["code"] == "validation_error", query
        assert error["details"]["field"] == field, query
        assert error["message"].startswith(f"{field}:"), error


async def test_limit_bounds_are_inclusive(client: Client, store: MessageStore) -> None:
    await send(store, 3)
    assert len(await (await client.get("/messages?limit=1")).json()) == 1
    assert len(await (await client.get("/messages?limit=1000")).json()) == 3
    assert await (await client.get("/messages?offset=3")).json() == []


# --- POST /messages, GET /messages/{id}, retry -----------------------------------------------------


async def test_create_then_read_back(client: Client, store: MessageStore) -> None:
    resp = await client.post("/messages", json={"recipient": "+905551111111", "content": "Insider - Project"})
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert resp.headers["Location"] == f"/messages/{created['id']}"
    assert (created["status"], created["attempts"], created["sent_at"], created["attempt_log"]) == (
        "pending",
        0,
        None,
        [],
    )
    stored = await store.get(created["id"])
    assert stored is not None and (stored["recipient"], stored["content"]) == ("+905551111111", "Insider - Project")

    resp = await client.get(resp.headers["Location"])
    assert resp.status == 200
    assert await resp.json() == created
    assert set(created) == LIST_FIELDS | DETAIL_EXTRA, "exactly the documented fields"
    assert await store.claim(10) == [created["id"]], "the producer picks it up"


INVALID_MESSAGES = [
    ({"recipient": "905551111111", "content": "x"}, "recipient"),  # no +
    ({"recipient": "+90555", "content": "x"}, "recipient"),  # too short
    ({"recipient": "+9055511111111111", "content": "x"}, "recipient"),  # 16 digits
    ({"recipient": "+90555abc1111", "content": "x"}, "recipient"),
    ({"recipient": "+905551111111\n", "content": "x"}, "recipient"),  # `$` would match before the newline
    ({"recipient": "+905551111111\r\n", "content": "x"}, "recipient"),
    ({"recipient": " +905551111111", "content": "x"}, "recipient"),
    (
        {"recipient": "+90555\u0661\u0661\u0661\u0661\u0661\u0661\u0661", "content": "x"},
        "recipient",
    ),  # Arabic-Indic digits
    (
        {"recipient": "+90555\uff11\uff11\uff11\uff11\uff11\uff11\uff11", "content": "x"},
        "recipient",
    ),  # fullwidth digits
    ({"recipient": 905551111111, "content": "x"}, "recipient"),
    ({"content": "x"}, "recipient"),
    ({"recipient": "+905551111111", "content": ""}, "content"),
    ({"recipient": "+905551111111", "content": "   "}, "content"),
    ({"recipient": "+905551111111", "content": "x" * 161}, "content"),
    ({"recipient": "+905551111111", "content": None}, "content"),
    ({"recipient": "+905551111111"}, "content"),
    (["+905551111111", "x"], "body"),
    ("just a string", "body"),
]


async def test_invalid_messages_are_422_naming_the_field(client: Client, settings: Settings) -> None:
    for body, field in INVALID_MESSAGES:
        error = await error_of(await client.post("/messages", json=body), 422, body)
        assert error["details"]["field"] == field, error
        assert error["message"].startswith(f"{field}:"), error
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(0,)], "nothing was stored"


async def test_content_of_exactly_160_characters_is_accepted(client: Client) -> None:
    content = "ğ" * 159 + "😀"  # characters, not bytes
    resp = await client.post("/messages", json={"recipient": "+905551111111", "content": content})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["content"] == content


async def test_bad_json_is_400(client: Client) -> None:
    for raw in (b"{bad json", b"", b"   ", b'{"recipient": "+905551111111",', b"\xff\xfe", b"'single'"):
        resp = await client.post("/messages", data=raw, headers={"Content-Type": "application/json"})
        assert (await error_of(resp, 400, raw))["code"] == "invalid_json"


async def test_body_over_64_kib_is_413(client: Client, settings: Settings) -> None:
    big = {"recipient": "+905551111111", "content": "x" * 70_000}
    assert (await error_of(await client.post("/messages", json=big), 413))["details"] == {"max_bytes": 65536}

    async def chunks() -> Any:  # no Content-Length: stopped while reading
        for _ in range(20):
            yield b"x" * 8192

    assert (await error_of(await client.post("/messages", data=chunks()), 413))["code"] == "payload_too_large"
    assert (await error_of(await client.post("/process_message", data=b"{" * 70_000), 413))["code"]
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(0,)]


async def test_message_detail_has_its_attempts(client: Client, store: MessageStore) -> None:
    mid = await fail(store)
    resp = await client.get(f"/messages/{mid}")
    assert resp.status == 200
    body = await resp.json()
    assert (body["status"], body["attempts"], body["last_error"]) == ("failed", 2, "HTTP 400")
    assert [(a["attempt"], a["outcome"], a["http_status"], a["error"]) for a in body["attempt_log"]] == [
        (1, "retry", 503, "HTTP 503"),
        (2, "failed", 400, "HTTP 400"),
    ]
    assert all(ISO_Z.match(a["started_at"]) for a in body["attempt_log"])
    assert set(body["attempt_log"][0]) == {
        "attempt",
        "started_at",
        "finished_at",
        "outcome",
        "http_status",
        "error",
        "duration_ms",
        "provider",
    }
    assert {a["provider"] for a in body["attempt_log"]} == {"primary"}


async def test_missing_or_malformed_message_id(client: Client) -> None:
    for path, status in (
        ("/messages/999999", 404),
        ("/messages/abc", 422),
        ("/messages/0", 422),
        ("/messages/-1", 422),
    ):
        await error_of(await client.get(path), status, path)
        await error_of(await client.post(f"{path}/retry"), status, path)


async def test_retry_puts_a_failed_message_back_to_pending(client: Client, store: MessageStore) -> None:
    mid = await fail(store)
    resp = await client.post(f"/messages/{mid}/retry")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["id"], body["status"], body["attempts"]) == (mid, "pending", 0)
    assert await store.claim(5) == [mid], "it is sent again"

    error = await error_of(await client.post(f"/messages/{mid}/retry"), 409)
    assert error["code"] == "conflict" and "queued" in error["message"]
    (sent,) = await send(store, 1)
    await error_of(await client.post(f"/messages/{sent}/retry"), 409)


# --- /process_message -------------------------------------------------------------------------------


async def test_process_message_switches_and_reports(client: Client, store: MessageStore) -> None:
    assert await (await client.get("/process_message")).json() == {"sending": "started"}

    resp = await client.get("/process_message?command=stop")
    assert (resp.status, await resp.json()) == (200, {"sending": "stopped"})
    assert await store.is_sending() is False
    assert await (await client.get("/process_message")).json() == {"sending": "stopped"}
    assert await (await client.post("/process_message")).json() == {"sending": "stopped"}

    resp = await client.post("/process_message", json={"command": "start"})
    assert (resp.status, await resp.json()) == (200, {"sending": "started"})
    assert await store.is_sending() is True
    assert await (await client.post("/process_message?command=stop")).json() == {"sending": "stopped"}
    assert await (await client.post("/process_message?command=stop", json={"command": "stop"})).json() == {
        "sending": "stopped"
    }
    assert await store.is_sending() is False


UNKNOWN_COMMANDS: list[tuple[str, str, Any]] = [
    ("GET", "/process_message?command=pause", None),
    ("GET", "/process_message?command=", None),
    ("GET", "/process_message?command=START", None),
    ("POST", "/process_message?command=restart", None),
    ("POST", "/process_message", {"command": "go"}),
    ("POST", "/process_message", {"command": ["start"]}),
    ("POST", "/process_message", {"command": None}),
    ("POST", "/process_message?command=start", {"command": "stop"}),  # they disagree
]


async def test_unknown_command_is_422(client: Client, store: MessageStore) -> None:
    await store.set_sending(False)
    for method, url, body in UNKNOWN_COMMANDS:
        error = await error_of(await client.request(method, url, json=body), 422, (method, url, body))
        assert error["details"]["field"] == "command", error
    assert await store.is_sending() is False, "nothing changed"


async def test_process_message_bad_json_is_400(client: Client) -> None:
    await error_of(await client.post("/process_message", data=b"{nope", headers={"Content-Type": JSON}), 400)
    await error_of(await client.post("/process_message", json=[1]), 422)


# --- /stats, /healthz, /readyz, /metrics ------------------------------------------------------------


async def test_stats(client: Client, store: MessageStore, settings: Settings) -> None:
    await send(store, 3)
    await fail(store)
    await store.create("+905550000001", "pending")
    await store.set_sending(False)
    await sql(
        settings,
        "UPDATE producer_lease SET holder = 'producer-1', expires_at = UTC_TIMESTAMP(6) + INTERVAL 1 MINUTE,"
        " last_tick_at = UTC_TIMESTAMP(6)",
    )

    body = await (await client.get("/stats")).json()
    assert body["counts"] == {"pending": 1, "queued": 0, "sending": 0, "sent": 3, "failed": 1, "cancelled": 0}
    assert (body["sent_total"], body["sending"], body["leader"]) == (3, False, "producer-1")
    assert ISO_Z.match(body["last_tick_at"]) and ISO_Z.match(body["changed_at"])


async def test_healthz_and_readyz(client: Client) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    body: Any = None
    for _ in range(100):  # RabbitMQ is connected in the background after start-up
        resp = await client.get("/readyz")
        body = await resp.json()
        if resp.status == 200:
            break
        await asyncio.sleep(0.1)
    assert body == {"status": "ready", "checks": {"mysql": "ok", "redis": "ok", "rabbitmq": "ok"}}


async def test_readyz_names_unreachable_dependencies(
    aiohttp_client: Any, settings: Settings, store: MessageStore
) -> None:
    closed = free_port()
    broken = dataclasses.replace(
        settings,
        redis_url=Secret(f"redis://127.0.0.1:{closed}/0"),
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{closed}/"),
    )
    client = await aiohttp_client(create_app(broken))  # start-up does not wait for them
    assert (await client.get("/healthz")).status == 200
    error = await error_of(await client.get("/readyz"), 503)
    assert error["code"] == "not_ready"
    assert "redis" in error["message"] and "rabbitmq" in error["message"] and "mysql" not in error["message"]
    checks = error["details"]["checks"]
    assert checks["mysql"] == "ok" and checks["redis"].startswith("down") and checks["rabbitmq"].startswith("down")
    assert (await client.get("/messages")).status == 200, "MySQL-backed reads still work"


@pytest.mark.private("redis")
async def test_readyz_does_not_report_a_restarted_redis_as_down(
    aiohttp_client: Any, settings: Settings, store: MessageStore, private_redis: PrivateServer
) -> None:
    """A Redis restart closes the gateway's pooled connection; the next /readyz (and /stats' breaker) sends
    its command again on a fresh connection instead of reporting Redis down until a second request."""
    client = await aiohttp_client(create_app(settings))

    async def redis_check() -> str:
        resp = await client.get("/readyz")
        body = await resp.json()
        return str((body.get("checks") or body["error"]["details"]["checks"])["redis"])

    assert await redis_check() == "ok"  # a connection in the pool
    async with outage(private_redis) as server:
        await server.start()  # the pooled connection is now closed by the server
    assert await redis_check() == "ok", "the first check after a restart counted the closed connection as down"


async def test_metrics_count_requests_by_route_template(client: Client, store: MessageStore) -> None:
    (mid,) = await send(store, 1)
    await client.get(f"/messages/{mid}")
    await client.get("/messages/999999")
    await client.get("/no/such/page")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'gateway_http_requests_total{method="GET",route="/messages/{id}",status="200"} 1.0' in text
    assert 'gateway_http_requests_total{method="GET",route="/messages/{id}",status="404"} 1.0' in text
    assert 'gateway_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'gateway_http_request_duration_seconds_count{method="GET",route="/messages/{id}"} 2.0' in text
    assert f"/messages/{mid}" not in text, "raw paths never become labels"


async def test_one_access_log_line_per_request(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await client.get("/healthz")
        await client.get("/messages?limit=0")
    lines = [r for r in caplog.records if r.name == "gateway.access"]
    assert [(r.method, r.path, r.status) for r in lines] == [("GET", "/healthz", 200), ("GET", "/messages", 422)]  # type: ignore[attr-defined]
    assert all(isinstance(r.duration_ms, float) for r in lines)  # type: ignore[attr-defined]


# --- errors -------------------------------------------------------------------------------------------


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    assert (await error_of(await client.get("/nope"), 404))["code"] == "not_found"
    resp = await client.delete("/messages")
    assert (await error_of(resp, 405))["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_unexpected_errors_are_a_generic_500_logged_with_traceback(
    client: Client, store: MessageStore, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    mid = await store.create("+905551111111", "x")
    await sql(settings, "DROP TABLE message_attempts")  # the database breaks under the running gateway
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        resp = await client.get(f"/messages/{mid}")
    error = await error_of(resp, 500)
    assert error == {"code": "internal_error", "message": "internal server error", "details": {}}
    assert "message_attempts" not in await resp.text()
    (record,) = [r for r in caplog.records if r.name == "gateway.errors"]
    assert record.exc_info is not None and "message_attempts" in str(record.exc_info[1])


# --- API_TOKEN ----------------------------------------------------------------------------------------


STATE_CHANGES = [
    ("POST", "/messages", {"recipient": "+905551111111", "content": "hi"}),
    ("GET", "/process_message?command=stop", None),
    ("POST", "/process_message", {"command": "stop"}),
    ("POST", "/process_message?command=stop", None),
    ("POST", "/messages/{failed}/retry", None),
]


@pytest.mark.parametrize(("method", "url", "body"), STATE_CHANGES)
async def test_state_changes_need_the_token(
    token_client: Client, store: MessageStore, settings: Settings, method: str, url: str, body: Any
) -> None:
    failed = await fail(store)
    url = url.format(failed=failed)
    resp = await token_client.request(method, url, json=body)
    assert (await error_of(resp, 401))["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
        resp = await token_client.request(method, url, json=body, headers={"Authorization": header})
        await error_of(resp, 403 if header.startswith("Bearer") else 401)
    assert await store.is_sending() is True
    assert await sql(settings, "SELECT COUNT(*), MIN(status) FROM messages") == [(1, "failed")], "nothing changed"

    resp = await token_client.request(method, url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status in (200, 201), await resp.text()


DATA_READS = ["/messages", "/messages?mask=true", "/messages/{failed}", "/stats/failed", "/stats/failed?mask=true"]
OPEN = [
    "/healthz",
    "/metrics",
    "/stats",
    "/stats/timeline",
    "/process_message",
    "/swagger/index.html",
    "/swagger/swagger.json",
    "/swagger/init.js",
    "/swagger/static/swagger-ui-bundle.js",
    "/",
    "/dashboard",
    "/dashboard/dashboard.js",
]


async def test_with_a_token_message_data_needs_it(token_client: Client, store: MessageStore) -> None:
    failed = await fail(store)
    await send(store, 1)
    for url in (u.format(failed=failed) for u in DATA_READS):
        resp = await token_client.get(url)
        assert (await error_of(resp, 401, url))["code"] == "unauthorized"
        assert "+90555" not in await resp.text(), url
        await error_of(await token_client.get(url, headers={"Authorization": "Bearer wrong-token-0123456789"}), 403)
        resp = await token_client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200, url
        assert "+90555" in await resp.text() or "mask=true" in url, url


async def test_with_a_token_health_metrics_docs_and_the_dashboard_stay_open(token_client: Client) -> None:
    for url in OPEN:
        assert (await token_client.get(url)).status == 200, url
    for _ in range(100):  # RabbitMQ is connected in the background after start-up
        if (await token_client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert (await token_client.get("/readyz")).status == 200


async def test_every_route_needs_the_token_unless_it_is_meant_to_be_open(settings: Settings) -> None:
    """Deny by default: a route added later is protected unless someone marks it public on purpose."""
    app = create_app(settings)
    opened = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and is_public(route.handler)
    }
    assert opened == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/stats"),
        ("GET", "/stats/timeline"),
        ("GET", "/process_message"),  # open to read the state; a command needs the token (checked inside)
        ("GET", "/swagger/index.html"),
        ("GET", "/swagger"),
        ("GET", "/swagger/"),
        ("GET", "/swagger/init.js"),
        ("GET", "/swagger/static/{name}"),
        ("GET", "/swagger/swagger.json"),
        ("GET", "/"),
        ("GET", "/dashboard"),
        ("GET", "/dashboard/dashboard.css"),
        ("GET", "/dashboard/dashboard.js"),
    }


async def test_masked_lists_hide_all_but_the_last_four_digits(client: Client, store: MessageStore) -> None:
    await send(store, 1)
    await fail(store)
    (row,) = await (await client.get("/messages?mask=true")).json()
    assert row["recipient"] == "+••••••••0000" and row["content"] == "message 0"
    (row,) = await (await client.get("/stats/failed?mask=true")).json()
    assert row["recipient"] == "+••••••••4567"
    assert (await (await client.get("/messages?mask=false")).json())[0]["recipient"] == "+905551200000"
    for url in ("/messages?mask=yes", "/stats/failed?mask=1"):
        assert (await error_of(await client.get(url), 422, url))["details"]["field"] == "mask"


async def test_without_a_token_state_changes_are_open(client: Client) -> None:
    resp = await client.post("/messages", json={"recipient": "+905551111111", "content": "hi"})
    assert resp.status == 201


# --- Swagger ------------------------------------------------------------------------------------------


async def test_swagger_ui_is_served_offline(client: Client) -> None:
    resp = await client.get("/swagger/index.html")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert "https://" not in html and "http://" not in html, "nothing is fetched from the internet"
    assets = re.findall(r'(?:href|src)="(/swagger/[^"]+)"', html)
    assert {"/swagger/static/swagger-ui-bundle.js", "/swagger/static/swagger-ui.css"} <= set(assets)
    for asset in assets:
        got = await client.get(asset)
        assert got.status == 200 and len(await got.read()) > 0, asset
    assert "<script>" not in html, "no inline script: the page's CSP allows none"
    init = await (await client.get("/swagger/init.js")).text()
    assert '"/swagger/swagger.json"' in init and "queryConfigEnabled: false" in init
    bundle = await (await client.get("/swagger/static/swagger-ui-bundle.js")).text()
    assert '"5.' in bundle[:400_000] or "5.24" in bundle, "a current Swagger UI"
    assert (await client.get("/swagger/static/swagger-editor-bundle.js")).status == 404, "only what the page uses"
    resp = await client.get("/swagger", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (302, "/swagger/index.html")


async def test_spec_documents_every_endpoint_once_with_examples_and_security(client: Client) -> None:
    spec = await (await client.get("/swagger/swagger.json")).json()
    assert spec["swagger"] == "2.0"
    assert spec["securityDefinitions"]["bearer"] == {
        **spec["securityDefinitions"]["bearer"],
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
    }
    operations = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert set(operations) == {
        ("GET", "/messages"),
        ("POST", "/messages"),
        ("GET", "/messages/{id}"),
        ("POST", "/messages/{id}/retry"),
        ("POST", "/messages/{id}/cancel"),
        ("POST", "/messages/batch"),
        ("GET", "/process_message"),
        ("POST", "/process_message"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/stats"),
        ("GET", "/stats/timeline"),
        ("GET", "/stats/failed"),
        ("GET", "/metrics"),
    }, "each documented once (no HEAD twins), none missing"
    protected = {
        ("GET", "/messages"),
        ("POST", "/messages"),
        ("GET", "/messages/{id}"),
        ("POST", "/messages/{id}/retry"),
        ("POST", "/messages/{id}/cancel"),
        ("POST", "/messages/batch"),
        ("GET", "/stats/failed"),
        ("GET", "/process_message"),
        ("POST", "/process_message"),
    }
    for key, op in operations.items():
        assert op.get("summary"), key
        if key == ("GET", "/process_message"):  # needs the token only with a command
            assert op["security"] == [{}, {"bearer": []}]
        else:
            assert (op.get("security") == [{"bearer": []}]) == (key in protected), key
        ok = [c for c in op["responses"] if c.startswith("2")]
        assert ok, key
        if key != ("GET", "/metrics"):
            assert all(op["responses"][c].get("examples") for c in op["responses"]), key
        if key in protected:
            assert {"401", "403"} <= set(op["responses"]), key
        if any(p["in"] == "body" for p in op.get("parameters", [])):
            assert "415" in op["responses"], key
    params = {p["name"]: p for p in operations[("GET", "/messages")]["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"], params["limit"]["default"]) == (1, 1000, 20)
    assert params["offset"]["minimum"] == 0 and "after" in params
    body = [p for p in operations[("POST", "/messages")]["parameters"] if p["in"] == "body"]
    assert body and body[0]["required"] is True
    create = spec["definitions"]["MessageCreate"]["properties"]
    assert create["content"]["maxLength"] == 160 and create["recipient"]["pattern"].startswith("^\\+")
