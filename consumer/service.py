"""The consumer: RabbitMQ dispatch queue -> compare-and-set -> webhook -> outcome in MySQL -> Redis -> ack.

Per delivery the order is fixed, and it is what makes "never twice" hold whatever crashes:
1. ``queued -> sending`` compare-and-set (grouped with other deliveries into one transaction);
2. the webhook POST (only by the winner of step 1);
3. the outcome and an attempts row, group-committed; 4. ``message:<messageId>`` in Redis; 5. the ack.
A crash before 1 or after 3 is harmless (the row says what happened); a crash between 1 and 3 leaves
the row ``sending``, and its redelivery is failed as "outcome unknown" instead of being resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aio_pika
import aiomysql
import orjson
import pymysql
import redis.asyncio as redis
from aio_pika.abc import AbstractIncomingMessage

from common import topology
from common.batching import Batcher
from common.cache import MessageCache
from common.db import pool_ctx
from common.metrics import start_listener
from common.migrations import migrate
from common.models import OUTCOME_UNKNOWN, Action, Delivery, Outcome, decide, utcnow
from common.settings import Settings
from common.store import MessageStore
from consumer import metrics
from consumer.webhook import Webhook

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the same database work is simply tried again (outage, deadlock, lock timeout).
TRANSIENT_DB = (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError, asyncio.TimeoutError)

Start = tuple[int, bool, int]  # (message id, redelivered, the delivery's token)
# How long after a row went ``sending`` its first delivery may still be in flight, beyond the request
# timeout: a redelivery waits that long before it decides the first one is over.
SENDING_LEASE_MARGIN = 5.0
Started = tuple[Action | None, Delivery | None]  # action None: unknown id (poison)


MAX_IDS = 10_000
CACHE_BACKLOG_MAX = 100_000


def parse_body(body: bytes) -> list[int] | None:
    """The message ids of a dispatch message body, ``{"id": 42}`` or ``{"ids": [42, 43]}``; None for
    anything else (not JSON, wrong shape, an id that is not a positive integer)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    values = [data["id"]] if "id" in data else data.get("ids")
    if not isinstance(values, list) or not 0 < len(values) <= MAX_IDS:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return values
    return None


