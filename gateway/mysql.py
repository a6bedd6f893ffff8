"""The gateway's MySQL: a pool with short timeouts, opened in the background, and its outages.

- Start-up never waits for MySQL for long: the app listens at once (``/healthz`` 200, ``/readyz`` 503
  naming MySQL) while a background task connects with backoff, creates the database if it may, and
  applies the migrations; only then does the pool hand out connections ("not connected yet" before).
- Every connection has connect, read and pool-acquire timeouts (:mod:`common.db`), so a MySQL that hangs
  costs a request a few seconds, never the pool.
- An outage is logged once when a request first meets it and once when MySQL answers again (a probe
  every :data:`PROBE_SECONDS`); requests in between answer 503 ``unavailable`` without a log line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiomysql

from common import db
from common.migrations import migrate
from common.settings import Settings

log = logging.getLogger(__name__)

POOL_SIZE = 20
CONNECT_TIMEOUT_SECONDS = 2.0  # TCP connect and handshake of one connection
READ_TIMEOUT_SECONDS = 3.0  # one answer of the server; the slowest read (counts at 1M rows) takes ~0.3 s
ACQUIRE_TIMEOUT_SECONDS = 2.0  # waiting for a connection of the pool, opening one included
STARTUP_WAIT_SECONDS = 2.0  # how long start-up waits for the first connection before it listens anyway
PROBE_SECONDS = 1.0  # during an outage, how often MySQL is asked whether it answers again
RETRY_MAX_SECONDS = 5.0  # the longest pause between two connection attempts at start-up
# Migrations may wait on another replica's lock (60 s) or rebuild a big table: a read timeout of their own.
MIGRATION_READ_TIMEOUT_SECONDS = 600.0

NOT_CONNECTED = "MySQL is not connected yet"


class _Pool(db.Pool):
    """The request pool: refuses to hand out connections until the schema is up to date."""

    link: MysqlLink

    async def _acquire(self) -> aiomysql.Connection:
        if not self.link.ready.is_set():
            raise aiomysql.OperationalError(db.CR_CONN_HOST_ERROR, NOT_CONNECTED)
        return await super()._acquire()


class MysqlLink:
    """The gateway's MySQL pool, whether it is ready (connected once, schema migrated) and its outages."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.down_since: float | None = None
        pool = db.new_pool(
            settings,
            maxsize=POOL_SIZE,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            acquire_timeout=ACQUIRE_TIMEOUT_SECONDS,
            cls=_Pool,
        )
        assert isinstance(pool, _Pool)
        pool.link = self
        self.pool = pool
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._spawn(self._open(), "gateway-mysql-connect")

    async def _open(self) -> None:
        """Connect (retried with backoff, each attempt logged), create the database if missing, migrate."""
        delay = 0.5
        while True:
            try:
                pool = await db.create_pool(
                    self.settings,
                    maxsize=1,
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    read_timeout=MIGRATION_READ_TIMEOUT_SECONDS,
                )
                try:
                    await migrate(pool)
                finally:
                    pool.close()
                    await pool.wait_closed()
                break
            except Exception as exc:
                # One line per attempt, no traceback: unreachable, or access denied, a newer schema...
                reason = f"{type(exc).__name__}: {exc}"
                if db.is_unavailable(exc):
                    log.warning("MySQL at %s unreachable (%s); retrying in %.1fs", self.where, reason, delay)
                else:
                    log.error("MySQL at %s: cannot migrate (%s); retrying in %.1fs", self.where, reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
        self.ready.set()
        log.info("connected to %s; schema up to date", self.where)

    @property
    def where(self) -> str:
        return db.describe(self.settings)

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        return self.ready.is_set()

    def failed(self, exc: BaseException) -> None:
        """A request met ``exc`` (MySQL unavailable): log the outage if it is new, and watch for its end."""
        if not self.ready.is_set() or self.down_since is not None:
            return  # not connected yet (logged by the start-up task), or an outage already logged
        self.down_since = time.monotonic()
        log.warning(
            "MySQL at %s does not answer (%s: %s); requests that need it answer 503 until it does",
            self.where,
            type(exc).__name__,
            exc,
        )
        self._spawn(self._watch(), "gateway-mysql-probe")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                async with self.pool.acquire() as conn:
                    await conn.ping(reconnect=False)
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("MySQL probe failed unexpectedly")
                continue
            down_for = time.monotonic() - (self.down_since or time.monotonic())
            self.down_since = None
            log.info("MySQL answers again after %.1fs", down_for)
            return

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pool.close()
        await self.pool.wait_closed()
