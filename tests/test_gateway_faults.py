"""The gateway as a real process behind a fault proxy to MySQL (tests/faultproxy.py, on a private port:
the shared server is never touched), and hostile raw HTTP requests: issue 21, items 5-8.

What a user notices: the gateway listens and says what is missing while MySQL is down; a MySQL that
refuses or hangs costs each request a few seconds and a clear 503, never a hang, a 500 or a pool that
stays broken afterwards; an outage is one log line each way; malformed requests get JSON errors.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from common.settings import Settings
from tests.conftest import sql
from tests.faultproxy import FaultProxy
from tests.procs import ARTIFACTS, Service, free_port, wait_for

# The gateway's bounds (gateway.errors.REQUEST_DEADLINE_SECONDS, gateway.stats.SNAPSHOT_TIMEOUT_SECONDS),
# plus scheduling slack on a busy 2-core machine.
DEADLINE = 5.0
SNAPSHOT = 3.0
SLACK = 1.5
OUTAGE = "does not answer"
BACK = "MySQL answers again"


class Gateway:
    """``python -m gateway`` with JSON logs, reaching MySQL through ``proxy``."""

    def __init__(self, request: pytest.FixtureRequest, env: dict[str, str], proxy: FaultProxy) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = Service(
            "gateway",
            [sys.executable, "-m", "gateway"],
            {**env, "MYSQL_PORT": str(proxy.port), "GATEWAY_PORT": str(self.port), "LOG_FORMAT": "json"},
            ARTIFACTS / request.node.name,
        )
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any, float]:
        """Status, JSON body (or text) and seconds taken."""
        started = time.monotonic()
        async with self.session.get(self.url + path, **kwargs) as resp:
            text = await resp.text()
            body = orjson.loads(text) if resp.content_type == "application/json" else text
            return resp.status, body, time.monotonic() - started

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def listening(self) -> None:
        async def up() -> bool:
            try:
                return (await self.get("/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, 30, "the gateway to answer /healthz")

    def logged(self, pattern: str) -> list[str]:
        messages = []
        for line in self.service.log().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and re.search(pattern, str(entry.get("message", ""))):
                messages.append(str(entry["message"]))
        return messages

    def assert_no_traceback(self) -> None:
        log = self.service.log()
        assert "Traceback" not in log, log[-3000:]

    async def close(self) -> None:
        await self.session.close()
        self.service.terminate(20)
        self.service.close()


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(settings.mysql_port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def gateway(request: pytest.FixtureRequest, env: dict[str, str], proxy: FaultProxy) -> AsyncIterator[Gateway]:
    g = Gateway(request, env, proxy)
    try:
        yield g
    finally:
        await g.close()


async def ready(gateway: Gateway) -> None:
    await gateway.listening()

    async def is_ready() -> bool:
        return (await gateway.get("/readyz"))[0] == 200

    await wait_for(is_ready, 30, "the gateway to be ready")


def assert_unavailable(status: int, body: Any, what: str) -> None:
    assert status == 503, (what, status, body)
    assert body["error"]["code"] == "unavailable", (what, body)
    assert "MySQL" in body["error"]["message"], (what, body)


async def test_listens_while_mysql_is_down_at_start_and_migrates_once_it_answers(
    gateway: Gateway, proxy: FaultProxy, settings: Settings
) -> None:
    """Item 6: the gateway did not listen at all while MySQL was down at start."""
    await proxy.set("refuse")
    await gateway.listening()
    status, body, _ = await gateway.get("/readyz")
    assert status == 503 and body["error"]["code"] == "not_ready", body
    assert "mysql" in body["error"]["message"]
    assert body["error"]["details"]["checks"]["mysql"] == "down: not connected yet"
    for path in ("/messages", "/messages/1", "/process_message", "/stats"):
        status, body, _ = await gateway.get(path)
        assert_unavailable(status, body, path)
    status, text, _ = await gateway.get("/metrics")
    assert status == 200 and "gateway_http_requests_total" in text and "messages_by_status" not in text

    await proxy.set("pass")  # MySQL answers: the database (missing so far) is created and migrated
    await ready(gateway)
    status, created = await gateway.post("/messages", {"recipient": "+905551111111", "content": "after the outage"})
    assert status == 201, created
    assert (await sql(settings, "SELECT MAX(version) FROM schema_migrations"))[0][0] >= 1
    status, body, _ = await gateway.get(f"/messages/{created['id']}")
    assert status == 200 and body["status"] == "pending"
    gateway.assert_no_traceback()


async def test_a_hanging_mysql_costs_each_request_seconds_and_the_api_recovers(
    gateway: Gateway, proxy: FaultProxy
) -> None:
    """Item 5: behind a proxy that hangs, /messages hung for 40 s and more, 25 such requests wedged the
    pool for good, and /metrics took 10 s (Prometheus's default scrape timeout)."""
    await ready(gateway)
    status, created = await gateway.post("/messages", {"recipient": "+905551111111", "content": "hello"})
    assert status == 201

    await proxy.set("hang")
    started = time.monotonic()
    paths = ["/messages", f"/messages/{created['id']}", "/process_message"] * 9
    answers = await asyncio.gather(*(gateway.get(p) for p in paths[:25]))
    wall = time.monotonic() - started
    for (status, body, took), path in zip(answers, paths, strict=False):
        assert_unavailable(status, body, path)
        assert took < DEADLINE + SLACK, (path, took)
    assert wall < DEADLINE + SLACK, wall

    status, text, took = await gateway.get("/metrics")
    assert status == 200 and "gateway_http_requests_total" in text
    assert took < SNAPSHOT + SLACK, f"/metrics took {took:.1f}s with MySQL hanging"
    status, body, took = await gateway.get("/stats")
    assert_unavailable(status, body, "/stats")
    assert took < SNAPSHOT + SLACK, f"/stats took {took:.1f}s with MySQL hanging"
    status, body, took = await gateway.get("/readyz")
    assert status == 503 and body["error"]["details"]["checks"]["mysql"].startswith("down")
    status, page, took = await gateway.get("/")  # the dashboard still loads, without the statistics
    assert status == 200 and "<html" in page.lower() and took < SNAPSHOT + SLACK, (status, took)
    assert not gateway.logged("dashboard rendered without statistics")

    await proxy.set("pass")

    async def answers_again() -> bool:
        return (await gateway.get("/messages"))[0] == 200

    await wait_for(answers_again, 10, "the API to answer once MySQL does")
    after = await asyncio.gather(*(gateway.get(f"/messages/{created['id']}") for _ in range(25)))
    assert [a[0] for a in after] == [200] * 25, "the pool is not wedged"
    gateway.assert_no_traceback()


async def test_an_outage_answers_503_unavailable_and_is_logged_once_each_way(
    gateway: Gateway, proxy: FaultProxy
) -> None:
    """Item 7: during an outage reads answered 500 internal_error with a traceback per request."""
    await ready(gateway)
    for outage in (1, 2):
        await proxy.set("refuse")  # open connections are reset, new ones refused
        for path in ["/messages", "/messages/1", "/messages?limit=5", "/stats", "/stats/failed"] * 4:
            status, body, _ = await gateway.get(path)
            assert_unavailable(status, body, path)
        await proxy.set("pass")

        async def back(outage: int = outage) -> bool:
            return (await gateway.get("/messages"))[0] == 200 and len(gateway.logged(BACK)) == outage

        await wait_for(back, 10, f"the end of outage {outage} to be logged")
        assert len(gateway.logged(OUTAGE)) == outage, gateway.logged(OUTAGE)
    assert not gateway.logged("internal_error|unhandled error")
    gateway.assert_no_traceback()


def _raw_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def _send_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        while True:  # the answer: headers, then Content-Length bytes (error answers close the connection)
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            received += chunk
            status, headers, body = _raw_answer(received) if b"\r\n\r\n" in received else (0, {}, b"")
            if not chunk or (status and len(body) >= int(headers.get("content-length", "-1"))):
                return _raw_answer(received)
    finally:
        writer.close()


POST = b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BODY = b'{"recipient": "+905551111111", "content": "hi"}'


def _post(*headers: bytes) -> bytes:
    return POST + b"".join(h + b"\r\n" for h in headers) + b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


MALFORMED = {
    "gzip with a plain body": _post(b"Content-Encoding: gzip"),
    "deflate with a plain body": _post(b"Content-Encoding: deflate"),
    "br": _post(b"Content-Encoding: br"),
    "two Content-Type headers": _post(b"Content-Type: text/plain"),
    "an over-long URL": b"GET /messages?x=" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "an over-long header": b"GET /messages HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    "a control character in a header": b"GET /messages HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    "a NUL in a header": b"GET /messages HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    "a header without a colon": b"GET /messages HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "a bad chunk size": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}


async def test_malformed_requests_get_a_json_400_never_a_500_or_text(gateway: Gateway, settings: Settings) -> None:
    """Item 8: gzip/deflate with a plain body gave a 500; br, two Content-Type headers, an over-long URL
    or header, a control character in a header got a text/plain 400."""
    await ready(gateway)
    wrong = {}
    for case, data in MALFORMED.items():
        status, headers, body = await _send_raw(gateway.port, data)
        try:
            error = orjson.loads(body)["error"]
            ok = status == 400 and headers.get("content-type", "").startswith("application/json")
            ok = ok and error["code"] == "bad_request" and error["message"] and "\n" not in error["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            wrong[case] = (status, headers.get("content-type"), body[:200])
    assert not wrong, wrong
    status, headers, body = await _send_raw(gateway.port, MALFORMED["gzip with a plain body"])
    assert b"Content-Encoding" in body
    status, headers, body = await _send_raw(gateway.port, MALFORMED["an over-long URL"])
    assert b"too long" in body
    assert (await gateway.get("/messages"))[0] == 200, "the gateway serves on"
    assert (await sql(settings, "SELECT COUNT(*) FROM messages"))[0][0] == 0, "nothing created from them"
    gateway.assert_no_traceback()
