"""Fixtures: every test gets its own MySQL database, Redis key prefix and RabbitMQ vhost on the real
local services, so test runs (and CI beside a developer) never see each other's data."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import aiomysql
import pytest
import redis.asyncio as redis

from common.cache import MessageCache
from common.db import connect_kwargs, create_pool
from common.migrations import migrate
from common.settings import Settings
from common.store import MessageStore

MYSQL = ("127.0.0.1", int(os.environ.get("TEST_MYSQL_PORT", "3306")))
REDIS = ("127.0.0.1", 6379)
AMQP = ("127.0.0.1", 5672)
MANAGEMENT = "http://127.0.0.1:15672/api"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def services_up() -> None:
    for name, (host, port) in {"MySQL/MariaDB": MYSQL, "Redis": REDIS, "RabbitMQ": AMQP}.items():
        if not _answers(host, port):
            pytest.exit(
                f"{name} does not answer on {host}:{port}; start it with `make services` "
                "(deploy/local-services.sh ensure)",
                returncode=3,
            )


def _management(method: str, path: str, body: dict[str, str] | None = None) -> None:
    req = urllib.request.Request(
        f"{MANAGEMENT}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
    )
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10):
        pass


def create_vhost(name: str) -> None:
    try:
        _management("PUT", f"/vhosts/{name}")
        _management("PUT", f"/permissions/{name}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    except (urllib.error.URLError, OSError):
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )


def delete_vhost(name: str) -> None:
    try:
        _management("DELETE", f"/vhosts/{name}")
    except (urllib.error.URLError, OSError):
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True)


@pytest.fixture
def run_id() -> str:
    return f"mst_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def env(run_id: str) -> Iterator[dict[str, str]]:
    """The environment of an isolated run: own database, Redis prefix and vhost; fast, quiet defaults."""
    create_vhost(run_id)
    values = {
        "MYSQL_HOST": MYSQL[0],
        "MYSQL_PORT": str(MYSQL[1]),
        "MYSQL_USER": "root",
        "MYSQL_PASSWORD": "",
        "MYSQL_DATABASE": run_id,
        "REDIS_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
        "REDIS_PREFIX": f"{run_id}:",
        "AMQP_URL": f"amqp://guest:guest@{AMQP[0]}:{AMQP[1]}/{run_id}",
        "AMQP_QUEUE_TYPE": os.environ.get("AMQP_QUEUE_TYPE", "classic"),  # the whole suite runs with either
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
    }
    try:
        yield values
    finally:
        delete_vhost(run_id)
        _drop_database(run_id)
        _delete_redis_prefix(f"{run_id}:")


def _drop_database(name: str) -> None:
    import pymysql

    conn = pymysql.connect(host=MYSQL[0], port=MYSQL[1], user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def _delete_redis_prefix(prefix: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env, dotenv=None)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[aiomysql.Pool]:
    p = await create_pool(settings, maxsize=20)
    await migrate(p)
    try:
        yield p
    finally:
        p.close()
        await p.wait_closed()


@pytest.fixture
def store(pool: aiomysql.Pool) -> MessageStore:
    return MessageStore(pool)


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[redis.Redis]:
    client = redis.from_url(settings.redis_url.reveal())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cache(redis_client: redis.Redis, settings: Settings) -> MessageCache:
    return MessageCache(redis_client, settings.cache_ttl_seconds, settings.redis_prefix)


async def sql(settings: Settings, statement: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on a fresh connection (as a person at a mysql prompt would)."""
    conn = await aiomysql.connect(**connect_kwargs(settings))  # type: ignore[arg-type]
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement, args)
            return list(await cur.fetchall())
    finally:
        conn.close()


# --- end-to-end: real service processes and the webhook stand-in ------------------------------------

from tests.procs import ARTIFACTS, Cluster, StandIn  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
async def standin(request: pytest.FixtureRequest, run_id: str) -> AsyncIterator[StandIn]:
    s = StandIn(ARTIFACTS / request.node.name)
    try:
        yield await s.start()
    finally:
        s.close()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, env: dict[str, str], standin: StandIn) -> Iterator[Cluster]:
    """Start services with ``cluster.start("producer", SETTING="value")``; fast defaults for tests."""
    c = Cluster(
        {
            **env,
            "WEBHOOK_URL": f"{standin.url}/webhook",
            "SEND_INTERVAL_SECONDS": "0.5",
            "RETRY_BASE_SECONDS": "0.2",
            "WEBHOOK_TIMEOUT_SECONDS": "2",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
        },
        ARTIFACTS / request.node.name,
    )
    try:
        yield c
    finally:
        c.stop_all()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for svc in c.services:
                print(f"----- {svc.name} (last lines) -----\n" + "\n".join(svc.log().splitlines()[-40:]))
