"""Fixtures: every test gets its own MySQL database, Redis key prefix and RabbitMQ vhost (a
``deploy.devsupport.Sandbox``) on the servers the settings name (``MYSQL_*``, ``REDIS_URL``, ``AMQP_URL``,
``.env``: what the services read), so test runs (and CI beside a developer) never see each other's data.

A test marked ``@pytest.mark.private("mysql", "redis", "rabbitmq")`` gets its sandbox on private throwaway
servers instead (``tests/private_servers.py``): the scenarios that stop a server stop only those.

The session records which processes serve the configured MySQL, Redis and RabbitMQ ports before the first
test, and fails the run if any of them is not the same process (pid and start time) at the end."""

from __future__ import annotations

import os
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
from deploy.devsupport import (
    ROOT,
    RabbitAdmin,
    Rabbitmqctl,
    Sandbox,
    ServerProcess,
    VhostPool,
    amqp_credentials,
    answers,
    changed_servers,
    dependencies,
    rabbitmq_admin,
    server_processes,
)
from tests.private_servers import PrivateRabbitMQ, private_mysql, private_rabbitmq, private_redis

__all__ = ["private_mysql", "private_rabbitmq", "private_redis"]  # session fixtures, started on first use
SERVERS_BEFORE = pytest.StashKey[dict[str, ServerProcess | None]]()


def machine_settings() -> Settings:
    """The connection settings of the machine's servers, as the services would read them here."""
    return Settings.from_env(dotenv=ROOT / ".env")


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[SERVERS_BEFORE] = server_processes(machine_settings())


def pytest_report_header(config: pytest.Config) -> str:
    seen = server_processes(machine_settings())
    shown = [f"{name} pid {proc[0]}" if proc else f"{name} (process not visible)" for name, proc in seen.items()]
    return "machine's servers, checked unchanged at the end: " + ", ".join(shown)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test stopped, restarted or replaced one of the machine's servers."""
    before = session.stash.get(SERVERS_BEFORE, None)
    if before is None:
        return
    changed = changed_servers(before, server_processes(machine_settings()))
    if changed:
        text = "the machine's own servers changed during the test session:\n  " + "\n  ".join(changed)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: {text}", red=True, bold=True)
        else:
            print(f"FAILED: {text}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return machine_settings()


@pytest.fixture(scope="session", autouse=True)
def services_up(base_settings: Settings) -> None:
    for name, host, port in dependencies(base_settings):
        if not answers(host, port, 1):
            pytest.exit(
                f"{name} does not answer on {host}:{port}; start it with `make services` "
                "(deploy/local-services.sh ensure)",
                returncode=3,
            )


@pytest.fixture(scope="session")
def shared_rabbit(base_settings: Settings) -> Iterator[RabbitAdmin]:
    """How vhosts are made on the shared RabbitMQ: its management API if it answers, else rabbitmqctl with
    vhosts made ahead in batches and deleted in the background (:class:`VhostPool`), each worker its own."""
    admin = rabbitmq_admin(base_settings)
    if not isinstance(admin, Rabbitmqctl):
        yield admin
        return
    pool = VhostPool(amqp_credentials(base_settings)[0])
    try:
        yield pool
    finally:
        problems = pool.close()
        assert not problems, f"vhosts the session could not delete: {problems}"


@pytest.fixture
def run_id() -> str:
    return f"mst_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, run_id: str, base_settings: Settings) -> Iterator[Sandbox]:
    """The test's own database, vhost and Redis prefix: on the shared servers, or on the private ones the
    test's ``private`` mark names."""
    marker = request.node.get_closest_marker("private")
    base, rabbit = base_settings, None
    for name in marker.args if marker else ():
        server = request.getfixturevalue(f"private_{name}")
        base = server.settings(base)
        if isinstance(server, PrivateRabbitMQ):
            rabbit = server.ctl
    admin = rabbit or request.getfixturevalue("shared_rabbit")
    box = Sandbox(base, run_id, admin, vhost=admin.take() if isinstance(admin, VhostPool) else None)
    box.create()
    try:
        yield box
    finally:
        problems = box.remove()
        assert not problems, f"the sandbox {run_id} could not be removed: {problems}"


@pytest.fixture
def env(sandbox: Sandbox) -> dict[str, str]:
    """The environment of an isolated run: own database, Redis prefix and vhost; fast, quiet defaults."""
    # AMQP_QUEUE_TYPE passes through: the whole suite runs with either queue type.
    queue_type = {"AMQP_QUEUE_TYPE": os.environ.get("AMQP_QUEUE_TYPE", "classic")}
    return {**sandbox.env(), **queue_type, "LOG_LEVEL": "INFO", "LOG_FORMAT": "text"}


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
