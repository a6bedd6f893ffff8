"""common.db's timeouts on the real MySQL, through the fault proxy: a MySQL that accepts and then stops
answering costs a caller the bound it chose, with the error number of a lost server, and the pool
works again as soon as MySQL answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import pymysql
import pytest

from common import db
from common.settings import Settings
from tests.faultproxy import FaultProxy

SLACK = 1.0


@pytest.fixture
async def proxy(settings: Settings, pool: object) -> AsyncIterator[FaultProxy]:
    """A proxy to MySQL; ``pool`` (conftest) has created the test's database."""
    p = FaultProxy(settings.mysql_port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def through(settings: Settings, proxy: FaultProxy) -> Settings:
    return Settings.from_env({"MYSQL_PORT": str(proxy.port), "MYSQL_DATABASE": settings.mysql_database}, dotenv=None)


async def select_one(pool: db.Pool) -> object:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT 1")
        return (await cur.fetchone())[0]


async def timed(work: Awaitable[object]) -> tuple[object, float]:
    """``work``'s result or exception, and the seconds it took."""
    started = time.monotonic()
    try:
        result = await work
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


async def test_a_hanging_mysql_costs_the_read_timeout_then_the_pool_recovers(
    settings: Settings, proxy: FaultProxy
) -> None:
    pool = await db.create_pool(
        through(settings, proxy), maxsize=3, connect_timeout=1, read_timeout=1, acquire_timeout=1.5
    )
    try:
        assert await select_one(pool) == 1
        await proxy.set("hang")
        error, took = await timed(select_one(pool))
        assert isinstance(error, pymysql.err.OperationalError) and error.args[0] == db.CR_SERVER_LOST, error
        assert db.is_unavailable(error) and 1 <= took < 1 + SLACK, took
        assert pool.size == 0, "the connection whose read timed out is closed, never handed out again"

        answers = await asyncio.gather(*(timed(select_one(pool)) for _ in range(6)))
        for error, took in answers:  # opening a connection hangs too: the handshake or the wait is bounded
            assert isinstance(error, pymysql.err.OperationalError) and error.args[0] == db.CR_CONN_HOST_ERROR, error
            assert took < 1.5 + SLACK, took

        await proxy.set("pass")
        assert await asyncio.gather(*(select_one(pool) for _ in range(6))) == [1] * 6
    finally:
        pool.close()
        await pool.wait_closed()


async def test_creating_a_pool_gives_up_when_mysql_never_greets(settings: Settings, proxy: FaultProxy) -> None:
    await proxy.set("hang")  # accepts the TCP connection, never sends the handshake
    error, took = await timed(db.create_pool(through(settings, proxy), connect_timeout=1))
    assert isinstance(error, pymysql.err.OperationalError) and error.args[0] == db.CR_CONN_HOST_ERROR, error
    assert took < 1 + SLACK, took


async def test_without_a_read_timeout_a_slow_statement_is_waited_for(settings: Settings, proxy: FaultProxy) -> None:
    """Producer and consumer choose no read timeout: a statement that takes long (a lock wait) is fine."""
    pool = await db.create_pool(through(settings, proxy), maxsize=1)
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT SLEEP(1.5)")
            assert (await cur.fetchone())[0] == 0
    finally:
        pool.close()
        await pool.wait_closed()
