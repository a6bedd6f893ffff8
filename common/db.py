"""MySQL connection pools: created with retry and backoff, the database created when missing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiomysql
import pymysql

from common.settings import Settings

log = logging.getLogger(__name__)

# Every connection works in UTC so DATETIME(6) values mean the same thing on every replica; a page of
# the sent list (up to 1,000 rows) is assembled with GROUP_CONCAT, whose MySQL default limit is 1 KiB.
_INIT = "SET time_zone = '+00:00', group_concat_max_len = 16777216"
ER_BAD_DB = 1049


def connect_kwargs(settings: Settings, with_db: bool = True) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "host": settings.mysql_host,
        "port": settings.mysql_port,
        "user": settings.mysql_user,
        "password": settings.mysql_password.reveal(),
        "charset": "utf8mb4",
        "autocommit": True,
        "init_command": _INIT,
    }
    if with_db:
        kwargs["db"] = settings.mysql_database
    return kwargs


def describe(settings: Settings) -> str:
    """The MySQL address for logs, without the password."""
    return f"mysql://{settings.mysql_user}@{settings.mysql_host}:{settings.mysql_port}/{settings.mysql_database}"


async def ensure_database(settings: Settings) -> None:
    """Create the configured database if it does not exist (when the user may)."""
    conn = await aiomysql.connect(**connect_kwargs(settings, with_db=False))  # type: ignore[arg-type]
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{settings.mysql_database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()


async def create_pool(settings: Settings, minsize: int = 1, maxsize: int = 10) -> aiomysql.Pool:
    """A pool on the configured database, creating the database first if it is missing."""
    try:
        return await aiomysql.create_pool(
            minsize=minsize, maxsize=maxsize, pool_recycle=3600, **connect_kwargs(settings)
        )
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] == ER_BAD_DB:
            await ensure_database(settings)
            return await aiomysql.create_pool(
                minsize=minsize, maxsize=maxsize, pool_recycle=3600, **connect_kwargs(settings)
            )
        raise


async def connect_with_retry(
    settings: Settings, minsize: int = 1, maxsize: int = 10, max_delay: float = 30.0
) -> aiomysql.Pool:
    """Create the pool, retrying with exponential backoff (logged once per attempt) until MySQL answers."""
    delay = 0.5
    while True:
        try:
            pool = await create_pool(settings, minsize=minsize, maxsize=maxsize)
            log.info("connected to %s", describe(settings))
            return pool
        except (OSError, pymysql.err.OperationalError) as exc:
            log.warning("MySQL at %s unreachable (%s); retrying in %.1fs", describe(settings), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


@asynccontextmanager
async def pool_ctx(settings: Settings, minsize: int = 1, maxsize: int = 10) -> AsyncIterator[aiomysql.Pool]:
    pool = await connect_with_retry(settings, minsize=minsize, maxsize=maxsize)
    try:
        yield pool
    finally:
        pool.close()
        await pool.wait_closed()


# MySQL error numbers after which the same work is simply tried again: too many connections, the server
# shutting down or gone away, a lost or killed connection, a lock wait timeout or a deadlock, an
# unresolvable host (while a container's DNS comes up). Anything else (unknown column, access denied, a
# value out of range, a constraint) is a bug or a configuration error: retrying cannot fix it.
TRANSIENT_CODES = frozenset({1040, 1053, 1205, 1213, 1317, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031})


def is_transient(exc: BaseException) -> bool:
    """True for an outage or a lock conflict (worth another try), False for a real error.

    PyMySQL hides the number in ``str(exc)``: classify by ``exc.args[0]``. A connection closed under the
    client (``InterfaceError``), a socket error and a timeout are outages too."""
    if isinstance(exc, OSError | asyncio.TimeoutError | pymysql.err.InterfaceError):
        return True
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0] in TRANSIENT_CODES
    return False


def error_text(exc: BaseException) -> str:
    """``MySQL error 1054: Unknown column ...`` (the number first: it is what the manual is indexed by)."""
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
        return f"MySQL error {exc.args[0]}: {exc.args[1]}"
    return f"{type(exc).__name__}: {exc}"
