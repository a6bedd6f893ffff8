"""MySQL connection pools: created with retry and backoff, the database created when missing, with
timeouts on every connection.

aiomysql bounds only the TCP connect (``connect_timeout``); a server, proxy or network that accepts and
then stops answering would hold a statement, a handshake or a wait for a pooled connection forever. The
:class:`Pool` here adds the three bounds a service chooses for itself (``create_pool``'s parameters):

- ``connect_timeout``: opening a connection, TCP connect and handshake together (default 10 s);
- ``read_timeout``: each read of an answer from the server (default none: a producer's or consumer's
  statement may legitimately wait on a lock; the gateway uses a few seconds);
- ``acquire_timeout``: waiting for a connection of the pool, opening one included (default none).

Each expiry raises a ``pymysql.err.OperationalError`` with the client error number a lost server gets
(2003 cannot connect, 2013 lost during a query), so every caller's "try again" classification by
``exc.args[0]`` holds; a connection whose read timed out is closed, never handed out again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
import pymysql

from common.settings import Settings

log = logging.getLogger(__name__)

# Every connection works in UTC so DATETIME(6) values mean the same thing on every replica; a page of
# the sent list (up to 1,000 rows) is assembled with GROUP_CONCAT, whose MySQL default limit is 1 KiB.
_INIT = "SET time_zone = '+00:00', group_concat_max_len = 16777216"
ER_BAD_DB = 1049
CONNECT_TIMEOUT_SECONDS = 10.0
# Client error numbers (pymysql.constants.CR) of "MySQL is not there": cannot connect (2002 socket,
# 2003 TCP), gone away (2006), lost during a query (2013); and the server's own "shutting down" (1053)
# and "connection killed" (1927, MariaDB).
CR_CONN_HOST_ERROR = 2003
CR_SERVER_LOST = 2013
UNAVAILABLE_ERRNOS = frozenset({2002, 2003, 2006, 2013, 1053, 1927})


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says MySQL is unreachable or does not answer (as opposed to a bad statement)."""
    if isinstance(exc, pymysql.err.InterfaceError | OSError | TimeoutError):
        return True  # a closed connection, a socket error, a deadline
    if isinstance(exc, pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in UNAVAILABLE_ERRNOS
    return False


def connect_kwargs(
    settings: Settings, with_db: bool = True, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
) -> dict[str, object]:
    """The arguments of ``aiomysql.connect`` for ``settings`` (``connect_timeout`` bounds the TCP connect)."""
    kwargs: dict[str, object] = {
        "host": settings.mysql_host,
        "port": settings.mysql_port,
        "user": settings.mysql_user,
        "password": settings.mysql_password.reveal(),
        "charset": "utf8mb4",
        "autocommit": True,
        "init_command": _INIT,
        "connect_timeout": connect_timeout,
    }
    if with_db:
        kwargs["db"] = settings.mysql_database
    return kwargs


def describe(settings: Settings) -> str:
    """The MySQL address for logs, without the password."""
    return f"mysql://{settings.mysql_user}@{settings.mysql_host}:{settings.mysql_port}/{settings.mysql_database}"


async def ensure_database(settings: Settings) -> None:
    """Create the configured database if it does not exist (when the user may)."""
    async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):  # the handshake, beyond the TCP connect
        conn = await aiomysql.connect(**connect_kwargs(settings, with_db=False))  # type: ignore[arg-type]
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{settings.mysql_database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()


class _TimedConnection(aiomysql.Connection):  # type: ignore[misc]
    """An aiomysql connection whose every read from the server gives up after ``read_timeout`` seconds."""

    read_timeout: float | None = None

    async def _read_bytes(self, num_bytes: int) -> bytes:
        if self.read_timeout is None or len(getattr(self._reader, "_buffer", b"")) >= num_bytes:
            # Already received (most packets of an answer are): no wait, so no timer to arm.
            return await super()._read_bytes(num_bytes)  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.read_timeout):
                return await super()._read_bytes(num_bytes)  # type: ignore[no-any-return]
        except TimeoutError:
            self.close()  # an answer may still be on its way: this connection can never be reused
            raise pymysql.err.OperationalError(
                CR_SERVER_LOST, f"Lost connection to MySQL server during query (no answer in {self.read_timeout:g}s)"
            ) from None


