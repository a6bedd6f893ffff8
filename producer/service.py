"""The producer: every ``SEND_INTERVAL_SECONDS`` the leader claims a batch and publishes it to RabbitMQ.

Leadership is a lease in MySQL (``producer_lease``), renewed by the leader every second: however many
replicas run, one claims per tick, so the global rate stays ``SEND_BATCH_SIZE`` per interval. When the
leader dies, freezes or loses MySQL, its lease lapses after ``LEADER_LEASE_SECONDS`` and a standby takes
over with a new epoch; every claim, re-publish and sweep checks the epoch in its own transaction, so a
leader that wakes up after losing the lease can never claim again.

Between ticks (every :data:`MAINTENANCE_SECONDS` at most) the leader also gives every row in flight its way
out: ``sending`` rows whose lease ran out are settled (:meth:`~common.store.MessageStore.sweep_sending`),
``queued`` rows whose AMQP message may be lost are published again. Every wait is bounded: a tick has a
deadline, every publish a confirm timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import aio_pika
import aiomysql
import orjson
import pymysql

from common import topology, tracing
from common.db import SERVICE_READ_TIMEOUT_SECONDS, error_text, is_transient, pool_ctx
from common.errors import LeaseLost
from common.metrics import start_listener
from common.migrations import migrate
from common.settings import Settings
from common.store import Fence, MessageStore, Swept
from producer import metrics

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 1.0  # how often the leader sweeps expired sending leases (and looks at stale claims)
TICK_DEADLINE_SECONDS = topology.PUBLISH_TIMEOUT_SECONDS + 20  # a tick that takes longer is abandoned
SWEEP_LIMIT = 500
# After MySQL was away for this producer, the sweep waits this long: consumers that kept their requests'
# outcomes while MySQL was down commit them first (they retry every 2 s at most), instead of their rows being
# taken for lost the moment MySQL answers again.
SWEEP_GRACE_SECONDS = 10.0
RETENTION_EVERY_SECONDS = 60.0  # the leader removes expired rows at most this often,
RETENTION_BATCH = 1000  # in transactions of at most this many rows of each status,
RETENTION_BUDGET_SECONDS = 5.0  # for at most this long per run (the rest waits for the next run)
# /healthz turns unhealthy when the loop has not come round for this long beyond its deadline, or RabbitMQ
# has been away this long.
STALL_SECONDS = 30.0
AMQP_DOWN_UNHEALTHY_SECONDS = 60.0


@dataclass
class TickReport:
    leader: bool = False
    sending: bool | None = None
    claimed: int = 0
    published: int = 0
    released: int = 0
    republished: int = 0
    swept: int = 0


class Producer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.fence: Fence | None = None  # set while this replica holds the leader lease
        self.ready = False
        self.next_stale_check = 0.0
        self.next_sweep = 0.0
        self.next_retention = 0.0
        self.db_back_at = 0.0  # when the renewal found MySQL again after failing (monotonic)
        self.last_loop = time.monotonic()
        self.amqp_down_since: float | None = None
        self.last_tick_state: tuple[bool, bool | None] | None = None  # (leader, sending) of the last tick

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            listener = await start_listener(s.producer_metrics_port, self.health)
            if listener:
                stack.push_async_callback(listener.cleanup)
            pool: aiomysql.Pool = await stack.enter_async_context(
                pool_ctx(s, maxsize=4, read_timeout=SERVICE_READ_TIMEOUT_SECONDS)
            )
            await migrate(pool)
            self.store = MessageStore(pool)
            conn = await topology.connect(s.amqp_url.reveal(), name="message-sender producer")
            stack.push_async_callback(conn.close)
            conn.close_callbacks.add(lambda *_: self._amqp_down())
            conn.reconnect_callbacks.add(lambda *_: setattr(self, "amqp_down_since", None))
            self.topology = await topology.open_channel(conn, queue_type=s.amqp_queue_type)
            self.ready = True
            log.info("producer %s ticking every %gs, batch %d", self.name, s.send_interval_seconds, s.send_batch_size)
            renewer = asyncio.get_running_loop().create_task(self._renew(stop))
            try:
                await self._loop(stop)
            finally:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                await self._give_up_lead()

    @property
    def leading(self) -> bool:
        return self.fence is not None

    def _amqp_down(self) -> None:
        if self.amqp_down_since is None:
            self.amqp_down_since = time.monotonic()

    def health(self) -> dict[str, object]:
        """``ok`` while the loop comes round; unhealthy when it is stuck or RabbitMQ has been away for long."""
        now = time.monotonic()
        problems = []
        bound = min(self.settings.send_interval_seconds, MAINTENANCE_SECONDS) + TICK_DEADLINE_SECONDS + STALL_SECONDS
        if self.ready and now - self.last_loop > bound:
            problems.append(f"the tick loop has not come round for {now - self.last_loop:.0f}s")
        if self.amqp_down_since is not None and now - self.amqp_down_since > AMQP_DOWN_UNHEALTHY_SECONDS:
            problems.append(f"RabbitMQ unreachable for {now - self.amqp_down_since:.0f}s")
        status = "unhealthy" if problems else ("ok" if self.ready else "starting")
        return {"status": status, "leader": self.leading, "problems": problems}

    async def _loop(self, stop: asyncio.Event) -> None:
        """Tick at start-up and then on a fixed schedule (no drift; a late tick does not cause a burst); in
        between, wake every :data:`MAINTENANCE_SECONDS` for the leader's sweeps."""
        loop = asyncio.get_running_loop()
        interval = self.settings.send_interval_seconds
        due = loop.time()
        while not stop.is_set():
            self.last_loop = time.monotonic()
            if loop.time() >= due:
                await self._bounded(self.tick(), "tick")
                due += interval
                now = loop.time()
                if due < now:  # the tick overran: skip the missed slots instead of catching up
                    due = now + interval - (now - due) % interval
            elif (fence := self.fence) is not None:
                await self._bounded(self.maintain(TickReport(leader=True), fence), "sweep")
            wait = min(due, loop.time() + MAINTENANCE_SECONDS) - loop.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, wait))

    async def _bounded(self, work: Awaitable[object], what: str) -> None:
        try:
            await asyncio.wait_for(work, TICK_DEADLINE_SECONDS)
        except TimeoutError:
            log.warning(
                "%s abandoned after %gs (a dependency hangs); claims it made stay queued until re-published",
                what,
                TICK_DEADLINE_SECONDS,
            )
        except LeaseLost as exc:
            self._lost(exc)
        except Exception as exc:
            self._failed(what, exc)

    async def tick(self) -> TickReport:
        report = TickReport()
        metrics.TICKS.inc()
        try:
            fence = self.fence
            report.leader = fence is not None
            interval, batch = self.settings.send_interval_seconds, self.settings.send_batch_size
            if fence is not None and not await self.store.record_tick(fence, interval, batch):
                log.info("tick: leader, waiting out the previous leader's interval")
                return report
            if fence is not None:
                report.sending = await self.store.is_sending()
                metrics.SENDING.set(1 if report.sending else 0)
                if report.sending:
                    await self._dispatch(report, fence)
                await self.maintain(report, fence)
        except LeaseLost as exc:
            self._lost(exc)
            return report
        except Exception as exc:
            self._failed("tick", exc)
            return report
        # A tick that did nothing, in the same role and switch state as the one before, is not news: DEBUG.
        moved = report.claimed or report.published or report.released or report.republished or report.swept
        state = (report.leader, report.sending)
        quiet, self.last_tick_state = not moved and state == self.last_tick_state, state
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "tick: %s, sending %s, claimed %d, published %d, released %d, stale re-published %d, swept %d",
            "leader" if report.leader else "standby",
            {None: "-", True: "on", False: "off"}[report.sending],
            report.claimed,
            report.published,
            report.released,
            report.republished,
            report.swept,
            extra={"leader": report.leader, "claimed": report.claimed},
        )
        return report

    async def _renew(self, stop: asyncio.Event) -> None:
        """Take or renew the leader lease every second (a quarter lease at most), beside the tick loop, so a
        long tick never lets a live leader's lease lapse; a standby takes over when the leader stops renewing."""
        every = min(MAINTENANCE_SECONDS, self.settings.leader_lease_seconds / 4)
        while not stop.is_set():
            try:
                fence = await asyncio.wait_for(
                    self.store.lead(self.name, self.settings.leader_lease_seconds), self.settings.leader_lease_seconds
                )
            except Exception as exc:  # MySQL away: the lease lapses by itself; ticks are skipped meanwhile
                if self.fence is not None:
                    log.warning("producer %s could not renew its leader lease (%s)", self.name, error_text(exc))
                fence = None
                self.db_back_at = float("inf")
            else:
                if self.db_back_at == float("inf"):
                    self.db_back_at = time.monotonic()
            if (fence is None) != (self.fence is None) or (fence and self.fence and fence.epoch != self.fence.epoch):
                log.info(
                    "producer %s %s the leader%s",
                    self.name,
                    "is now" if fence else "is no longer",
                    f" (lease epoch {fence.epoch})" if fence else "",
                )
            self.fence = fence
            metrics.LEADER.set(1 if fence else 0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    def _lost(self, exc: LeaseLost) -> None:
        log.warning("tick: %s; another producer leads now", exc)
        self.fence = None
        metrics.LEADER.set(0)

    async def _give_up_lead(self) -> None:
        if self.fence is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.give_up_lead(self.fence), 5)
            self.fence = None
            metrics.LEADER.set(0)

    def _failed(self, what: str, exc: Exception) -> None:
        """Log a failed tick or sweep by kind: an outage once per tick with the plan; a real MySQL error (a bug
        or a misconfiguration, never retried into silence) with its number; anything else with its traceback."""
        interval = self.settings.send_interval_seconds
        if is_transient(exc):
            metrics.SKIPPED.labels("mysql").inc()
            log.warning("%s skipped: MySQL unavailable (%s); next tick in %gs", what, exc, interval)
        elif isinstance(exc, aio_pika.exceptions.AMQPError | ConnectionError):
            metrics.SKIPPED.labels("rabbitmq").inc()
            log.warning("%s incomplete: RabbitMQ unavailable (%r); next tick in %gs", what, exc, interval)
        elif isinstance(exc, pymysql.err.MySQLError):
            metrics.SKIPPED.labels("mysql_error").inc()
            log.error("%s failed: %s; next tick in %gs", what, error_text(exc), interval)
        else:
            metrics.SKIPPED.labels("error").inc()
            log.error("%s failed unexpectedly; next tick in %gs", what, interval, exc_info=exc)

    async def _dispatch(self, report: TickReport, fence: Fence) -> None:
        ids = await self.store.claim(self.settings.send_batch_size, fence, budget=True)
        report.claimed = len(ids)
        metrics.CLAIMED.inc(len(ids))
        if ids:
            report.published, report.released = await self._publish(ids)
            metrics.PUBLISHED.inc(report.published)

    async def _publish(self, ids: list[int], fresh: bool = True) -> tuple[int, int]:
        """Publish claims and record which were confirmed; a fresh claim whose publish failed goes back to
        ``pending`` (a re-published one stays ``queued``, unconfirmed, for the next stale check)."""
        if tracing.enabled():
            failed = await self._publish_traced(ids, fresh)
        else:
            failed = await self.topology.publish_ids(ids)
        unconfirmed = set(failed)
        await self.store.mark_published([i for i in ids if i not in unconfirmed])
        released = 0
        if failed and fresh:
            released = await self.store.release(failed)
            metrics.RELEASED.inc(released)
        return len(ids) - len(failed), released

    async def _publish_traced(self, ids: list[int], fresh: bool) -> list[int]:
        """The publish with one span per message: a child of the request that created the row (its stored
        traceparent), or a new root for a row inserted by hand; its context goes in the AMQP headers."""
        stored = await self.store.traceparents(ids)
        spans, carried = {}, {}
        for i in ids:
            spans[i], tp = tracing.start_span(
                "producer publish" if fresh else "producer re-publish", stored.get(i), attributes={"message.id": i}
            )
            if tp:
                carried[i] = tp
        try:
            failed = await self.topology.publish_ids(ids, traceparents=carried)
        finally:
            for span in spans.values():
                span.end()
        return failed

    async def maintain(self, report: TickReport, fence: Fence) -> None:
        """The leader's sweeps: settle ``sending`` rows whose lease ran out; re-publish lost claims (at most
        every quarter lease, <= 10 s: looking scans the queued rows)."""
        s = self.settings
        swept: list[Swept] = []
        # Once a second, however short the interval: a lease is the webhook timeout plus seconds, and each sweep
        # reads every row in flight (20 sweeps a second at the bench's 0.05 s ticks read ~14,000 rows a second).
        at = time.monotonic()
        if at - self.db_back_at >= SWEEP_GRACE_SECONDS and at >= self.next_sweep:
            self.next_sweep = at + MAINTENANCE_SECONDS
            swept = await self.store.sweep_sending(s.max_attempts, SWEEP_LIMIT, fence)
        report.swept = len(swept)
        if swept:
            metrics.SWEPT.inc(len(swept))
            log.warning(
                "settled %d sending rows whose lease ran out (%d sent again, at-least-once; %d failed): %s",
                len(swept),
                sum(w.kind == "retry" for w in swept),
                sum(w.kind == "failed" for w in swept),
                [w.id for w in swept][:20],
                extra={"message_ids": [w.id for w in swept]},
            )
            for row in swept:
                if row.kind == "failed":
                    await self._dead_letter_copy(row)
        now = asyncio.get_running_loop().time()
        if s.retention_days and now >= self.next_retention:
            self.next_retention = now + RETENTION_EVERY_SECONDS
            await self.retain(fence)
        if now < self.next_stale_check or report.sending is False:
            return
        self.next_stale_check = now + max(s.send_interval_seconds, min(s.claim_lease_seconds / 4, 10.0))
        if report.sending is None and not await self.store.is_sending():
            return
        queue_empty = await self.topology.dispatch_ready() == 0
        # At most one batch: re-published claims go out at the same rate as new ones.
        stale = await self.store.reclaim_stale(s.claim_lease_seconds, s.send_batch_size, queue_empty, fence)
        if stale:
            log.warning(
                "re-publishing %d claims whose AMQP message may be lost (older than %gs): %s",
                len(stale),
                s.claim_lease_seconds,
                stale[:20],
                extra={"message_ids": stale},
            )
            report.republished, _ = await self._publish(stale, fresh=False)
            metrics.REPUBLISHED.inc(report.republished)

    async def retain(self, fence: Fence) -> None:
        """Remove ``sent``, ``failed`` and ``cancelled`` rows older than ``RETENTION_DAYS`` in small batches
        (short locks, no long transaction), within a time budget; one log line and the metric say how many went."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETENTION_BUDGET_SECONDS
        sent = failed = cancelled = 0
        while loop.time() < deadline:
            a, b, c = await self.store.remove_expired(self.settings.retention_days, RETENTION_BATCH, fence)
            sent, failed, cancelled = sent + a, failed + b, cancelled + c
            metrics.RETENTION.labels("sent").inc(a)
            metrics.RETENTION.labels("failed").inc(b)
            metrics.RETENTION.labels("cancelled").inc(c)
            if max(a, b, c) < RETENTION_BATCH:
                break
        if sent or failed or cancelled:
            log.info(
                "retention: removed %d sent, %d failed and %d cancelled messages older than %g days",
                sent,
                failed,
                cancelled,
                self.settings.retention_days,
                extra={"removed_sent": sent, "removed_failed": failed, "removed_cancelled": cancelled},
            )

    async def _dead_letter_copy(self, row: Swept) -> None:
        copy = {"id": row.id, "recipient": row.recipient, "content": row.content, "error": row.error}
        body = orjson.dumps({**copy, "attempts": row.attempt})
        try:
            await self.topology.dead_letter_copy(body, {"x-reason": "failed", "x-error": row.error})
        except Exception as exc:  # the row says failed; the copy is a convenience
            log.warning("message %d: dead-letter copy not published (%r)", row.id, exc, extra={"message_id": row.id})