class Consumer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.inflight: set[asyncio.Task[None]] = set()
        self.cache_backlog: list[tuple[str, int, dt.datetime]] = []
        self.ready = False
        self.db_down = False
        self.redis_down = False
        self.sending_lease = settings.webhook_timeout_seconds + SENDING_LEASE_MARGIN
        metrics.INFLIGHT.set_function(lambda: len(self.inflight))
        metrics.CACHE_BACKLOG.set_function(lambda: len(self.cache_backlog))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            listener = await start_listener(s.consumer_metrics_port, self.health)
            if listener:
                stack.push_async_callback(listener.cleanup)
            pool: aiomysql.Pool = await stack.enter_async_context(pool_ctx(s, maxsize=8))
            await migrate(pool)
            self.store = MessageStore(pool)
            client = redis.from_url(s.redis_url.reveal(), socket_timeout=5, socket_connect_timeout=5)
            stack.push_async_callback(client.aclose)
            self.cache = MessageCache(client, s.cache_ttl_seconds, s.redis_prefix)
            session = Webhook.open_session(s)
            stack.push_async_callback(session.close)
            self.webhook = Webhook(s, session)
            conn = await topology.connect(s.amqp_url.reveal())
            stack.push_async_callback(conn.close)
            self.topology = await topology.open_channel(conn, prefetch=s.consumer_prefetch)
            self.starts: Batcher[Start, Started] = Batcher(self._flush_starts)
            self.finishes: Batcher[tuple[Outcome, Delivery], None] = Batcher(self._flush_finishes)
            tag = await self.topology.dispatch_queue.consume(self._on_message)
            self.ready = True
            log.info(
                "consumer %s consuming %s (prefetch %d, guarantee %s)",
                self.name,
                topology.DISPATCH_QUEUE,
                s.consumer_prefetch,
                s.delivery_guarantee,
            )
            flusher = asyncio.get_running_loop().create_task(self._flush_cache_backlog(stop))
            await stop.wait()
            await flusher
            self.ready = False
            log.info("stopping: no new deliveries; waiting for %d in flight", len(self.inflight))
            with contextlib.suppress(Exception):
                await self.topology.dispatch_queue.cancel(tag)
            await self._drain(s.shutdown_timeout_seconds)

    async def _flush_cache_backlog(self, stop: asyncio.Event, every: float = 1.0) -> None:
        """Write cache entries held back by a Redis outage even when no new delivery comes along."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
            if self.cache_backlog:
                await self._write_cache([], retry=True)

    def health(self) -> dict[str, object]:
        return {"status": "ok" if self.ready else "starting", "inflight": len(self.inflight)}

    async def _drain(self, grace: float) -> None:
        if self.inflight:
            _, late = await asyncio.wait(set(self.inflight), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("%d deliveries did not finish within %.0fs; they will be redelivered", len(late), grace)
        if self.cache_backlog:
            await self._write_cache([], retry=True)
            if self.cache_backlog:
                log.error(
                    "stopping with %d cache entries unwritten (Redis down); run `message-sender cache-backfill`",
                    len(self.cache_backlog),
                )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(message))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _guarded(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, not an outage (outages are retried inside _handle). Do not hold the prefetch slot
            # forever: dead-letter the delivery; the row's own state (lease, redelivery rule) still holds.
            log.exception(
                "unexpected error handling delivery %s",
                message.message_id,
                extra={"message_ids": parse_body(message.body)},
            )
            await self._dead_letter(message, "unexpected error", message.message_id)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        ids = parse_body(message.body)
        if ids is None:
            await self._dead_letter(message, "malformed body", message.body[:200])
            return
        results = await asyncio.gather(
            *(self._process(i, bool(message.redelivered)) for i in ids), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        unknown = [i for i, known in zip(ids, results, strict=True) if not known]
        if unknown and len(unknown) == len(ids):
            await self._dead_letter(message, "unknown message id", unknown)
            return
        if unknown:
            await self._dead_letter_ids(unknown)
        await self._ack(message)

    async def _process(self, message_id: int, redelivered: bool) -> bool:
        """Take one id through compare-and-set, delivery and outcome commit; False if the id is unknown."""
        token = secrets.randbits(63)  # kept across retries: a lost answer cannot hide a won row
        while True:
            action, row = await self._persist(
                lambda: self.starts.submit((message_id, redelivered, token)), "compare-and-set"
            )
            if action is not Action.WAIT or row is None:
                break
            wait = max(0.5, self.sending_lease - row.sending_for)
            log.info(
                "message %d redelivered while it may still be in flight; looking again in %.1fs",
                message_id,
                wait,
                extra={"message_id": message_id},
            )
            await asyncio.sleep(wait)
        if action is None or row is None:
            return False
        if action is Action.DROP:
            metrics.DUPLICATES.inc()
            log.info(
                "message %d is %s; duplicate delivery dropped", message_id, row.status, extra={"message_id": message_id}
            )
            return True
        if action is Action.FAIL_UNKNOWN:
            now = utcnow()
            outcome = Outcome(row.id, "failed", row.attempts + 1, now, now, error=OUTCOME_UNKNOWN)
        else:
            outcome = await self.webhook.deliver(row)
        await self._persist(lambda: self.finishes.submit((outcome, row)), "outcome commit")
        return True

    async def _persist(self, work: Callable[[], Awaitable[T]], what: str) -> T:
        """Run database work until it succeeds. An outage is logged once for the whole consumer (not
        once per delivery waiting on it), with the retry plan, and once when MySQL answers again."""
        delay = 0.2
        while True:
            try:
                result = await work()
            except TRANSIENT_DB as exc:
                if not self.db_down:
                    self.db_down = True
                    log.warning("MySQL unavailable during %s (%s); deliveries wait and retry every <=10s", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if self.db_down:
                self.db_down = False
                log.info("MySQL answers again; deliveries go on")
            return result

    async def _flush_starts(self, items: Sequence[Start]) -> list[Started]:
        rows = await self.store.begin_sending([(message_id, token) for message_id, _, token in items])
        at_least_once = self.settings.is_at_least_once
        out: list[Started] = []
        for message_id, redelivered, token in items:
            row = rows.get(message_id)
            if row is None:
                out.append((None, None))
                continue
            won = row.token == token
            out.append((decide(row.status, redelivered, at_least_once, won, row.sending_for, self.sending_lease), row))
        return out

    async def _flush_finishes(self, items: Sequence[tuple[Outcome, Delivery]]) -> list[None]:
        sent_at = await self.store.record_outcomes([o for o, _ in items])
        metrics.BATCH_SIZE.observe(len(items))
        entries = []
        for outcome, row in items:
            metrics.DELIVERIES.labels(outcome.kind).inc()
            extra = {"message_id": outcome.id, "attempt": outcome.attempt}
            if outcome.kind == "sent":
                log.debug("message %d sent", outcome.id, extra=extra)
                if outcome.remote_message_id:
                    entries.append((outcome.remote_message_id, outcome.id, sent_at or outcome.finished_at))
            elif outcome.kind == "retry":
                metrics.RETRIES.inc()
                log.info(
                    "message %d: attempt %d failed (%s); next at %s",
                    outcome.id,
                    outcome.attempt,
                    outcome.error,
                    outcome.next_attempt_at,
                    extra=extra,
                )
            else:
                log.warning("message %d failed: %s", outcome.id, outcome.error, extra=extra)
                await self._dead_letter_copy(outcome, row)
        await self._write_cache(entries)
        return [None] * len(items)

    async def _write_cache(self, entries: list[tuple[str, int, dt.datetime]], retry: bool = False) -> None:
        """Write cache entries in one pipeline. While Redis is down they are held back (deliveries go on,
        MySQL has every outcome) and written by the background flusher once it is back; past
        ``CACHE_BACKLOG_MAX`` the oldest are dropped with an error naming ``message-sender cache-backfill``,
        which rewrites the whole cache from MySQL. The backlog is only ever taken or extended, never
        replaced after an await, so entries added by concurrent commits meanwhile are kept."""
        if self.cache_backlog and not retry:
            self._hold_back(entries)
            return
        pending, self.cache_backlog = self.cache_backlog + entries, []
        if not pending:
            return
        try:
            await self.cache.put_many(pending)
        except (redis.RedisError, OSError) as exc:
            if not self.redis_down:
                log.warning("Redis unavailable (%s); holding cache entries back, retrying every second", exc)
            self.redis_down = True
            held, self.cache_backlog = self.cache_backlog, []
            self._hold_back(pending + held)
            return
        if self.redis_down:
            self.redis_down = False
            log.info("Redis is back; wrote %d held-back cache entries", len(pending))

    def _hold_back(self, entries: list[tuple[str, int, dt.datetime]]) -> None:
        metrics.CACHE_ERRORS.inc(len(entries))
        self.cache_backlog.extend(entries)
        overflow = len(self.cache_backlog) - CACHE_BACKLOG_MAX
        if overflow > 0:
            del self.cache_backlog[:overflow]
            log.error(
                "Redis still down: %d cache entries dropped from memory; run `message-sender cache-backfill`"
                " once it is back to rewrite them from MySQL",
                overflow,
            )

    async def _dead_letter_copy(self, outcome: Outcome, row: Delivery) -> None:
        body = orjson.dumps(
            {
                "id": row.id,
                "recipient": row.recipient,
                "content": row.content,
                "error": outcome.error,
                "attempts": outcome.attempt,
            }
        )
        try:
            await self.topology.dead_letter_copy(body, {"x-reason": "failed", "x-error": outcome.error or ""})
            metrics.DEAD_LETTERED.labels("failed").inc()
        except Exception as exc:  # the row says failed; the copy is a convenience
            log.warning("message %d: dead-letter copy not published (%s)", row.id, exc, extra={"message_id": row.id})

    async def _dead_letter_ids(self, ids: list[int]) -> None:
        """Unknown ids inside an otherwise good dispatch message: dead-letter a copy naming them."""
        log.warning("unknown message ids %s sent to the dead-letter queue", ids, extra={"message_ids": ids})
        metrics.DEAD_LETTERED.labels("poison").inc()
        try:
            await self.topology.dead_letter_copy(orjson.dumps({"ids": ids}), {"x-reason": "unknown message id"})
        except Exception as exc:
            log.warning("dead-letter copy of unknown ids %s not published (%s)", ids, exc, extra={"message_ids": ids})

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, what: object) -> None:
        log.warning("poison message (%s: %r) sent to the dead-letter queue", reason, what)
        metrics.DEAD_LETTERED.labels("poison").inc()
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
            await message.reject(requeue=False)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            # The channel went away: the broker redelivers, and the row's status makes that a no-op.
            log.info(
                "ack of %s lost (%s); the redelivery will be dropped",
                message.message_id,
                exc,
                extra={"message_ids": parse_body(message.body)},
            )