class Pool(aiomysql.Pool):  # type: ignore[misc]
    """aiomysql's pool with connect, read and acquire timeouts (see the module)."""

    def __init__(self, *, read_timeout: float | None, acquire_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # kwargs: aiomysql's, connect_timeout included (see connect_kwargs)
        self.connect_timeout = float(kwargs.get("connect_timeout") or CONNECT_TIMEOUT_SECONDS)
        self.read_timeout = read_timeout
        self.acquire_timeout = acquire_timeout

    async def _fill_free_pool(self, override_min: bool) -> None:
        # Opening connections (TCP and handshake) happens here, holding the pool's lock: bounded, so a
        # server that accepts and never greets cannot stall every caller behind it.
        try:
            async with asyncio.timeout(self.connect_timeout):
                await super()._fill_free_pool(override_min)
        except TimeoutError:
            raise pymysql.err.OperationalError(
                CR_CONN_HOST_ERROR, f"Can't connect to MySQL server (no handshake in {self.connect_timeout:g}s)"
            ) from None
        for conn in self._free:
            if type(conn) is aiomysql.Connection:
                # aiomysql creates its own Connection class; its reads get the bound from now on.
                conn.__class__ = _TimedConnection
                conn.read_timeout = self.read_timeout

    async def _acquire(self) -> aiomysql.Connection:
        if self.acquire_timeout is None or (self._free and not self._cond.locked()):
            # A free connection and nobody opening one: handed out at once (a stale one replaced within
            # connect_timeout), so the common case needs no timer task.
            return await super()._acquire()
        try:
            # wait_for, not timeout(): a connection acquired just as the bound expires is returned
            # rather than lost from the pool.
            return await asyncio.wait_for(super()._acquire(), self.acquire_timeout)
        except TimeoutError:
            raise pymysql.err.OperationalError(
                CR_CONN_HOST_ERROR,
                f"no MySQL connection within {self.acquire_timeout:g}s ({len(self._used)} of {self.maxsize} in use)",
            ) from None


def new_pool(
    settings: Settings,
    minsize: int = 1,
    maxsize: int = 10,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    read_timeout: float | None = None,
    acquire_timeout: float | None = None,
    cls: type[Pool] = Pool,
) -> Pool:
    """A pool (of ``cls``) on the configured database that has not connected yet: the first ``acquire``
    connects."""
    return cls(
        minsize=minsize,
        maxsize=maxsize,
        echo=False,
        pool_recycle=3600,
        loop=asyncio.get_running_loop(),
        read_timeout=read_timeout,
        acquire_timeout=acquire_timeout,
        **connect_kwargs(settings, connect_timeout=connect_timeout),
    )


async def create_pool(
    settings: Settings,
    minsize: int = 1,
    maxsize: int = 10,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    read_timeout: float | None = None,
    acquire_timeout: float | None = None,
) -> Pool:
    """A connected pool on the configured database, creating the database first if it is missing."""
    for attempt in (1, 2):
        pool = new_pool(
            settings,
            minsize,
            maxsize,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            acquire_timeout=acquire_timeout,
        )
        try:
            async with pool._cond:
                await pool._fill_free_pool(False)  # what aiomysql.create_pool does: open minsize connections
            return pool
        except pymysql.err.OperationalError as exc:
            await _discard(pool)
            if attempt == 1 and exc.args and exc.args[0] == ER_BAD_DB:
                await ensure_database(settings)
                continue
            raise
        except BaseException:
            await _discard(pool)
            raise
    raise AssertionError("unreachable")


async def _discard(pool: Pool) -> None:
    pool.close()
    await pool.wait_closed()


async def connect_with_retry(
    settings: Settings, minsize: int = 1, maxsize: int = 10, max_delay: float = 30.0, **timeouts: Any
) -> Pool:
    """Create the pool, retrying with exponential backoff (logged once per attempt) until MySQL answers.
    ``timeouts``: ``connect_timeout``, ``read_timeout``, ``acquire_timeout`` of :func:`create_pool`."""
    delay = 0.5
    while True:
        try:
            pool = await create_pool(settings, minsize=minsize, maxsize=maxsize, **timeouts)
            log.info("connected to %s", describe(settings))
            return pool
        except (OSError, pymysql.err.OperationalError) as exc:
            log.warning("MySQL at %s unreachable (%s); retrying in %.1fs", describe(settings), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


@asynccontextmanager
async def pool_ctx(
    settings: Settings, minsize: int = 1, maxsize: int = 10, **timeouts: Any
) -> AsyncIterator[aiomysql.Pool]:
    pool = await connect_with_retry(settings, minsize=minsize, maxsize=maxsize, **timeouts)
    try:
        yield pool
    finally:
        pool.close()
        await pool.wait_closed()


# The read timeout of the producer's and the consumer's connections: longer than InnoDB's default lock wait
# (50 s), so a slow lock wait ends with its own error, while a half-open connection is given up.
SERVICE_READ_TIMEOUT_SECONDS = 60.0

# MySQL error numbers after which the same work is simply tried again: too many connections, the server
# shutting down or gone away, a lost or killed connection, a lock wait timeout or a deadlock, an
# unresolvable host (while a container's DNS comes up), a server read-only during a failover (1290, 1836),
# a table definition changed under a transaction by a migration (1412). Anything else (unknown column,
# access denied, a value out of range, a constraint) is a bug or a configuration error: retrying cannot fix it.
TRANSIENT_CODES = frozenset(
    {1040, 1053, 1205, 1213, 1290, 1317, 1412, 1836, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031}
)


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
