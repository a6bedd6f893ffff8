"""The producer: every ``SEND_INTERVAL_SECONDS`` the leader claims a batch and publishes it to RabbitMQ.

Leadership is a MySQL named lock held on a dedicated connection: however many replicas run, one claims
per tick, so the global rate stays ``SEND_BATCH_SIZE`` per interval; when the leader dies its connection
(and so its lock) goes, and another replica takes over on its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass

import aio_pika
import aiomysql
import pymysql

from common import topology
from common.db import connect_kwargs, pool_ctx
from common.metrics import start_listener
from common.migrations import migrate
from common.settings import Settings
from common.store import LeaderLock, MessageStore
from producer import metrics

log = logging.getLogger(__name__)

DB_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError, asyncio.TimeoutError)


def leader_lock_name(database: str) -> str:
    """Named locks are server-wide: scope the name to the database (and keep it within 64 characters)."""
    name = f"{database}.producer.leader"
    return name if len(name) <= 64 else "ms.leader." + hashlib.sha1(database.encode()).hexdigest()


@dataclass
class TickReport:
    leader: bool = False
    sending: bool | None = None
    claimed: int = 0
    published: int = 0
    released: int = 0
    republished: int = 0


class Producer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.lock: LeaderLock | None = None
        self.leading = False
        self.ready = False
        self.next_stale_check = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            listener = await start_listener(s.producer_metrics_port, self.health)
            if listener:
                stack.push_async_callback(listener.cleanup)
            pool: aiomysql.Pool = await stack.enter_async_context(pool_ctx(s, maxsize=4))
            await migrate(pool)
            self.store = MessageStore(pool)
            conn = await topology.connect(s.amqp_url.reveal())
            stack.push_async_callback(conn.close)
            self.topology = await topology.open_channel(conn)
            stack.push_async_callback(self._drop_lock)
            self.ready = True
            log.info("producer %s ticking every %gs, batch %d", self.name, s.send_interval_seconds, s.send_batch_size)
            await self._loop(stop)

    def health(self) -> dict[str, object]:
        return {"status": "ok" if self.ready else "starting", "leader": self.leading}

    async def _loop(self, stop: asyncio.Event) -> None:
        """Tick at start-up and then on a fixed schedule (no drift; a late tick does not cause a burst)."""
        loop = asyncio.get_running_loop()
        interval = self.settings.send_interval_seconds
        due = loop.time()
        while not stop.is_set():
            await self.tick()
            due += interval
            now = loop.time()
            if due < now:  # the tick overran: skip the missed slots instead of catching up
                due = now + interval - (now - due) % interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=due - now)

    async def tick(self) -> TickReport:
        report = TickReport()
        metrics.TICKS.inc()
        try:
            report.leader = await self._lead()
            if report.leader and not await self.store.record_tick(self.name, self.settings.send_interval_seconds):
                log.info("tick: leader, waiting out the previous leader's interval")
                return report
            if report.leader:
                report.sending = await self.store.is_sending()
                metrics.SENDING.set(1 if report.sending else 0)
                if report.sending:
                    await self._dispatch(report)
        except DB_ERRORS as exc:
            metrics.SKIPPED.labels("mysql").inc()
            log.warning(
                "tick skipped: MySQL unavailable (%s); next tick in %gs", exc, self.settings.send_interval_seconds
            )
            await self._drop_lock()
            return report
        except aio_pika.exceptions.AMQPError as exc:
            metrics.SKIPPED.labels("rabbitmq").inc()
            log.warning(
                "tick incomplete: RabbitMQ unavailable (%s); next tick in %gs", exc, self.settings.send_interval_seconds
            )
            return report
        log.info(
            "tick: %s, sending %s, claimed %d, published %d, released %d, stale re-published %d",
            "leader" if report.leader else "standby",
            {None: "-", True: "on", False: "off"}[report.sending],
            report.claimed,
            report.published,
            report.released,
            report.republished,
            extra={"leader": report.leader, "claimed": report.claimed},
        )
        return report

    async def _dispatch(self, report: TickReport) -> None:
        s = self.settings
        ids = await self.store.claim(s.send_batch_size)
        report.claimed = len(ids)
        metrics.CLAIMED.inc(len(ids))
        if ids:
            failed = await self.topology.publish_ids(ids)
            if failed:
                report.released = await self.store.release(failed)
                metrics.RELEASED.inc(report.released)
            report.published = len(ids) - len(failed)
            metrics.PUBLISHED.inc(report.published)
        # Looking for stale claims scans every queued row: at a short interval with a deep backlog, doing it
        # every tick cost MariaDB more than everything else. A quarter of the lease (at most 10 s) is soon
        # enough for claims that are only stale after a whole lease.
        now = asyncio.get_running_loop().time()
        if now < self.next_stale_check:
            return
        self.next_stale_check = now + max(s.send_interval_seconds, min(s.claim_lease_seconds / 4, 10.0))
        stale = await self.store.reclaim_stale(s.claim_lease_seconds, max(s.send_batch_size, 100))
        if stale:
            log.warning(
                "re-publishing %d claims older than %gs: %s",
                len(stale),
                s.claim_lease_seconds,
                stale[:20],
                extra={"message_ids": stale},
            )
            failed = await self.topology.publish_ids(stale)
            report.republished = len(stale) - len(failed)
            metrics.REPUBLISHED.inc(report.republished)

    async def _lead(self) -> bool:
        if self.lock is None:
            conn = await aiomysql.connect(**connect_kwargs(self.settings))  # type: ignore[arg-type]
            self.lock = LeaderLock(conn, leader_lock_name(self.settings.mysql_database))
        leader = await self.lock.try_acquire()
        if leader != self.leading:
            log.info("producer %s %s the leader", self.name, "is now" if leader else "is no longer")
        self.leading = leader
        metrics.LEADER.set(1 if leader else 0)
        return leader

    async def _drop_lock(self) -> None:
        """Close the lock's connection (the server releases the lock with it)."""
        if self.lock is not None:
            self.lock.conn.close()
            self.lock = None
        self.leading = False
        metrics.LEADER.set(0)
